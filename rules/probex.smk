# ProbeX: Learning on Model Weights using Tree Experts (CVPR 2025).
# base models pre-trained on the glyph corpus (one per Model Tree) -> a zoo of
# fine-tunes per tree, each on a random subset of the digit classes, trained
# batched -> probes of one layer's weights (ProbeX, Dense, StatNN; one ProbeX across
# trees; tree experts behind a nearest-base router), epoch chosen on the val models,
# test models scored once -> the layer study; a LoRA zoo of the tiny text-to-image
# model -> probes aligned to the tiny CLIP's text embeddings, scored on classes never
# seen in training (zero-shot) -> tables, figures, claims.
# A tree may instead read existing models (probex.trees[i].zoo_dir: a Model-J-style
# directory): rule probex_zoo_import writes its zoo, and the rest runs unchanged.
# Registered in repro.probex.workflow; config section `probex`, schema
# schemas/probex.schema.yaml.


include: "probex_common.smk"


wildcard_constraints:
    tree="|".join(PROBEX_TREES),
    seed=r"\d+",


rule probex_base:
    input:
        corpus=rules.glyph_corpus.output.corpus,
        val=rules.digits.output.val,
    output:
        model="models/foundation/backbones/{tree}.safetensors",
        metrics="results/foundation/backbones/{tree}.json",
    log:
        "logs/foundation/backbones/{tree}.log",
    benchmark:
        "benchmarks/rules/foundation/backbone_{tree}.tsv"
    wildcard_constraints:
        tree=PROBEX_GENERATED_PATTERN,
    conda:
        "../envs/probex.yaml"
    threads: THREADS
    resources:
        mem_mb=2000,
        runtime=30,
        gpu=gpus(),
    params:
        cfg=lambda wildcards: json.dumps(
            {
                **probex_tree(wildcards.tree),
                "backbone": PROBEX["backbone"],
                # The corpus tail every foundation model holds out (data.corpus.heldout).
                "pretrain": {
                    **PROBEX["pretrain"],
                    "heldout": config["data"]["corpus"]["heldout"],
                },
                "num_classes": PROBEX["num_classes"],
            },
            sort_keys=True,
        ),
        checkpoints="checkpoints/foundation/backbones",
    shell:
        stage(
            "repro.foundation.backbones",
            "--corpus {input.corpus:q} --digits {input.val:q} --out {output.model:q}"
            " --metrics {output.metrics:q} --checkpoint-dir {params.checkpoints:q}",
            rule="probex_base",
        )


rule probex_zoo:
    input:
        base="models/foundation/backbones/{tree}.safetensors",
        train=rules.digits.output.train,
        val=rules.digits.output.val,
    output:
        zoo=directory("data/probex/zoo/{tree}"),
        metrics="results/probex/zoo/{tree}.json",
    log:
        "logs/probex/zoo/{tree}.log",
    benchmark:
        "benchmarks/rules/probex/zoo_{tree}.tsv"
    wildcard_constraints:
        tree=PROBEX_GENERATED_PATTERN,
    conda:
        "../envs/probex.yaml"
    threads: THREADS
    resources:
        mem_mb=4000,
        runtime=120,
        gpu=gpus(),
    params:
        cfg=lambda wildcards: probex_params(
            "zoo", tree=wildcards.tree, **probex_tree(wildcards.tree)
        ),
        checkpoints="checkpoints/probex/zoo",
    shell:
        stage(
            "repro.probex.finetune",
            "--base {input.base:q} --train {input.train:q} --val {input.val:q}"
            " --out {output.zoo:q} --metrics {output.metrics:q}"
            " --checkpoint-dir {params.checkpoints:q}",
            rule="probex_zoo",
        )


