# AGD: Efficient Distillation of Classifier-Free Guidance using Adapters.
# base -> CFG-guided (and standard) trajectories -> adapters (AGD) / whole-model
# guidance distillation (GD) -> evaluation over w and seeds -> table, figures, claims.
# Registered in repro.agd.workflow (config checks, hub keys, targets); config
# section `agd`, schema schemas/agd.schema.yaml.


include: "agd_common.smk"


# agd_root: "agd" for the main rung; "agd_ladder/<rung>" for a rung of the scale
# ladder (agd.ladder.rungs: the same rules on a bigger or smaller base).
wildcard_constraints:
    agd_root=r"agd|agd_ladder/[A-Za-z0-9_]+",
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
        model=directory("models/{agd_root}/base"),
        metrics="results/{agd_root}/base_metrics.json",
    log:
        "logs/{agd_root}/base.log",
    benchmark:
        "benchmarks/rules/{agd_root}/base.tsv"
    priority: AGD_PRIORITY_BASE
    conda:
        "../envs/agd.yaml"
    threads: BASE_THREADS
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=gpus("agd", "base"),
    params:
        cfg=lambda wildcards: agd_section(
            wildcards, "base", sampler=True, **hub_options("agd.base.pretrained")
        ),
        checkpoints="checkpoints/{agd_root}/base",
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
        base="models/{agd_root}/{agd_checkpoint}",
        train=rules.digits.output.train,
    output:
        directory("data/{agd_root}/trajectories/{agd_checkpoint}/{traj}_s{seed}"),
    log:
        "logs/{agd_root}/trajectories/{agd_checkpoint}_{traj}_s{seed}.log",
    benchmark:
        "benchmarks/rules/{agd_root}/trajectories_{agd_checkpoint}_{traj}_s{seed}.tsv"
    priority: agd_chain_priority
    conda:
        "../envs/agd.yaml"
    threads: THREADS
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=gpus(),
    params:
        cfg=lambda wildcards: agd_section(
            wildcards, "trajectories", sampler=True, seed=int(wildcards.seed)
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
        base="models/{agd_root}/{agd_checkpoint}",
        trajectories="data/{agd_root}/trajectories/{agd_checkpoint}/{traj}_s{seed}",
    output:
        adapters="models/{agd_root}/adapters/{agd_checkpoint}/{traj}_{adapter}_s{seed}.safetensors",
        metrics="results/{agd_root}/distill/{agd_checkpoint}/{traj}_{adapter}_s{seed}.json",
    log:
        "logs/{agd_root}/distill/{agd_checkpoint}_{traj}_{adapter}_s{seed}.log",
    benchmark:
        "benchmarks/rules/{agd_root}/distill_{agd_checkpoint}_{traj}_{adapter}_s{seed}.tsv"
    priority: agd_chain_priority
    conda:
        "../envs/agd.yaml"
    threads: THREADS
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=gpus("agd", "distill"),
    params:
        cfg=lambda wildcards: agd_section(
            wildcards,
            "distill",
            seed=int(wildcards.seed),
            adapter_type=wildcards.adapter,
        ),
        checkpoints="checkpoints/{agd_root}/distill/{agd_checkpoint}/{traj}_{adapter}_s{seed}",
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
        model=directory("models/{agd_root}/gd_s{seed}"),
        metrics="results/{agd_root}/gd/gd_s{seed}.json",
    log:
        "logs/{agd_root}/gd_s{seed}.log",
    benchmark:
        "benchmarks/rules/{agd_root}/gd_s{seed}.tsv"
    priority: AGD_PRIORITY_LONG
    conda:
        "../envs/agd.yaml"
    threads: THREADS
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=gpus("agd", "gd"),
    params:
        cfg=lambda wildcards: agd_section(
            wildcards, "gd", sampler=True, seed=int(wildcards.seed), w_range=True
        ),
        checkpoints="checkpoints/{agd_root}/gd/s{seed}",
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
        model=directory("models/{agd_root}/derived"),
        metrics="results/{agd_root}/transfer_metrics.json",
    log:
        "logs/{agd_root}/transfer.log",
    benchmark:
        "benchmarks/rules/{agd_root}/transfer.tsv"
    conda:
        "../envs/agd.yaml"
    threads: THREADS
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=gpus("agd", "transfer"),
    params:
        cfg=lambda wildcards: agd_section(
            wildcards,
            "transfer",
            sampler=True,
            **hub_options("agd.transfer.pretrained"),
        ),
        checkpoints="checkpoints/{agd_root}/transfer",
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
        table="results/{agd_root}/eval/{agd_checkpoint}/{agd_method}.csv",
        samples="data/{agd_root}/samples/{agd_checkpoint}/{agd_method}.safetensors",
    log:
        "logs/{agd_root}/eval/{agd_checkpoint}_{agd_method}.log",
    benchmark:
        "benchmarks/rules/{agd_root}/eval_{agd_checkpoint}_{agd_method}.tsv"
    priority: agd_chain_priority
    conda:
        "../envs/agd.yaml"
    threads: THREADS
    resources:
        mem_mb=3000,
        runtime=60,
        gpu=gpus(),
    params:
        cfg=lambda wildcards: agd_section(
            wildcards,
            "eval",
            sampler=True,
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
        "results/{agd_root}/fidelity/{agd_checkpoint}.csv",
    log:
        "logs/{agd_root}/fidelity_{agd_checkpoint}.log",
    benchmark:
        "benchmarks/rules/{agd_root}/fidelity_{agd_checkpoint}.tsv"
    conda:
        "../envs/agd.yaml"
    threads: THREADS
    resources:
        mem_mb=3000,
        runtime=30,
        gpu=gpus(),
    params:
        cfg=lambda wildcards: agd_section(
            wildcards,
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
        evaluations=agd_eval_tables,
        fidelity=agd_fidelity_tables,
    output:
        table=report(
            "results/{agd_root}_fid.csv",
            caption="../report/agd_fid.rst",
            category=AGD_LABEL,
            subcategory="Tables",
        ),
        metrics="results/{agd_root}_metrics.json",
    log:
        "logs/{agd_root}/table.log",
    benchmark:
        "benchmarks/rules/{agd_root}/table.tsv"
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
        base="models/agd/base",
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
        table="results/agd_fid.csv",
        throughput=rules.agd_throughput.output[0],
        base="models/agd/base",
        # One panel per adapter type (seed 0), the headline type first.
        adapters=agd_grid_adapters(),
        fidelity=[
            f"results/agd/fidelity/{checkpoint}.csv"
            for checkpoint in agd_checkpoints("agd")
        ],
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
        table="results/agd_fid.csv",
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


rule agd_ladder:
    input:
        tables=agd_ladder_tables(),
    output:
        table=report(
            "results/agd_ladder.csv",
            caption="../report/agd_ladder.rst",
            category=AGD_LABEL,
            subcategory="Tables",
        ),
        figure=report(
            "results/figures/agd_ladder.png",
            caption="../report/agd_ladder_figure.rst",
            category=AGD_LABEL,
            subcategory="Figures",
        ),
    log:
        "logs/agd/ladder.log",
    benchmark:
        "benchmarks/rules/agd/ladder.tsv"
    conda:
        "../envs/agd.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        cfg=json.dumps(
            {
                "rungs": [
                    {
                        "name": name,
                        "num_layers": agd_config(root)["base"]["model"]["num_layers"],
                    }
                    for name, root in [("main", "agd")]
                    + [(rung, f"agd_ladder/{rung}") for rung in AGD_RUNGS]
                ]
            }
        ),
    shell:
        stage(
            "repro.agd.ladder",
            "--tables {input.tables:q} --out {output.table:q} --figure {output.figure:q}",
            rule="agd_ladder",
        )
