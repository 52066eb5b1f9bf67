# repro: one workflow that reproduces six ML papers end to end.
#
#   snakemake --cores all results/agd_fid.csv      # AGD's headline table (tiny scale)
#   snakemake --cores all                          # every table, figure and the claims
#   snakemake --cores all --configfile configs/smoke.yaml   # seconds per rule (CI)
#   snakemake --profile profiles/slurm --configfile configs/paper.yaml   # a Slurm cluster
import os

from snakemake.utils import min_version

min_version("9.0")


configfile: os.path.join(workflow.basedir, "config.yaml")


report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/hub.smk"
include: "rules/data.smk"
include: "rules/agd.smk"
include: "rules/sla.smk"
include: "rules/report.smk"


rule all:
    default_target: True
    input:
        "results/agd_fid.csv",
        "results/agd_metrics.json",
        "results/agd_throughput.csv",
        AGD_FIGURES,
        "results/sla_kernel.csv",
        "results/claims.csv",
