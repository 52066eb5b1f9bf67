# FedRE: Representation Entanglement for Model-Heterogeneous Federated Learning (CVPR 2026).
# a task (the digits, or glyphs of 47 characters) spread over ten clients (Dirichlet or
# pathological), each with its own architecture -> every algorithm (Local, FedProto,
# FedGH, LG-FedAvg, FedTGP, FedRE, FedAllRep) simulated round by round on the same
# clients, every client evaluated on its own test split after every round, every
# message counted as serialised -> tables, figures, claims.
# Registered in repro.fedre.workflow; config section `fedre`, schema
# schemas/fedre.schema.yaml.


include: "fedre_common.smk"


wildcard_constraints:
    fedre_task="|".join(FEDRE["tasks"]),
    fedre_partition="|".join(FEDRE["partitions"]),
    fedre_algorithm="|".join(FEDRE["flower"]["algorithms"]) or "^$",
    seed=r"\d+",


rule fedre_glyphs:
    # A many-class task's images: glyphs of fedre.tasks.<task>.chars.
    output:
        "data/fedre/{fedre_task}.safetensors",
    log:
        "logs/fedre/glyphs_{fedre_task}.log",
    benchmark:
        "benchmarks/rules/fedre/glyphs_{fedre_task}.tsv"
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        cfg=lambda wildcards: fedre_glyph_params(wildcards.fedre_task),
    shell:
        stage("repro.core.data", "glyphs --out {output:q}", rule="fedre_glyphs")


rule fedre_aux:
    # The inversion attack's public images (fedre.privacy.aux): glyphs of the task's
    # characters with a seed of their own, never a client's data.
    output:
        "data/fedre/{fedre_task}_aux.safetensors",
    log:
        "logs/fedre/aux_{fedre_task}.log",
    benchmark:
        "benchmarks/rules/fedre/aux_{fedre_task}.tsv"
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        cfg=lambda wildcards: fedre_aux_params(wildcards.fedre_task),
    shell:
        stage("repro.core.data", "glyphs --out {output:q}", rule="fedre_aux")


rule fedre_simulate:
    input:
        data=lambda wildcards: fedre_task_data(wildcards.fedre_task),
        aux=lambda wildcards: fedre_aux(wildcards.fedre_task),
    output:
        table="results/fedre/runs/{fedre_task}_{fedre_partition}_s{seed}.csv",
        comm="results/fedre/runs/{fedre_task}_{fedre_partition}_s{seed}_comm.csv",
        privacy="results/fedre/runs/{fedre_task}_{fedre_partition}_s{seed}_privacy.csv",
        examples="results/fedre/runs/{fedre_task}_{fedre_partition}_s{seed}_inversion.safetensors",
        metrics="results/fedre/runs/{fedre_task}_{fedre_partition}_s{seed}.json",
    log:
        "logs/fedre/simulate_{fedre_task}_{fedre_partition}_s{seed}.log",
    benchmark:
        "benchmarks/rules/fedre/simulate_{fedre_task}_{fedre_partition}_s{seed}.tsv"
    conda:
        "../envs/fedre.yaml"
    # Ten small models trained one after another: a second thread only adds contention.
    threads: 1
    resources:
        mem_mb=2000,
        runtime=60,
        gpu=gpus(),
    params:
        cfg=lambda wildcards: fedre_simulate_params(
            wildcards.fedre_task, wildcards.fedre_partition, wildcards.seed
        ),
        checkpoints="checkpoints/fedre",
        aux=lambda wildcards, input: " ".join(
            f"--aux {shlex.quote(path)}" for path in input.aux
        ),
    shell:
        stage(
            "repro.fedre.simulate",
            "--data {input.data:q} {params.aux} --out {output.table:q}"
            " --comm-out {output.comm:q} --privacy-out {output.privacy:q}"
            " --privacy-examples {output.examples:q}"
            " --metrics {output.metrics:q} --checkpoint-dir {params.checkpoints:q}",
            rule="fedre_simulate",
        )


