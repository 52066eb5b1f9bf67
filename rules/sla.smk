# SLA: Beyond Sparsity in Diffusion Transformers via Fine-Tunable Sparse-Linear
# Attention. The fused kernels live in repro.kernels (Triton on CUDA, a blockwise
# PyTorch path on CPU); the attention module and diffusers processors in repro.sla.
# Registered in repro.sla.workflow (config checks, targets); config section `sla`,
# schema schemas/sla.schema.yaml.

SLA = config["sla"]
SLA_LABEL = PAPERS["sla"].label  # the report's category


rule sla_kernel_bench:
    output:
        report(
            "results/sla_kernel.csv",
            caption="../report/sla_kernel.rst",
            category=SLA_LABEL,
            subcategory="Tables",
        ),
    log:
        "logs/sla/kernel_bench.log",
    benchmark:
        "benchmarks/rules/sla/kernel_bench.tsv"
    conda:
        "../envs/sla.yaml"
    # A timing job: nothing else should run beside it.
    threads: workflow.cores
    resources:
        mem_mb=16000,
        runtime=60,
        # Without a GPU the benchmark writes rows marked skipped (with the reason).
        gpu=gpus(),
    params:
        cfg=section("sla", "kernel_bench"),
    shell:
        stage("repro.sla.kernel_bench", "--out {output:q}", rule="sla_kernel_bench")
