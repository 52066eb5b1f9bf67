# Hub checkpoints, for jobs on compute nodes that cannot reach the hub. The local
# rule hub_fetch downloads every checkpoint the config names (repro.core.hub: the
# papers' hub keys and the foundation models) into hub.cache_dir, on the host
# that runs Snakemake and before any job needs one; the jobs that load them take
# its manifest as input and read the cache only (hub_input, hub_options in
# common.smk; foundation_input, foundation_params in foundation.smk). At tiny and
# smoke scale the config names none: hub_fetch is not in the DAG.


rule hub_fetch:
    output:
        HUB_MANIFEST,
    log:
        "logs/hub/fetch.log",
    benchmark:
        "benchmarks/rules/hub/fetch.tsv"
    localrule: True
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=240,
    params:
        cfg=json.dumps(
            {
                "cache_dir": HUB["cache_dir"],
                "sources": [s.as_dict() for s in HUB_SOURCES],
            },
            sort_keys=True,
        ),
    shell:
        stage("repro.core.hub", "fetch --params {params.cfg:q} --out {output:q}")


# The FID Inception-v3 weights (repro.core.inception; AGD's FID at paper scale):
# downloaded here, converted to safetensors; the jobs read that file only.
INCEPTION_WEIGHTS = "models/hub/inception_v3_fid.safetensors"


rule inception_weights:
    output:
        INCEPTION_WEIGHTS,
    log:
        "logs/hub/inception_weights.log",
    benchmark:
        "benchmarks/rules/hub/inception_weights.tsv"
    localrule: True
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    shell:
        stage("repro.core.inception", "fetch --out {output:q}")
