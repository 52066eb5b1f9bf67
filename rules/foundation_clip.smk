# The tiny CLIP foundation model (repro.foundation.clip): transformers' CLIPModel,
# trained contrastively on the captioned glyph corpus, scored zero-shot on held-out
# glyphs and on the real digits (never trained on). Built only when
# foundation.clip.pretrained is null (tiny, smoke); at paper scale the jobs load
# openai/clip-vit-base-patch16 from the hub cache instead (foundation_input).


rule foundation_clip:
    input:
        corpus=rules.glyph_corpus.output.corpus,
        digits=rules.digits.output.val,
    output:
        model=directory(foundation_dir("clip")),
        metrics="results/foundation/clip.json",
    log:
        "logs/foundation/clip.log",
    benchmark:
        "benchmarks/rules/foundation/clip.tsv"
    conda:
        "../envs/foundation.yaml"
    threads: 1
    resources:
        mem_mb=3000,
        runtime=20,
        gpu=gpus(),
    params:
        cfg=section("foundation", "clip", heldout=config["data"]["corpus"]["heldout"]),
        checkpoints="checkpoints/foundation/clip",
    shell:
        stage(
            "repro.foundation.clip",
            "--corpus {input.corpus:q} --digits {input.digits:q} --out {output.model:q}"
            " --metrics {output.metrics:q} --checkpoint-dir {params.checkpoints:q}",
            rule="foundation_clip",
        )
