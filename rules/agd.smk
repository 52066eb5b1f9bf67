# AGD: Efficient Distillation of Classifier-Free Guidance using Adapters.
# base -> CFG-guided (and standard) trajectories -> adapters (AGD) / whole-model
# guidance distillation (GD) -> evaluation over w and seeds -> table, figures, claims.
# Registered in repro.agd.workflow (config checks, hub keys, targets); config
# section `agd`, schema schemas/agd.schema.yaml.


include: "agd_common.smk"


wildcard_constraints:
    traj="cfg|standard",
    seed=r"\d+",
    agd_checkpoint="base|derived",
    agd_method="none|cfg|agd|agd_standard|agd_native|gd|real",
    adapter="offset|mlp_gate|cross_attention|adaln",


rule agd_base:
    input:
        train=rules.digits.output.train,
        hub=hub_input("agd.base.pretrained"),
    output:
        model=directory("models/agd/base"),
        metrics="results/agd/base_metrics.json",
    log:
        "logs/agd/base.log",
    benchmark:
        "benchmarks/rules/agd/base.tsv"
    conda:
        "../envs/agd.yaml"
    threads: BASE_THREADS
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=gpus("agd", "base"),
    params:
        cfg=section(
            "agd", "base", sampler=AGD["sampler"], **hub_options("agd.base.pretrained")
        ),
        checkpoints="checkpoints/agd_base",
    shell:
        stage(
            "repro.agd.base",
            "--train {input.train:q} --out {output.model:q} --metrics {output.metrics:q}"
            " --checkpoint-dir {params.checkpoints:q}",
            rule="agd_base",
            processes=processes("agd", "base"),
        )


rule agd_trajectories:
    input:
        base="models/agd/{agd_checkpoint}",
        train=rules.digits.output.train,
    output:
        directory("data/agd/trajectories/{agd_checkpoint}/{traj}_s{seed}"),
    log:
        "logs/agd/trajectories/{agd_checkpoint}_{traj}_s{seed}.log",
    benchmark:
        "benchmarks/rules/agd/trajectories_{agd_checkpoint}_{traj}_s{seed}.tsv"
    conda:
        "../envs/agd.yaml"
    threads: THREADS
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=gpus(),
    params:
        cfg=lambda wildcards: section(
            "agd", "trajectories", sampler=AGD["sampler"], seed=int(wildcards.seed)
        ),
    shell:
        stage(
            "repro.agd.trajectories",
            "--kind {wildcards.traj} --base {input.base:q} --train {input.train:q}"
            " --out {output:q}",
            rule="agd_trajectories",
        )


rule agd_distill:
    input:
        base="models/agd/{agd_checkpoint}",
        trajectories="data/agd/trajectories/{agd_checkpoint}/{traj}_s{seed}",
    output:
        adapters="models/agd/adapters/{agd_checkpoint}/{traj}_{adapter}_s{seed}.safetensors",
        metrics="results/agd/distill/{agd_checkpoint}/{traj}_{adapter}_s{seed}.json",
    log:
        "logs/agd/distill/{agd_checkpoint}_{traj}_{adapter}_s{seed}.log",
    benchmark:
        "benchmarks/rules/agd/distill_{agd_checkpoint}_{traj}_{adapter}_s{seed}.tsv"
    conda:
        "../envs/agd.yaml"
    threads: THREADS
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=gpus("agd", "distill"),
    params:
        cfg=lambda wildcards: section(
            "agd",
            "distill",
            seed=int(wildcards.seed),
            adapter_type=wildcards.adapter,
        ),
        checkpoints="checkpoints/agd_distill/{agd_checkpoint}/{traj}_{adapter}_s{seed}",
    shell:
        stage(
            "repro.agd.distill",
            "--base {input.base:q} --trajectories {input.trajectories:q}"
            " --out {output.adapters:q} --metrics {output.metrics:q}"
            " --checkpoint-dir {params.checkpoints:q}",
            rule="agd_distill",
            processes=processes("agd", "distill"),
        )