# An imported tree's zoo: a manifest naming the models of its zoo_dir where they are.
rule probex_zoo_import:
    input:
        unpack(probex_import_input),
    output:
        zoo=directory("data/probex/zoo/{tree}"),
        metrics="results/probex/zoo/{tree}.json",
    log:
        "logs/probex/zoo/{tree}.log",
    benchmark:
        "benchmarks/rules/probex/zoo_{tree}.tsv"
    wildcard_constraints:
        tree=PROBEX_IMPORTED_PATTERN,
    conda:
        "../envs/probex.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        cfg=lambda wildcards: probex_import_params(wildcards.tree),
        files=probex_import_args,
    shell:
        stage(
            "repro.probex.import_zoo",
            "{params.files} --out {output.zoo:q} --metrics {output.metrics:q}",
            rule="probex_zoo_import",
        )


rule probex_probe:
    input:
        zoos=probex_zoos(),
    output:
        table="results/probex/runs/probe_s{seed}.csv",
        metrics="results/probex/runs/probe_s{seed}.json",
    log:
        "logs/probex/probe_s{seed}.log",
    benchmark:
        "benchmarks/rules/probex/probe_s{seed}.tsv"
    conda:
        "../envs/probex.yaml"
    threads: THREADS
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=gpus(),
    params:
        cfg=lambda wildcards: probex_params("probe", seed=wildcards.seed),
        zoos=lambda wildcards, input: probex_zoo_args(input),
    shell:
        stage(
            "repro.probex.probe",
            "{params.zoos} --out {output.table:q} --metrics {output.metrics:q}",
            rule="probex_probe",
        )


rule probex_layers:
    input:
        zoos=probex_zoos(),
    output:
        table="results/probex/runs/layers_s{seed}.csv",
        metrics="results/probex/runs/layers_s{seed}.json",
    log:
        "logs/probex/layers_s{seed}.log",
    benchmark:
        "benchmarks/rules/probex/layers_s{seed}.tsv"
    conda:
        "../envs/probex.yaml"
    threads: THREADS
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=gpus(),
    params:
        cfg=lambda wildcards: probex_params("probe", seed=wildcards.seed),
        zoos=lambda wildcards, input: probex_zoo_args(input),
    shell:
        stage(
            "repro.probex.layers",
            "{params.zoos} --out {output.table:q} --metrics {output.metrics:q}",
            rule="probex_layers",
        )


rule probex_lora_zoo:
    input:
        corpus=rules.glyph_corpus.output.corpus,
        t2i=foundation_input("t2i"),
    output:
        zoo=directory("data/probex/lora_zoo"),
        metrics="results/probex/lora_zoo.json",
    log:
        "logs/probex/lora_zoo.log",
    benchmark:
        "benchmarks/rules/probex/lora_zoo.tsv"
    conda:
        "../envs/probex.yaml"
    threads: THREADS
    resources:
        mem_mb=4000,
        runtime=120,
        gpu=gpus(),
    params:
        cfg=json.dumps(
            {
                "lora_zoo": PROBEX["lora_zoo"],
                "classnames": PROBEX["classnames"],
                "num_classes": PROBEX["num_classes"],
                # The corpus tail every foundation model holds out: never a LoRA's image.
                "heldout": config["data"]["corpus"]["heldout"],
                "foundation": foundation_params("t2i"),
            },
            sort_keys=True,
        ),
        checkpoints="checkpoints/probex/lora_zoo",
    shell:
        stage(
            "repro.probex.lora_zoo",
            "--corpus {input.corpus:q} --out {output.zoo:q} --metrics {output.metrics:q}"
            " --checkpoint-dir {params.checkpoints:q}",
            rule="probex_lora_zoo",
        )


