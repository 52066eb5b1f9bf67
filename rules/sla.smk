# SLA: Beyond Sparsity in Diffusion Transformers via Fine-Tunable Sparse-Linear
# Attention. The fused kernels live in repro.kernels (Triton on CUDA, a blockwise
# PyTorch path on CPU); the attention module and diffusers processors in repro.sla.

SLA = config["sla"]


rule sla_kernel_bench:
    output:
        "results/sla_kernel.csv",
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
        gpu=lambda wildcards: 1 if SCALE == "paper" else 0,
    params:
        py=PYTHON,
        scale=SCALE,
        cfg=section("sla", "kernel_bench"),
    shell:
        "{params.py} -m repro.sla.kernel_bench --out {output:q} --params {params.cfg:q}"
        " --threads {threads} --rule sla_kernel_bench --scale {params.scale} > {log:q} 2>&1"