rule fedre_flower:
    # One algorithm on Flower's deployment mode: a SuperLink and one SuperNode per
    # client as processes on 127.0.0.1, all stopped by PID at the end
    # (repro.fedre.flower_run). The same rounds as fedre_simulate: its tables equal that
    # algorithm's rows of the simulation. On demand, e.g.
    #   snakemake --cores 2 results/fedre/flower/digits_dir_s0_fedre.csv
    input:
        data=lambda wildcards: fedre_task_data(wildcards.fedre_task),
    output:
        table="results/fedre/flower/{fedre_task}_{fedre_partition}_s{seed}_{fedre_algorithm}.csv",
        comm="results/fedre/flower/{fedre_task}_{fedre_partition}_s{seed}_{fedre_algorithm}_comm.csv",
        final="results/fedre/flower/{fedre_task}_{fedre_partition}_s{seed}_{fedre_algorithm}_final.safetensors",
        metrics="results/fedre/flower/{fedre_task}_{fedre_partition}_s{seed}_{fedre_algorithm}.json",
    log:
        "logs/fedre/flower_{fedre_task}_{fedre_partition}_s{seed}_{fedre_algorithm}.log",
    benchmark:
        "benchmarks/rules/fedre/flower_{fedre_task}_{fedre_partition}_s{seed}_{fedre_algorithm}.tsv"
    conda:
        "../envs/fedre.yaml"
    # Eleven processes (a SuperLink, ten SuperNodes and their ClientApps), one torch
    # thread each (as fedre_simulate: the same sums in the same order, the same
    # numbers): they take turns, the server waits for the slowest client.
    threads: 1
    resources:
        mem_mb=8000,
        runtime=120,
    params:
        cfg=lambda wildcards: fedre_flower_params(
            wildcards.fedre_task,
            wildcards.fedre_partition,
            wildcards.seed,
            wildcards.fedre_algorithm,
        ),
        workdir=lambda wildcards: (
            f"work/fedre/flower/{wildcards.fedre_task}_{wildcards.fedre_partition}"
            f"_s{wildcards.seed}_{wildcards.fedre_algorithm}"
        ),
        timeout=FEDRE["flower"]["timeout_s"],
    shell:
        stage(
            "repro.fedre.flower_run",
            "--data {input.data:q} --out {output.table:q} --comm-out {output.comm:q}"
            " --final-out {output.final:q} --metrics {output.metrics:q}"
            " --workdir {params.workdir:q} --timeout-s {params.timeout:q}",
            rule="fedre_flower",
        )


rule fedre_ablation:
    # FedRE with one part of its entanglement changed (fedre.ablation.variants), on
    # fedre.ablation's task and partition, one seed per job.
    input:
        data=fedre_task_data(FEDRE["ablation"]["task"]),
    output:
        table="results/fedre/runs/ablation_s{seed}.csv",
        metrics="results/fedre/runs/ablation_s{seed}.json",
    log:
        "logs/fedre/ablation_s{seed}.log",
    benchmark:
        "benchmarks/rules/fedre/ablation_s{seed}.tsv"
    conda:
        "../envs/fedre.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=60,
        gpu=gpus(),
    params:
        cfg=lambda wildcards: fedre_ablation_params(wildcards.seed),
    shell:
        stage(
            "repro.fedre.ablation",
            "--data {input.data:q} --out {output.table:q} --metrics {output.metrics:q}",
            rule="fedre_ablation",
        )