rule agd_gd:
    input:
        base=rules.agd_base.output.model,
        train=rules.digits.output.train,
    output:
        model=directory("models/agd/gd_s{seed}"),
        metrics="results/agd/gd/gd_s{seed}.json",
    log:
        "logs/agd/gd_s{seed}.log",
    benchmark:
        "benchmarks/rules/agd/gd_s{seed}.tsv"
    conda:
        "../envs/agd.yaml"
    threads: THREADS
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=gpus("agd", "gd"),
    params:
        cfg=lambda wildcards: section(
            "agd",
            "gd",
            seed=int(wildcards.seed),
            sampler=AGD["sampler"],
            w_range=[AGD["trajectories"]["w_min"], AGD["trajectories"]["w_max"]],
        ),
        checkpoints="checkpoints/agd_gd/s{seed}",
    shell:
        stage(
            "repro.agd.gd",
            "--base {input.base:q} --train {input.train:q} --out {output.model:q}"
            " --metrics {output.metrics:q} --checkpoint-dir {params.checkpoints:q}",
            rule="agd_gd",
            processes=processes("agd", "gd"),
        )


rule agd_transfer:
    input:
        base=rules.agd_base.output.model,
        glyphs="data/glyphs/train.safetensors",
        hub=hub_input("agd.transfer.pretrained"),
    output:
        model=directory("models/agd/derived"),
        metrics="results/agd/transfer_metrics.json",
    log:
        "logs/agd/transfer.log",
    benchmark:
        "benchmarks/rules/agd/transfer.tsv"
    conda:
        "../envs/agd.yaml"
    threads: THREADS
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=gpus("agd", "transfer"),
    params:
        cfg=section(
            "agd",
            "transfer",
            sampler=AGD["sampler"],
            **hub_options("agd.transfer.pretrained"),
        ),
        checkpoints="checkpoints/agd_transfer",
    shell:
        stage(
            "repro.agd.transfer",
            "--base {input.base:q} --data {input.glyphs:q} --out {output.model:q}"
            " --metrics {output.metrics:q} --checkpoint-dir {params.checkpoints:q}",
            rule="agd_transfer",
            processes=processes("agd", "transfer"),
        )


rule agd_eval:
    input:
        unpack(agd_eval_inputs),
        hub=hub_input("agd.base.vae"),
    output:
        table="results/agd/eval/{agd_checkpoint}/{agd_method}.csv",
        samples="data/agd/samples/{agd_checkpoint}/{agd_method}.safetensors",
    log:
        "logs/agd/eval/{agd_checkpoint}_{agd_method}.log",
    benchmark:
        "benchmarks/rules/agd/eval_{agd_checkpoint}_{agd_method}.tsv"
    conda:
        "../envs/agd.yaml"
    threads: THREADS
    resources:
        mem_mb=3000,
        runtime=60,
        gpu=gpus(),
    params:
        cfg=section(
            "agd",
            "eval",
            sampler=AGD["sampler"],
            vae=AGD["base"].get("vae"),
            **({"inception_weights": AGD_INCEPTION} if AGD_USES_INCEPTION else {}),
            **hub_options(
                "agd.base.vae",
                local_files_only=AGD["base"].get("local_files_only", True),
            ),
        ),
        adapters=agd_eval_option("--adapters", "adapters"),
        gd=agd_eval_option("--gd", "gd"),
        train=agd_eval_option("--train", "train"),
        seeds=" ".join(str(s) for s in SEEDS),
    shell:
        stage(
            "repro.agd.evaluate",
            "--method {wildcards.agd_method} --checkpoint {input.checkpoint:q}"
            " --checkpoint-name {wildcards.agd_checkpoint}"
            " {params.adapters} {params.gd} {params.train}"
            " --reference {input.reference:q} --validation {input.validation:q}"
            " --classifier {input.classifier:q} --seeds {params.seeds}"
            " --out {output.table:q} --samples {output.samples:q}",
            rule="agd_eval",
        )


rule agd_fidelity:
    input:
        samples=agd_eval_samples,
        classifier="models/core/digit_classifier.safetensors",
        inception_weights=AGD_INCEPTION if AGD_USES_INCEPTION else [],
    output:
        "results/agd/fidelity/{agd_checkpoint}.csv",
    log:
        "logs/agd/fidelity_{agd_checkpoint}.log",
    benchmark:
        "benchmarks/rules/agd/fidelity_{agd_checkpoint}.tsv"
    conda:
        "../envs/agd.yaml"
    threads: THREADS
    resources:
        mem_mb=3000,
        runtime=30,
        gpu=gpus(),
    params:
        cfg=section(
            "agd",
            "eval",
            **({"inception_weights": AGD_INCEPTION} if AGD_USES_INCEPTION else {}),
        ),
    shell:
        stage(
            "repro.agd.fidelity",
            "--samples {input.samples:q} --classifier {input.classifier:q} --out {output:q}",
            rule="agd_fidelity",
        )