rule probex_zeroshot:
    input:
        zoo=rules.probex_lora_zoo.output.zoo,
        clip=foundation_input("clip"),
    output:
        table="results/probex/runs/zeroshot_s{seed}.csv",
        metrics="results/probex/runs/zeroshot_s{seed}.json",
    log:
        "logs/probex/zeroshot_s{seed}.log",
    benchmark:
        "benchmarks/rules/probex/zeroshot_s{seed}.tsv"
    conda:
        "../envs/probex.yaml"
    threads: THREADS
    resources:
        mem_mb=2000,
        runtime=30,
        gpu=gpus(),
    params:
        cfg=lambda wildcards: json.dumps(
            {
                "seed": int(wildcards.seed),
                "zeroshot": PROBEX["zeroshot"],
                "classnames": PROBEX["classnames"],
                "foundation": foundation_params("clip"),
            },
            sort_keys=True,
        ),
        manifest=lambda wildcards, input: os.path.join(input.zoo, "manifest.json"),
    shell:
        stage(
            "repro.probex.zeroshot",
            "--zoo {params.manifest:q} --out {output.table:q} --metrics {output.metrics:q}",
            rule="probex_zeroshot",
        )


rule probex_table:
    input:
        runs=probex_runs("probe"),
        layer_runs=probex_runs("layers"),
        zeroshot_runs=probex_runs("zeroshot"),
    output:
        accuracy=report(
            "results/probex_accuracy.csv",
            caption="../report/probex_accuracy.rst",
            category=PROBEX_LABEL,
            subcategory="Tables",
        ),
        layers=report(
            "results/probex_layers.csv",
            caption="../report/probex_layers_table.rst",
            category=PROBEX_LABEL,
            subcategory="Tables",
        ),
        zeroshot=report(
            "results/probex_zeroshot.csv",
            caption="../report/probex_zeroshot_table.rst",
            category=PROBEX_LABEL,
            subcategory="Tables",
        ),
    log:
        "logs/probex/table.log",
    benchmark:
        "benchmarks/rules/probex/table.tsv"
    conda:
        "../envs/probex.yaml"
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    shell:
        stage(
            "repro.probex.table",
            "--runs {input.runs:q} --layer-runs {input.layer_runs:q}"
            " --zeroshot-runs {input.zeroshot_runs:q}"
            " --accuracy-out {output.accuracy:q} --layers-out {output.layers:q}"
            " --zeroshot-out {output.zeroshot:q}",
        )


rule probex_figures:
    input:
        accuracy=rules.probex_table.output.accuracy,
        layers=rules.probex_table.output.layers,
        zeroshot=rules.probex_table.output.zeroshot,
    output:
        accuracy=report(
            "results/figures/probex_accuracy.png",
            caption="../report/probex_accuracy_figure.rst",
            category=PROBEX_LABEL,
            subcategory="Figures",
        ),
        layers=report(
            "results/figures/probex_layers.png",
            caption="../report/probex_layers.rst",
            category=PROBEX_LABEL,
            subcategory="Figures",
        ),
        parameters=report(
            "results/figures/probex_parameters.png",
            caption="../report/probex_parameters.rst",
            category=PROBEX_LABEL,
            subcategory="Figures",
        ),
        zeroshot=report(
            "results/figures/probex_zeroshot.png",
            caption="../report/probex_zeroshot.rst",
            category=PROBEX_LABEL,
            subcategory="Figures",
        ),
    log:
        "logs/probex/figures.log",
    benchmark:
        "benchmarks/rules/probex/figures.tsv"
    conda:
        "../envs/probex.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    shell:
        stage(
            "repro.probex.plots",
            "--accuracy {input.accuracy:q} --layers {input.layers:q}"
            " --accuracy-out {output.accuracy:q} --layers-out {output.layers:q}"
            " --parameters-out {output.parameters:q}"
            " --zeroshot {input.zeroshot:q} --zeroshot-out {output.zeroshot:q}",
        )


rule probex_claims:
    input:
        accuracy=rules.probex_table.output.accuracy,
        zeroshot=rules.probex_table.output.zeroshot,
    output:
        "results/claims/probex.csv",
    log:
        "logs/probex/claims.log",
    benchmark:
        "benchmarks/rules/probex/claims.tsv"
    conda:
        "../envs/probex.yaml"
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    params:
        cfg=json.dumps(PROBEX["claims"]),
    shell:
        stage(
            "repro.probex.claims",
            "--accuracy {input.accuracy:q} --zeroshot {input.zeroshot:q} --out {output:q}"
            " --params {params.cfg:q}",
        )
