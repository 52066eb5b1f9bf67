# repro: one workflow that reproduces six ML papers end to end.
#
#   snakemake --cores all results/agd_fid.csv      # AGD's headline table (tiny scale)
#   snakemake --cores all                          # every table, figure and the claims
#   snakemake --cores all --profile profiles/smoke          # seconds per rule (CI)
#   snakemake --profile profiles/slurm --profile profiles/paper   # a Slurm cluster
# A scale is picked by its profile (profiles/smoke, profiles/paper: an overlay of
# configs/), which leaves the targets alone; --configfile would swallow them.
import os

from snakemake.utils import min_version

min_version("9.0")


configfile: os.path.join(workflow.basedir, "config.yaml")


report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/hub.smk"
include: "rules/data.smk"
include: "rules/foundation.smk"
include: "rules/foundation_t2i.smk"
include: "rules/foundation_clip.smk"
include: "rules/foundation_t2v.smk"
# One line per paper (its rules; it registers itself in repro.<paper>.workflow).
include: "rules/agd.smk"
include: "rules/datadream.smk"
include: "rules/probex.smk"
include: "rules/fedre.smk"
include: "rules/humo.smk"
include: "rules/sla.smk"
include: "rules/report.smk"


# The jobs' MLflow runs, spooled (rules/common.smk), logged once the DAG ends either way.
onsuccess:
    flush_mlflow_spool()


onerror:
    flush_mlflow_spool()


# Every registered paper's final files (repro.core.papers) and the merged claims.
rule all:
    default_target: True
    input:
        PAPER_TARGETS,
        rules.claims.output,
