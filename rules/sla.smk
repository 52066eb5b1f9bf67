# SLA: Beyond Sparsity in Diffusion Transformers via Fine-Tunable Sparse-Linear
# Attention. The fused kernels live in repro.kernels (Triton on CUDA, a blockwise
# PyTorch path on CPU); the attention module and diffusers processors in repro.sla.
# Kernels: sla_kernel_bench (GPU). Quality: talking faces at SLA's size -> the
# text-to-video foundation (shared with HuMo) fine-tuned per attention variant and seed
# -> losses, samples, attention FLOPs and time -> frame FID (a frame encoder trained on
# real frames) -> results/sla_quality.csv -> claims, figures.
# Registered in repro.sla.workflow (config checks, targets); config section `sla`,
# schema schemas/sla.schema.yaml.


include: "sla_common.smk"


wildcard_constraints:
    sla_variant="|".join(SLA_VARIANTS),
    sla_image_variant="|".join(SLA_IMAGE_VARIANTS),
    seed=r"\d+",


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


rule sla_faces:
    # Talking faces drawn at SLA's size (data.faces with sla.quality.faces on top).
    output:
        train="data/sla/faces/train.safetensors",
        val="data/sla/faces/val.safetensors",
        test="data/sla/faces/test.safetensors",
        manifest="data/sla/faces/manifest.json",
    log:
        "logs/sla/faces.log",
    benchmark:
        "benchmarks/rules/sla/faces.tsv"
    conda:
        "../envs/foundation.yaml"
    threads: 1
    resources:
        # Reading real clips (data.faces.root) holds a whole split (rule faces' values).
        mem_mb=16000 if config["data"]["faces"].get("root") else 2000,
        runtime=120 if config["data"]["faces"].get("root") else 10,
    params:
        cfg=lambda wildcards: sla_faces_params(),
        out_dir=lambda wildcards, output: os.path.dirname(output.manifest),
    shell:
        stage(
            "repro.foundation.faces", "--out-dir {params.out_dir:q}", rule="sla_faces"
        )


rule sla_finetune:
    # The whole foundation fine-tuned with one attention variant installed; the same
    # steps, batches and noise for every variant.
    input:
        foundation_input("t2v"),
        faces=rules.sla_faces.output.train,
    output:
        model=directory("models/sla/{sla_variant}_s{seed}"),
        metrics="results/sla/finetune/{sla_variant}_s{seed}.json",
    log:
        "logs/sla/finetune_{sla_variant}_s{seed}.log",
    benchmark:
        "benchmarks/rules/sla/finetune_{sla_variant}_s{seed}.tsv"
    conda:
        "../envs/sla.yaml"
    # A 0.1M-parameter model on 576 tokens splits badly: one thread, jobs side by side.
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=gpus(),
    params:
        cfg=lambda wildcards: sla_finetune_params(wildcards.sla_variant, wildcards.seed),
        checkpoints="checkpoints/sla",
    shell:
        stage(
            "repro.sla.finetune",
            "--faces {input.faces:q} --out {output.model:q} --metrics {output.metrics:q}"
            " --checkpoint-dir {params.checkpoints:q}",
            rule="sla_finetune",
        )


rule sla_sample:
    # Val/test losses, samples of the test captions, attention FLOPs and time.
    input:
        model=rules.sla_finetune.output.model,
        finetune=rules.sla_finetune.output.metrics,
        val=rules.sla_faces.output.val,
        test=rules.sla_faces.output.test,
    output:
        samples="results/sla/samples/{sla_variant}_s{seed}.safetensors",
        row="results/sla/rows/{sla_variant}_s{seed}.json",
    log:
        "logs/sla/sample_{sla_variant}_s{seed}.log",
    benchmark:
        "benchmarks/rules/sla/sample_{sla_variant}_s{seed}.tsv"
    conda:
        "../envs/sla.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
        gpu=gpus(),
    params:
        cfg=sla_sample_params(),
    shell:
        stage(
            "repro.sla.sample",
            "--model {input.model:q} --finetune-metrics {input.finetune:q}"
            " --faces-val {input.val:q} --faces-test {input.test:q}"
            " --out {output.samples:q} --row {output.row:q}",
            rule="sla_sample",
        )


