# DataDream: Few-shot Guided Dataset Generation (ECCV 2024).
# few real shots -> LoRA on the text-to-image model (DataDream_cls, _dset) ->
# synthetic sets (and the unadapted generator's) -> CLIP LoRA classifiers on real,
# synthetic and real + synthetic data, epoch selected on val, test scored once ->
# tables, figures, claims. Registered in repro.datadream.workflow (config checks,
# targets); config section `datadream`, schema schemas/datadream.schema.yaml. The
# generator and the CLIP are foundation models (rules/foundation_*.smk).


include: "datadream_common.smk"


wildcard_constraints:
    shots=r"\d+",
    seed=r"\d+",
    variant="cls|dset",
    generator="unadapted|cls|dset",
    dd_method="zero_shot|real|synthetic|real_synthetic",
    dd_generator="none|unadapted|cls|dset",


rule datadream_fewshot:
    # Every few-shot set of a seed (datadream.shots) in one process (repro.core.each):
    # each set is a draw of milliseconds behind seconds of start-up.
    input:
        train=datadream_split("train"),
    output:
        data=expand(
            "data/datadream/fewshot/{shots}shot_s{{seed}}.safetensors",
            shots=DATADREAM["shots"],
        ),
        manifest=expand(
            "data/datadream/fewshot/{shots}shot_s{{seed}}.json",
            shots=DATADREAM["shots"],
        ),
    log:
        "logs/datadream/fewshot/s{seed}.log",
    benchmark:
        "benchmarks/rules/datadream/fewshot_s{seed}.tsv"
    conda:
        "../envs/datadream.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        runs=datadream_fewshot_runs,
    shell:
        each_stage("repro.datadream.fewshot")


rule datadream_lora:
    input:
        fewshot="data/datadream/fewshot/{shots}shot_s{seed}.safetensors",
        t2i=foundation_input("t2i"),
    output:
        lora="models/datadream/lora/{variant}_{shots}shot_s{seed}.safetensors",
        metrics="results/datadream/lora/{variant}_{shots}shot_s{seed}.json",
    log:
        "logs/datadream/lora/{variant}_{shots}shot_s{seed}.log",
    benchmark:
        "benchmarks/rules/datadream/lora_{variant}_{shots}shot_s{seed}.tsv"
    conda:
        "../envs/datadream.yaml"
    threads: THREADS
    resources:
        mem_mb=4000,
        runtime=120,
        gpu=gpus(),
    params:
        cfg=lambda wildcards: datadream_params(
            "lora",
            wildcards.seed,
            shots=int(wildcards.shots),
            foundation=foundation_params("t2i"),
        ),
        checkpoints="checkpoints/datadream/lora",
    shell:
        stage(
            "repro.datadream.lora",
            "--fewshot {input.fewshot:q} --variant {wildcards.variant}"
            " --out {output.lora:q} --metrics {output.metrics:q}"
            " --checkpoint-dir {params.checkpoints:q}",
            rule="datadream_lora",
        )


rule datadream_generate:
    input:
        lora=datadream_lora_input,
        t2i=foundation_input("t2i"),
    output:
        data="data/datadream/synthetic/{generator}_{shots}shot_s{seed}.safetensors",
        manifest="data/datadream/synthetic/{generator}_{shots}shot_s{seed}.json",
        metrics="results/datadream/generate/{generator}_{shots}shot_s{seed}.json",
    log:
        "logs/datadream/generate/{generator}_{shots}shot_s{seed}.log",
    benchmark:
        "benchmarks/rules/datadream/generate_{generator}_{shots}shot_s{seed}.tsv"
    conda:
        "../envs/datadream.yaml"
    threads: THREADS
    resources:
        mem_mb=4000,
        runtime=120,
        gpu=gpus(),
    params:
        cfg=lambda wildcards: datadream_params(
            "generate",
            wildcards.seed,
            shots=int(wildcards.shots),
            generator=wildcards.generator,
            n_per_class=DATADREAM_N_MAX,
            foundation=foundation_params("t2i"),
        ),
        lora=lambda wildcards, input: (
            f"--lora {shlex.quote(input.lora[0])}" if input.lora else ""
        ),
    shell:
        stage(
            "repro.datadream.generate",
            "{params.lora} --out {output.data:q} --metrics {output.metrics:q}",
            rule="datadream_generate",
        )


rule datadream_fid:
    input:
        synthetic="data/datadream/synthetic/{generator}_{shots}shot_s{seed}.safetensors",
        reference=datadream_split("test"),
        classifier=rules.digit_classifier.output.model,
    output:
        "results/datadream/fid/{generator}_{shots}shot_s{seed}.json",
    log:
        "logs/datadream/fid/{generator}_{shots}shot_s{seed}.log",
    benchmark:
        "benchmarks/rules/datadream/fid_{generator}_{shots}shot_s{seed}.tsv"
    conda:
        "../envs/datadream.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=20,
        gpu=gpus(),
    params:
        cfg=section("datadream", "fid"),
    shell:
        stage(
            "repro.datadream.fid",
            "--synthetic {input.synthetic:q} --reference {input.reference:q}"
            " --classifier {input.classifier:q} --out {output:q}",
            rule="datadream_fid",
        )


