# HuMo: Human-Centric Video Generation via Collaborative Multi-Modal Conditioning
# (arXiv 2509.08519). Talking faces -> the text-to-video foundation (foundation_t2v) ->
# audio features -> stage 1 (text + reference, self-attention only) -> stage 2 (audio
# cross-attention, focus-by-predicting) per variant of the paper's ablation -> test
# clips generated for TI, TA and TIA with multi-condition CFG -> metrics read by judges
# trained on the real clips -> table, figures, claims.
# Registered in repro.humo.workflow; config section `humo`, schema
# schemas/humo.schema.yaml.


include: "humo_common.smk"


wildcard_constraints:
    faces_split="|".join(FACES_SPLITS),
    humo_variant="|".join(HUMO["variants"]),
    stage1_kind="minimal|full_finetune",
    seed=r"\d+",


rule humo_audio:
    # Audio features per video frame: log-mel (tiny) or Whisper's grouped layers (paper).
    input:
        hub_input("humo.audio.pretrained"),
        faces="data/faces/{faces_split}.safetensors",
    output:
        "data/humo/audio_{faces_split}.safetensors",
    log:
        "logs/humo/audio_{faces_split}.log",
    benchmark:
        "benchmarks/rules/humo/audio_{faces_split}.tsv"
    conda:
        "../envs/humo.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
        gpu=gpus(),
    params:
        cfg=lambda wildcards: humo_model_params(),
    shell:
        stage(
            "repro.humo.audio",
            "--faces {input.faces:q} --out {output:q}",
            rule="humo_audio",
        )


rule humo_stage1:
    # Stage 1: text + reference image; self-attention only ("minimal") or every
    # transformer weight ("full_finetune", the ablation). Audio is off.
    input:
        foundation_input("t2v"),
        faces="data/faces/train.safetensors",
        audio="data/humo/audio_train.safetensors",
    output:
        model=directory("models/humo/stage1_{stage1_kind}_s{seed}"),
        metrics="results/humo/train/stage1_{stage1_kind}_s{seed}.json",
    log:
        "logs/humo/stage1_{stage1_kind}_s{seed}.log",
    benchmark:
        "benchmarks/rules/humo/stage1_{stage1_kind}_s{seed}.tsv"
    conda:
        "../envs/humo.yaml"
    # A 0.1M-parameter transformer on 640 tokens splits badly: one thread, two jobs side by side.
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=gpus("humo", "train"),
    params:
        cfg=lambda wildcards: humo_train_params(
            "1", wildcards.stage1_kind, wildcards.seed
        ),
        checkpoints="checkpoints/humo",
    shell:
        stage(
            "repro.humo.train",
            "--faces {input.faces:q} --audio {input.audio:q} --out {output.model:q}"
            " --metrics {output.metrics:q} --checkpoint-dir {params.checkpoints:q}",
            rule="humo_stage1",
            processes=processes("humo", "train"),
        )


rule humo_stage2:
    # Stage 2 from a stage-1 model: the audio modules (and focus-by-predicting unless
    # the variant is no_focus); one stage from the foundation for no_progressive.
    input:
        foundation_input("t2v"),
        faces="data/faces/train.safetensors",
        audio="data/humo/audio_train.safetensors",
        init=lambda wildcards: (
            []
            if wildcards.humo_variant == "no_progressive"
            else humo_stage1_input(wildcards)
        ),
    output:
        model=directory("models/humo/{humo_variant}_s{seed}"),
        metrics="results/humo/train/{humo_variant}_s{seed}.json",
    log:
        "logs/humo/stage2_{humo_variant}_s{seed}.log",
    benchmark:
        "benchmarks/rules/humo/stage2_{humo_variant}_s{seed}.tsv"
    conda:
        "../envs/humo.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=gpus("humo", "train"),
    params:
        cfg=lambda wildcards: humo_train_params(
            "joint" if wildcards.humo_variant == "no_progressive" else "2",
            wildcards.humo_variant,
            wildcards.seed,
        ),
        checkpoints="checkpoints/humo",
        init=lambda wildcards, input: (
            f"--init {shlex.quote(input.init)}" if input.init else ""
        ),
    shell:
        stage(
            "repro.humo.train",
            "--faces {input.faces:q} --audio {input.audio:q} {params.init}"
            " --out {output.model:q} --metrics {output.metrics:q}"
            " --checkpoint-dir {params.checkpoints:q}",
            rule="humo_stage2",
            processes=processes("humo", "train"),
        )


rule humo_generate:
    # The first humo.generate.clips test clips for every (task, CFG form) of the variant.
    input:
        foundation_input("t2v"),
        model="models/humo/{humo_variant}_s{seed}",
        faces="data/faces/test.safetensors",
        audio="data/humo/audio_test.safetensors",
    output:
        directory("results/humo/generated/{humo_variant}_s{seed}"),
    log:
        "logs/humo/generate_{humo_variant}_s{seed}.log",
    benchmark:
        "benchmarks/rules/humo/generate_{humo_variant}_s{seed}.tsv"
    conda:
        "../envs/humo.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=gpus(),
    params:
        cfg=lambda wildcards: humo_generate_params(
            wildcards.humo_variant, wildcards.seed
        ),
    shell:
        stage(
            "repro.humo.generate",
            "sample --model {input.model:q} --faces {input.faces:q}"
            " --audio {input.audio:q} --out-dir {output:q}",
            rule="humo_generate",
        )