rule fedre_table:
    input:
        runs=fedre_runs(),
        comm_runs=fedre_runs("_comm"),
        ablation_runs=expand("results/fedre/runs/ablation_s{seed}.csv", seed=SEEDS),
        privacy_runs=fedre_runs("_privacy"),
    output:
        accuracy=report(
            "results/fedre_accuracy.csv",
            caption="../report/fedre_accuracy.rst",
            category=FEDRE_LABEL,
            subcategory="Tables",
        ),
        summary=report(
            "results/fedre_summary.csv",
            caption="../report/fedre_summary.rst",
            category=FEDRE_LABEL,
            subcategory="Tables",
        ),
        communication=report(
            "results/fedre_communication.csv",
            caption="../report/fedre_communication.rst",
            category=FEDRE_LABEL,
            subcategory="Tables",
        ),
        ablation=report(
            "results/fedre_ablation.csv",
            caption="../report/fedre_ablation.rst",
            category=FEDRE_LABEL,
            subcategory="Tables",
        ),
        privacy=report(
            "results/fedre_privacy.csv",
            caption="../report/fedre_privacy.rst",
            category=FEDRE_LABEL,
            subcategory="Tables",
        ),
    log:
        "logs/fedre/table.log",
    benchmark:
        "benchmarks/rules/fedre/table.tsv"
    conda:
        "../envs/fedre.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        cfg=json.dumps({"last_rounds": FEDRE["last_rounds"]}),
    shell:
        stage(
            "repro.fedre.table",
            "--runs {input.runs:q} --comm-runs {input.comm_runs:q}"
            " --accuracy-out {output.accuracy:q} --summary-out {output.summary:q}"
            " --communication-out {output.communication:q}"
            " --ablation-runs {input.ablation_runs:q} --ablation-out {output.ablation:q}"
            " --privacy-runs {input.privacy_runs:q} --privacy-out {output.privacy:q}"
            " --params {params.cfg:q}",
        )


rule fedre_figures:
    input:
        accuracy=rules.fedre_table.output.accuracy,
        summary=rules.fedre_table.output.summary,
        communication=rules.fedre_table.output.communication,
        ablation=rules.fedre_table.output.ablation,
        privacy=rules.fedre_table.output.privacy,
        examples=fedre_runs("_inversion", "safetensors"),
    output:
        curves=report(
            "results/figures/fedre_curves.png",
            caption="../report/fedre_curves.rst",
            category=FEDRE_LABEL,
            subcategory="Figures",
        ),
        communication=report(
            "results/figures/fedre_communication.png",
            caption="../report/fedre_communication_figure.rst",
            category=FEDRE_LABEL,
            subcategory="Figures",
        ),
        ablation=report(
            "results/figures/fedre_ablation.png",
            caption="../report/fedre_ablation_figure.rst",
            category=FEDRE_LABEL,
            subcategory="Figures",
        ),
        inversion=report(
            "results/figures/fedre_inversion.png",
            caption="../report/fedre_inversion.rst",
            category=FEDRE_LABEL,
            subcategory="Figures",
        ),
    log:
        "logs/fedre/figures.log",
    benchmark:
        "benchmarks/rules/fedre/figures.tsv"
    conda:
        "../envs/fedre.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    shell:
        stage(
            "repro.fedre.plots",
            "--accuracy {input.accuracy:q} --communication {input.communication:q}"
            " --summary {input.summary:q} --curves-out {output.curves:q}"
            " --communication-out {output.communication:q}"
            " --ablation {input.ablation:q} --ablation-out {output.ablation:q}"
            " --privacy {input.privacy:q} --inversion-examples {input.examples:q}"
            " --inversion-out {output.inversion:q}",
        )


rule fedre_claims:
    input:
        summary=rules.fedre_table.output.summary,
        communication=rules.fedre_table.output.communication,
        privacy=rules.fedre_table.output.privacy,
    output:
        "results/claims/fedre.csv",
    log:
        "logs/fedre/claims.log",
    benchmark:
        "benchmarks/rules/fedre/claims.tsv"
    conda:
        "../envs/fedre.yaml"
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    params:
        cfg=json.dumps(FEDRE["claims"]),
    shell:
        stage(
            "repro.fedre.claims",
            "--summary {input.summary:q} --communication {input.communication:q}"
            " --privacy {input.privacy:q} --out {output:q} --params {params.cfg:q}",
        )
