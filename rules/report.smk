# The claims table of every paper that has claims (its PaperSpec.claims, written by
# its own claims rule), computed from the measured tables.


rule claims:
    input:
        PAPER_CLAIMS,
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
    shell:
        stage("repro.core.results", "merge --out {output:q} {input:q}")