rule humo_judges:
    # The evaluators, trained on the real training clips: identity encoder, mouth
    # reader, scene reader (motion, background).
    input:
        train="data/faces/train.safetensors",
        val="data/faces/val.safetensors",
    output:
        judges="models/humo/judges.safetensors",
        metrics="results/humo/judges.json",
    log:
        "logs/humo/judges.log",
    benchmark:
        "benchmarks/rules/humo/judges.tsv"
    conda:
        "../envs/humo.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        cfg=section("humo", "judges"),
    shell:
        stage(
            "repro.humo.evaluate",
            "judges --faces-train {input.train:q} --faces-val {input.val:q}"
            " --out {output.judges:q} --metrics {output.metrics:q}",
            rule="humo_judges",
        )


rule humo_metrics:
    # One row per generated set of the variant and seed.
    input:
        judges=rules.humo_judges.output.judges,
        generated="results/humo/generated/{humo_variant}_s{seed}",
        faces="data/faces/test.safetensors",
    output:
        "results/humo/metrics/{humo_variant}_s{seed}.json",
    log:
        "logs/humo/metrics_{humo_variant}_s{seed}.log",
    benchmark:
        "benchmarks/rules/humo/metrics_{humo_variant}_s{seed}.tsv"
    conda:
        "../envs/humo.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=20,
    params:
        cfg=section("humo", "evaluate"),
    shell:
        stage(
            "repro.humo.evaluate",
            "metrics --judges {input.judges:q} --generated {input.generated:q}"
            " --faces-test {input.faces:q} --out {output:q}",
            rule="humo_metrics",
        )


rule humo_metrics_real:
    # The test clips themselves, measured as a generated set would be: the reference row.
    input:
        judges=rules.humo_judges.output.judges,
        faces="data/faces/test.safetensors",
    output:
        "results/humo/metrics/real.json",
    log:
        "logs/humo/metrics_real.log",
    benchmark:
        "benchmarks/rules/humo/metrics_real.tsv"
    conda:
        "../envs/humo.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=20,
    params:
        cfg=section("humo", "evaluate", clips=HUMO["generate"]["clips"]),
    shell:
        stage(
            "repro.humo.evaluate",
            "metrics --judges {input.judges:q} --real --faces-test {input.faces:q}"
            " --out {output:q}",
            rule="humo_metrics_real",
        )


rule humo_table:
    input:
        humo_metric_rows(),
    output:
        metrics=report(
            "results/humo_metrics.csv",
            caption="../report/humo_metrics.rst",
            category=HUMO_LABEL,
            subcategory="Tables",
        ),
        curves="results/humo_sync_curves.csv",
    log:
        "logs/humo/table.log",
    benchmark:
        "benchmarks/rules/humo/table.tsv"
    conda:
        "../envs/humo.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    shell:
        stage(
            "repro.humo.table",
            "--rows {input:q} --out {output.metrics:q} --curves {output.curves:q}",
        )


rule humo_strips:
    # A few test clips of the full model (first seed) per task, with the real clip.
    input:
        generated=f"results/humo/generated/full_s{SEEDS[0]}",
        faces="data/faces/test.safetensors",
    output:
        "results/humo/strips.safetensors",
    log:
        "logs/humo/strips.log",
    benchmark:
        "benchmarks/rules/humo/strips.tsv"
    conda:
        "../envs/humo.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        cfg=section("humo", "generate"),
    shell:
        stage(
            "repro.humo.generate",
            "strips --generated {input.generated:q} --faces {input.faces:q}"
            " --out {output:q}",
        )


rule humo_figures:
    input:
        metrics=rules.humo_table.output.metrics,
        curves=rules.humo_table.output.curves,
        strips=rules.humo_strips.output,
    output:
        ablation=report(
            "results/figures/humo_ablation.png",
            caption="../report/humo_ablation.rst",
            category=HUMO_LABEL,
            subcategory="Figures",
        ),
        sync=report(
            "results/figures/humo_sync.png",
            caption="../report/humo_sync.rst",
            category=HUMO_LABEL,
            subcategory="Figures",
        ),
        cfg=report(
            "results/figures/humo_cfg.png",
            caption="../report/humo_cfg.rst",
            category=HUMO_LABEL,
            subcategory="Figures",
        ),
        strips=report(
            "results/figures/humo_strips.png",
            caption="../report/humo_strips.rst",
            category=HUMO_LABEL,
            subcategory="Figures",
        ),
    log:
        "logs/humo/figures.log",
    benchmark:
        "benchmarks/rules/humo/figures.tsv"
    conda:
        "../envs/humo.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        cfg=json.dumps({"cfg": HUMO["generate"]["cfg"], "variant": "full"}),
        out_dir=lambda wildcards, output: os.path.dirname(output.ablation),
    shell:
        stage(
            "repro.humo.plots",
            "--metrics {input.metrics:q} --curves {input.curves:q}"
            " --strips {input.strips:q} --out-dir {params.out_dir:q}"
            " --params {params.cfg:q}",
        )


rule humo_claims:
    input:
        metrics=rules.humo_table.output.metrics,
    output:
        "results/claims/humo.csv",
    log:
        "logs/humo/claims.log",
    benchmark:
        "benchmarks/rules/humo/claims.tsv"
    conda:
        "../envs/humo.yaml"
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    params:
        cfg=section("humo", "claims"),
    shell:
        stage(
            "repro.humo.claims",
            "--metrics {input.metrics:q} --out {output:q} --params {params.cfg:q}",
        )
