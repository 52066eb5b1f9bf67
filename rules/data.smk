# Tiny-scale data: real bundled digits and rendered glyphs, never downloaded.


wildcard_constraints:
    glyph_split="train|val|test",


rule digits:
    output:
        train="data/digits/train.safetensors",
        val="data/digits/val.safetensors",
        test="data/digits/test.safetensors",
        manifest="data/digits/manifest.json",
    log:
        "logs/data/digits.log",
    benchmark:
        "benchmarks/rules/data/digits.tsv"
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        py=PYTHON,
        scale=SCALE,
        cfg=section("data", "digits"),
        out_dir=lambda wildcards, output: os.path.dirname(output.manifest),
    shell:
        "{params.py} -m repro.core.data digits --out-dir {params.out_dir:q}"
        " --params {params.cfg:q} --threads {threads} --rule digits --scale {params.scale}"
        " > {log:q} 2>&1"


rule glyphs:
    output:
        "data/glyphs/{glyph_split}.safetensors",
    log:
        "logs/data/glyphs_{glyph_split}.log",
    benchmark:
        "benchmarks/rules/data/glyphs_{glyph_split}.tsv"
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        py=PYTHON,
        scale=SCALE,
        cfg=lambda wildcards: glyph_params(wildcards.glyph_split),
    shell:
        "{params.py} -m repro.core.data glyphs --out {output:q}"
        " --params {params.cfg:q} --threads {threads} --rule glyphs --scale {params.scale}"
        " > {log:q} 2>&1"


rule digit_classifier:
    input:
        train=rules.digits.output.train,
        val=rules.digits.output.val,
        test=rules.digits.output.test,
    output:
        model="models/core/digit_classifier.safetensors",
        metrics="results/digit_classifier.json",
    log:
        "logs/core/digit_classifier.log",
    benchmark:
        "benchmarks/rules/core/digit_classifier.tsv"
    conda:
        "../envs/core.yaml"
    # A small CNN on small batches: a second thread only adds contention.
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        py=PYTHON,
        scale=SCALE,
        cfg=section("classifier"),
        data_dir=lambda wildcards, input: os.path.dirname(input.train),
    shell:
        "{params.py} -m repro.core.classifier --data-dir {params.data_dir:q}"
        " --out {output.model:q} --metrics {output.metrics:q}"
        " --params {params.cfg:q} --threads {threads} --rule digit_classifier --scale {params.scale}"
        " > {log:q} 2>&1"