rule agd_table:
    input:
        evaluations=agd_eval_tables(),
        fidelity=expand(
            "results/agd/fidelity/{checkpoint}.csv", checkpoint=AGD_CHECKPOINTS
        ),
    output:
        table=report(
            "results/agd_fid.csv",
            caption="../report/agd_fid.rst",
            category=AGD_LABEL,
            subcategory="Tables",
        ),
        metrics="results/agd_metrics.json",
    log:
        "logs/agd/table.log",
    benchmark:
        "benchmarks/rules/agd/table.tsv"
    conda:
        "../envs/agd.yaml"
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    shell:
        stage(
            "repro.agd.table",
            "--out {output.table:q} --metrics {output.metrics:q}"
            " --fidelity {input.fidelity:q} -- {input.evaluations:q}",
        )


rule agd_throughput:
    input:
        base=rules.agd_base.output.model,
        adapters=AGD_HEADLINE_ADAPTERS,
    output:
        "results/agd_throughput.csv",
    log:
        "logs/agd/throughput.log",
    benchmark:
        "benchmarks/rules/agd/throughput.tsv"
    conda:
        "../envs/agd.yaml"
    # All the cores: nothing else runs beside a timing job.
    threads: workflow.cores
    resources:
        mem_mb=3000,
        runtime=30,
        gpu=gpus(),
    params:
        cfg=section("agd", "throughput", sampler=AGD["sampler"]),
    shell:
        stage(
            "repro.agd.throughput",
            "--base {input.base:q} --adapters {input.adapters:q} --out {output:q}",
            rule="agd_throughput",
        )


rule agd_figures:
    input:
        table=rules.agd_table.output.table,
        throughput=rules.agd_throughput.output[0],
        base=rules.agd_base.output.model,
        # One panel per adapter type (seed 0), the headline type first.
        adapters=agd_grid_adapters(),
        fidelity=expand(
            "results/agd/fidelity/{checkpoint}.csv", checkpoint=AGD_CHECKPOINTS
        ),
    output:
        fid=report(
            "results/figures/agd_fid_vs_w.png",
            caption="../report/agd_fid_vs_w.rst",
            category=AGD_LABEL,
            subcategory="Figures",
        ),
        fidelity=report(
            "results/figures/agd_fidelity_vs_w.png",
            caption="../report/agd_fidelity_vs_w.rst",
            category=AGD_LABEL,
            subcategory="Figures",
        ),
        samples=report(
            "results/figures/agd_samples.png",
            caption="../report/agd_samples.rst",
            category=AGD_LABEL,
            subcategory="Figures",
        ),
        speed=report(
            "results/figures/agd_speed.png",
            caption="../report/agd_speed.rst",
            category=AGD_LABEL,
            subcategory="Figures",
        ),
    log:
        "logs/agd/figures.log",
    benchmark:
        "benchmarks/rules/agd/figures.tsv"
    conda:
        "../envs/agd.yaml"
    threads: THREADS
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        cfg=section("agd", "figures", sampler=AGD["sampler"]),
    shell:
        stage(
            "repro.agd.plots",
            "--table {input.table:q} --throughput {input.throughput:q}"
            " --base {input.base:q} --adapters {input.adapters:q}"
            " --fidelity {input.fidelity:q}"
            " --fid-figure {output.fid:q} --fidelity-figure {output.fidelity:q}"
            " --samples-figure {output.samples:q} --speed-figure {output.speed:q}",
            rule="agd_figures",
        )


rule agd_claims:
    input:
        table=rules.agd_table.output.table,
        throughput=rules.agd_throughput.output[0],
    output:
        "results/claims/agd.csv",
    log:
        "logs/agd/claims.log",
    benchmark:
        "benchmarks/rules/agd/claims.tsv"
    conda:
        "../envs/agd.yaml"
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    params:
        adapter_type=AGD["distill"]["adapter_type"],
    shell:
        stage(
            "repro.agd.claims",
            "--table {input.table:q} --throughput {input.throughput:q}"
            " --adapter-type {params.adapter_type:q} --out {output:q}",
        )