rule datadream_classify:
    input:
        unpack(datadream_run_inputs),
        val=datadream_split("val"),
        test=datadream_split("test"),
        clip=foundation_input("clip"),
    output:
        table="results/datadream/runs/{dd_method}_{dd_generator}_{shots}shot_s{seed}.csv",
        metrics="results/datadream/runs/{dd_method}_{dd_generator}_{shots}shot_s{seed}.json",
    log:
        "logs/datadream/runs/{dd_method}_{dd_generator}_{shots}shot_s{seed}.log",
    benchmark:
        "benchmarks/rules/datadream/classify_{dd_method}_{dd_generator}_{shots}shot_s{seed}.tsv"
    wildcard_constraints:
        # zero_shot and real: datadream_classify_real, a seed's runs in one job.
        dd_method="synthetic|real_synthetic",
    conda:
        "../envs/datadream.yaml"
    threads: THREADS
    resources:
        mem_mb=3000,
        runtime=60,
        gpu=gpus(),
    params:
        cfg=lambda wildcards: datadream_classifier_params(
            wildcards.shots, wildcards.seed
        ),
        data=datadream_data_args,
        checkpoints="checkpoints/datadream/classify",
    shell:
        stage(
            "repro.datadream.classify",
            "{params.data} --val {input.val:q} --test {input.test:q}"
            " --method {wildcards.dd_method} --generator {wildcards.dd_generator}"
            " --out {output.table:q} --metrics {output.metrics:q}"
            " --checkpoint-dir {params.checkpoints:q}",
            rule="datadream_classify",
        )


rule datadream_classify_real:
    # Zero-shot CLIP and the real-only classifiers (every datadream.shots) of a seed,
    # in one process (repro.core.each): small runs whose start-up (torch,
    # transformers) is half their time. Each run is datadream_classify's command.
    input:
        fewshot=lambda wildcards: [
            datadream_fewshot(shots, wildcards.seed) for shots in DATADREAM["shots"]
        ],
        val=datadream_split("val"),
        test=datadream_split("test"),
        clip=foundation_input("clip"),
    output:
        tables=expand(
            "results/datadream/runs/{run}_s{{seed}}.csv", run=DATADREAM_REAL_RUNS
        ),
        metrics=expand(
            "results/datadream/runs/{run}_s{{seed}}.json", run=DATADREAM_REAL_RUNS
        ),
    log:
        "logs/datadream/runs/real_s{seed}.log",
    benchmark:
        "benchmarks/rules/datadream/classify_real_s{seed}.tsv"
    conda:
        "../envs/datadream.yaml"
    threads: THREADS
    resources:
        mem_mb=3000,
        runtime=120,
        gpu=gpus(),
    params:
        runs=datadream_real_runs,
    shell:
        each_stage("repro.datadream.classify")


rule datadream_table:
    input:
        runs=datadream_runs(),
        fid=datadream_fids(),
    output:
        accuracy=report(
            "results/datadream_accuracy.csv",
            caption="../report/datadream_accuracy.rst",
            category=DATADREAM_LABEL,
            subcategory="Tables",
        ),
        fid=report(
            "results/datadream_fid.csv",
            caption="../report/datadream_fid.rst",
            category=DATADREAM_LABEL,
            subcategory="Tables",
        ),
    log:
        "logs/datadream/table.log",
    benchmark:
        "benchmarks/rules/datadream/table.tsv"
    conda:
        "../envs/datadream.yaml"
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    shell:
        stage(
            "repro.datadream.table",
            "--runs {input.runs:q} --fid {input.fid:q}"
            " --accuracy-out {output.accuracy:q} --fid-out {output.fid:q}",
        )


rule datadream_figures:
    input:
        accuracy=rules.datadream_table.output.accuracy,
        fid=rules.datadream_table.output.fid,
        fewshot=datadream_fewshot(DATADREAM["main_shots"], SEEDS[0]),
        synthetic=list(datadream_grid_sets().values()),
    output:
        main=report(
            "results/figures/datadream_main.png",
            caption="../report/datadream_main.rst",
            category=DATADREAM_LABEL,
            subcategory="Figures",
        ),
        n_synthetic=report(
            "results/figures/datadream_n_synthetic.png",
            caption="../report/datadream_n_synthetic.rst",
            category=DATADREAM_LABEL,
            subcategory="Figures",
        ),
        shots=report(
            "results/figures/datadream_shots.png",
            caption="../report/datadream_shots.rst",
            category=DATADREAM_LABEL,
            subcategory="Figures",
        ),
        samples=report(
            "results/figures/datadream_samples.png",
            caption="../report/datadream_samples.rst",
            category=DATADREAM_LABEL,
            subcategory="Figures",
        ),
    log:
        "logs/datadream/figures.log",
    benchmark:
        "benchmarks/rules/datadream/figures.tsv"
    conda:
        "../envs/datadream.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        cfg=json.dumps(
            {
                "main_shots": DATADREAM["main_shots"],
                "classnames": DATADREAM["classnames"],
            }
        ),
        synthetic=" ".join(
            shlex.quote(f"{generator}={path}")
            for generator, path in datadream_grid_sets().items()
        ),
    shell:
        stage(
            "repro.datadream.plots",
            "--accuracy {input.accuracy:q} --fid {input.fid:q}"
            " --fewshot {input.fewshot:q} --synthetic {params.synthetic}"
            " --main-out {output.main:q} --n-synthetic-out {output.n_synthetic:q}"
            " --shots-out {output.shots:q} --samples-out {output.samples:q}",
            rule="datadream_figures",
        )


rule datadream_claims:
    input:
        accuracy=rules.datadream_table.output.accuracy,
        fid=rules.datadream_table.output.fid,
    output:
        "results/claims/datadream.csv",
    log:
        "logs/datadream/claims.log",
    benchmark:
        "benchmarks/rules/datadream/claims.tsv"
    conda:
        "../envs/datadream.yaml"
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    params:
        cfg=json.dumps({"main_shots": DATADREAM["main_shots"]}),
    shell:
        stage(
            "repro.datadream.claims",
            "--accuracy {input.accuracy:q} --fid {input.fid:q} --out {output:q}"
            " --params {params.cfg:q}",
        )
