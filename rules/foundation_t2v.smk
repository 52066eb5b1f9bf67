# The tiny text-to-video foundation model (repro.foundation.t2v): Wan2.1-T2V's layout
# and classes (WanTransformer3DModel, UMT5EncoderModel, flow matching) in pixel space,
# pre-trained with text only on the training faces. Built only when
# foundation.t2v.pretrained is null (tiny, smoke); at paper scale the jobs that need it
# load Wan2.1-T2V-1.3B from the hub cache instead (foundation_input).


rule foundation_t2v:
    input:
        faces="data/faces/train.safetensors",
    output:
        model=directory(foundation_dir("t2v")),
        metrics="results/foundation/t2v.json",
    log:
        "logs/foundation/t2v.log",
    benchmark:
        "benchmarks/rules/foundation/t2v.tsv"
    conda:
        "../envs/foundation.yaml"
    # On HuMo's critical path: every HuMo job waits for it.
    threads: BASE_THREADS
    resources:
        mem_mb=4000,
        runtime=30,
        gpu=gpus(),
    params:
        cfg=section("foundation", "t2v"),
        checkpoints="checkpoints/foundation/t2v",
    shell:
        stage(
            "repro.foundation.t2v",
            "--faces {input.faces:q} --out {output.model:q} --metrics {output.metrics:q}"
            " --checkpoint-dir {params.checkpoints:q}",
            rule="foundation_t2v",
        )
