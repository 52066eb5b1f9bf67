# Tiny-scale data: real bundled digits and rendered glyphs, never downloaded.


wildcard_constraints:
    glyph_split="train|val|test",
    dataset=IMAGEFOLDER_PATTERN,


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
        cfg=section("data", "digits"),
        out_dir=lambda wildcards, output: os.path.dirname(output.manifest),
    shell:
        stage("repro.core.data", "digits --out-dir {params.out_dir:q}", rule="digits")


rule imagefolder:
    # An ImageFolder data set on disk (data.imagefolders.<name>), resized and split:
    # what the paper-scale rules read in place of the digits.
    output:
        train="data/datasets/{dataset}/train.safetensors",
        val="data/datasets/{dataset}/val.safetensors",
        test="data/datasets/{dataset}/test.safetensors",
        manifest="data/datasets/{dataset}/manifest.json",
    log:
        "logs/data/imagefolder_{dataset}.log",
    benchmark:
        "benchmarks/rules/data/imagefolder_{dataset}.tsv"
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=16000,
        runtime=120,
    params:
        cfg=lambda wildcards: imagefolder_params(wildcards.dataset),
        out_dir=lambda wildcards, output: os.path.dirname(output.manifest),
    shell:
        stage(
            "repro.core.data",
            "imagefolder --out-dir {params.out_dir:q}",
            rule="imagefolder",
        )


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
        cfg=lambda wildcards: glyph_params(wildcards.glyph_split),
    shell:
        stage("repro.core.data", "glyphs --out {output:q}", rule="glyphs")


# The foundation models' pre-training corpus (rules/foundation_*.smk): captioned glyphs
# of config data.corpus, the tiny stand-in of web-scale image-text pairs.
rule glyph_corpus:
    output:
        corpus="data/glyphs/corpus.safetensors",
    log:
        "logs/data/glyph_corpus.log",
    benchmark:
        "benchmarks/rules/data/glyph_corpus.tsv"
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=3000,
        runtime=10,
    params:
        cfg=section("data", "corpus"),
    shell:
        stage("repro.core.data", "glyphs --out {output.corpus:q}", rule="glyph_corpus")


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
        cfg=section("classifier"),
        data_dir=lambda wildcards, input: os.path.dirname(input.train),
    shell:
        stage(
            "repro.core.classifier",
            "--data-dir {params.data_dir:q} --out {output.model:q}"
            " --metrics {output.metrics:q}",
            rule="digit_classifier",
        )


rule faces:
    # Talking faces (repro.foundation.faces): identity-disjoint train / val / test clips
    # with audio, reference portraits, face masks and captions (HuMo, SLA quality):
    # drawn, or with data.faces.root read from that tree of real clips
    # (repro.foundation.faces_reader). Like rule imagefolder, the tree is no input: a new
    # root (a params change) re-runs the rule, edits inside the tree do not (--forcerun faces).
    output:
        train="data/faces/train.safetensors",
        val="data/faces/val.safetensors",
        test="data/faces/test.safetensors",
        manifest="data/faces/manifest.json",
    log:
        "logs/data/faces.log",
    benchmark:
        "benchmarks/rules/data/faces.tsv"
    conda:
        "../envs/foundation.yaml"
    threads: 1
    resources:
        # Reading real clips holds a whole split at the config's size (rule imagefolder's).
        mem_mb=16000 if config["data"]["faces"].get("root") else 2000,
        runtime=120 if config["data"]["faces"].get("root") else 10,
    params:
        # A null root is left out: the params, and so the data, of a config without the key.
        cfg=json.dumps(
            {
                key: value
                for key, value in config["data"]["faces"].items()
                if key != "root" or value is not None
            },
            sort_keys=True,
        ),
        out_dir=lambda wildcards, output: os.path.dirname(output.manifest),
    shell:
        stage("repro.foundation.faces", "--out-dir {params.out_dir:q}", rule="faces")
