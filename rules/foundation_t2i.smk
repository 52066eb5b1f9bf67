# The tiny text-to-image foundation model (repro.foundation.t2i): Stable Diffusion's
# layout and classes in pixel space, pre-trained on the captioned glyph corpus. Built
# only when foundation.t2i.pretrained is null (tiny, smoke); at paper scale the jobs
# that need it load SD 2.1 base from the hub cache instead (foundation_input).


rule foundation_t2i:
    input:
        corpus=rules.glyph_corpus.output.corpus,
    output:
        model=directory(foundation_dir("t2i")),
        metrics="results/foundation/t2i.json",
    log:
        "logs/foundation/t2i.log",
    benchmark:
        "benchmarks/rules/foundation/t2i.tsv"
    conda:
        "../envs/foundation.yaml"
    # Sized for one thread (a 0.8M UNet on 8x8 batches splits badly); it runs beside
    # foundation_clip.
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
        gpu=gpus(),
    params:
        cfg=section("foundation", "t2i", heldout=config["data"]["corpus"]["heldout"]),
        checkpoints="checkpoints/foundation/t2i",
    shell:
        stage(
            "repro.foundation.t2i",
            "--corpus {input.corpus:q} --out {output.model:q} --metrics {output.metrics:q}"
            " --checkpoint-dir {params.checkpoints:q}",
            rule="foundation_t2i",
        )
