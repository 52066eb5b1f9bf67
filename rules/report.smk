# The claims table of every paper, computed from the measured tables.


rule claims:
    input:
        "results/claims/agd.csv",
    output:
        report(
            "results/claims.csv",
            caption="../report/claims.rst",
            category="Claims",
        ),
    log:
        "logs/report/claims.log",
    benchmark:
        "benchmarks/rules/report/claims.tsv"
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    params:
        py=PYTHON,
    shell:
        "{params.py} -m repro.core.results merge --out {output:q} {input:q} > {log:q} 2>&1"