rule sla_judge:
    # The frame encoder of frame FID, trained on the real training frames.
    input:
        train=rules.sla_faces.output.train,
        val=rules.sla_faces.output.val,
    output:
        judge="models/sla/judge.safetensors",
        metrics="results/sla/judge.json",
    log:
        "logs/sla/judge.log",
    benchmark:
        "benchmarks/rules/sla/judge.tsv"
    conda:
        "../envs/sla.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=20,
    params:
        cfg=section("sla", "quality", "judge"),
    shell:
        stage(
            "repro.sla.evaluate",
            "judge --faces-train {input.train:q} --faces-val {input.val:q}"
            " --out {output.judge:q} --metrics {output.metrics:q}",
            rule="sla_judge",
        )


rule sla_eval:
    # Frame FID and background accuracy of every sample set -> the headline table.
    input:
        judge=rules.sla_judge.output.judge,
        val=rules.sla_faces.output.val,
        test=rules.sla_faces.output.test,
        rows=sla_runs("results/sla/rows/{variant}_s{seed}.json"),
        samples=sla_runs("results/sla/samples/{variant}_s{seed}.safetensors"),
    output:
        report(
            "results/sla_quality.csv",
            caption="../report/sla_quality.rst",
            category=SLA_LABEL,
            subcategory="Tables",
        ),
    log:
        "logs/sla/eval.log",
    benchmark:
        "benchmarks/rules/sla/eval.tsv"
    conda:
        "../envs/sla.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=20,
    params:
        cfg=json.dumps({"order": list(SLA_VARIANTS)}),
    shell:
        stage(
            "repro.sla.evaluate",
            "table --judge {input.judge:q} --faces-val {input.val:q}"
            " --faces-test {input.test:q} --rows {input.rows:q} --out {output:q}",
            rule="sla_eval",
        )


rule sla_claims:
    input:
        table=rules.sla_eval.output,
    output:
        "results/claims/sla.csv",
    log:
        "logs/sla/claims.log",
    benchmark:
        "benchmarks/rules/sla/claims.tsv"
    conda:
        "../envs/sla.yaml"
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    params:
        cfg=section("sla", "quality", "claims"),
    shell:
        stage(
            "repro.sla.claims",
            "--table {input.table:q} --out {output:q}",
            rule="sla_claims",
        )


rule sla_figures:
    input:
        table=rules.sla_eval.output,
        finetune=sla_runs("results/sla/finetune/{variant}_s{seed}.json"),
        samples=sla_runs("results/sla/samples/{variant}_s{seed}.safetensors"),
    output:
        quality=report(
            "results/figures/sla_quality.png",
            caption="../report/sla_quality_figure.rst",
            category=SLA_LABEL,
            subcategory="Figures",
        ),
        frames=report(
            "results/figures/sla_frames.png",
            caption="../report/sla_frames.rst",
            category=SLA_LABEL,
            subcategory="Figures",
        ),
        loss=report(
            "results/figures/sla_loss.png",
            caption="../report/sla_loss.rst",
            category=SLA_LABEL,
            subcategory="Figures",
        ),
    log:
        "logs/sla/figures.log",
    benchmark:
        "benchmarks/rules/sla/figures.tsv"
    conda:
        "../envs/sla.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        cfg=json.dumps(
            {"order": list(SLA_VARIANTS), "full": SLA_QUALITY["claims"]["full"]}
        ),
        out_dir=lambda wildcards, output: os.path.dirname(output.quality),
    shell:
        stage(
            "repro.sla.plots",
            "--table {input.table:q} --finetune {input.finetune:q}"
            " --samples {input.samples:q} --out-dir {params.out_dir:q}",
            rule="sla_figures",
        )


# ----------------------------------------------------------------------------- image


rule sla_glyphs:
    # Glyph digits drawn at SLA's image size (data.glyphs with sla.image.glyphs on top).
    output:
        "data/sla/glyphs/{glyph_split}.safetensors",
    log:
        "logs/sla/glyphs_{glyph_split}.log",
    benchmark:
        "benchmarks/rules/sla/glyphs_{glyph_split}.tsv"
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        cfg=lambda wildcards: sla_glyph_params(wildcards.glyph_split),
    shell:
        stage("repro.core.data", "glyphs --out {output:q}", rule="sla_glyphs")


rule sla_image_classifier:
    # The FID feature network of the image experiment: a classifier of 16 x 16 glyphs,
    # selected on val, its test accuracy reported.
    input:
        train="data/sla/glyphs/train.safetensors",
        val="data/sla/glyphs/val.safetensors",
        test="data/sla/glyphs/test.safetensors",
    output:
        model="models/sla/image/classifier.safetensors",
        metrics="results/sla/image/classifier.json",
    log:
        "logs/sla/image_classifier.log",
    benchmark:
        "benchmarks/rules/sla/image_classifier.tsv"
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        cfg=section("sla", "image", "classifier"),
        data_dir=lambda wildcards, input: os.path.dirname(input.train),
    shell:
        stage(
            "repro.core.classifier",
            "--data-dir {params.data_dir:q} --kind glyphs --out {output.model:q}"
            " --metrics {output.metrics:q}",
            rule="sla_image_classifier",
        )


rule sla_image_base:
    # The DiT trained from scratch with full attention.
    input:
        train="data/sla/glyphs/train.safetensors",
    output:
        model=directory("models/sla/image/base"),
        metrics="results/sla/image/base.json",
    log:
        "logs/sla/image_base.log",
    benchmark:
        "benchmarks/rules/sla/image_base.tsv"
    conda:
        "../envs/sla.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=gpus(),
    params:
        cfg=lambda wildcards: sla_image_params(),
        checkpoints="checkpoints/sla",
    shell:
        stage(
            "repro.sla.image",
            "base --train {input.train:q} --out {output.model:q}"
            " --metrics {output.metrics:q} --checkpoint-dir {params.checkpoints:q}",
            rule="sla_image_base",
        )


rule sla_image_finetune:
    # The base DiT with one attention variant installed, every weight fine-tuned.
    input:
        base=rules.sla_image_base.output.model,
        train="data/sla/glyphs/train.safetensors",
    output:
        model=directory("models/sla/image/{sla_image_variant}_s{seed}"),
        metrics="results/sla/image/finetune/{sla_image_variant}_s{seed}.json",
    log:
        "logs/sla/image_finetune_{sla_image_variant}_s{seed}.log",
    benchmark:
        "benchmarks/rules/sla/image_finetune_{sla_image_variant}_s{seed}.tsv"
    conda:
        "../envs/sla.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=gpus(),
    params:
        cfg=lambda wildcards: sla_image_finetune_params(
            wildcards.sla_image_variant, wildcards.seed
        ),
        checkpoints="checkpoints/sla",
    shell:
        stage(
            "repro.sla.image",
            "finetune --base {input.base:q} --train {input.train:q}"
            " --out {output.model:q} --metrics {output.metrics:q}"
            " --checkpoint-dir {params.checkpoints:q}",
            rule="sla_image_finetune",
        )


rule sla_image_eval:
    # Samples of every class from the same noise: FID and attention FLOPs per image.
    input:
        model=rules.sla_image_finetune.output.model,
        finetune=rules.sla_image_finetune.output.metrics,
        classifier=rules.sla_image_classifier.output.model,
        test="data/sla/glyphs/test.safetensors",
    output:
        "results/sla/image/rows/{sla_image_variant}_s{seed}.json",
    log:
        "logs/sla/image_eval_{sla_image_variant}_s{seed}.log",
    benchmark:
        "benchmarks/rules/sla/image_eval_{sla_image_variant}_s{seed}.tsv"
    conda:
        "../envs/sla.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
        gpu=gpus(),
    params:
        cfg=lambda wildcards: sla_image_params(),
    shell:
        stage(
            "repro.sla.image",
            "eval --model {input.model:q} --finetune-metrics {input.finetune:q}"
            " --classifier {input.classifier:q} --test {input.test:q} --out {output:q}",
            rule="sla_image_eval",
        )


rule sla_image_table:
    input:
        sla_image_runs("results/sla/image/rows/{variant}_s{seed}.json"),
    output:
        report(
            "results/sla_image.csv",
            caption="../report/sla_image.rst",
            category=SLA_LABEL,
            subcategory="Tables",
        ),
    log:
        "logs/sla/image_table.log",
    benchmark:
        "benchmarks/rules/sla/image_table.tsv"
    conda:
        "../envs/sla.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        cfg=json.dumps({"order": list(SLA_IMAGE_VARIANTS)}),
    shell:
        stage(
            "repro.sla.image",
            "table --rows {input:q} --out {output:q}",
            rule="sla_image_table",
        )
