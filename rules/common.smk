# Shared set-up, knowing no paper: config validation, the papers' registry, the
# Python that runs every stage, the one shape of a stage's shell command, the GPU
# request, config helpers, hub checkpoints. Each paper's own helpers live in its
# rules/<paper>.smk; core and this file only iterate over what the papers register
# (repro.core.papers).
import json
import os
import re
import shlex
import sys

from repro.core.config import validate_config
from repro.core.errors import ReproInputError
from repro.core.papers import discover_papers, paper_claims, paper_targets

# A bad config fails here, before any job runs, naming every offending key.
try:
    validate_config(
        config, os.path.join(workflow.basedir, "schemas", "config.schema.yaml")
    )
except ReproInputError as err:
    raise ValueError(str(err)) from None

# The registered papers (a repro.<paper>.workflow module each), by name.
PAPERS = {paper.name: paper for paper in discover_papers()}
# Every paper's final files (rule all), and the claims CSVs merged into results/claims.csv.
PAPER_TARGETS = paper_targets(config)
PAPER_CLAIMS = paper_claims()

SCALE = config["scale"]
SEEDS = config["seeds"]
THREADS = config["threads"]["default"]
BASE_THREADS = config["threads"]["base"]

# Every stage runs as `python -m repro.<paper>.<stage>`: with the Python that runs
# Snakemake (the package is installed in it: `make setup` or `pip install -e .`), or
# under --software-deployment-method conda with the `python` of the rule's activated
# env (envs/*.yaml install the package), so that the envs are really used.
from snakemake.settings.types import DeploymentMethod

PYTHON = (
    "python"
    if DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method
    else shlex.quote(sys.executable)
)

# Jobs spool their MLflow runs (repro.core.tracking) instead of logging them: a job
# then never imports mlflow and its SQL store (~2 s of CPU, ~300 jobs in the tiny
# DAG). The Snakefile's onsuccess / onerror log every spooled run in this process.
# A spool the user exported wins; REPRO_MLFLOW=0 still turns logging off.
MLFLOW_SPOOL = os.environ.setdefault(
    "REPRO_MLFLOW_SPOOL", os.path.abspath(".mlflow-spool")
)


def flush_mlflow_spool():
    """Log the runs the jobs spooled; on failure they stay in the spool for next time."""
    from repro.core.tracking import flush_spool

    try:
        flush_spool(MLFLOW_SPOOL)
    except Exception as err:  # the jobs' outputs stand; only their MLflow runs wait
        print(
            f"mlflow: spooled runs not logged, kept in {MLFLOW_SPOOL}: {err}",
            file=sys.stderr,
        )


def _literal(text):
    """`text` inside a shell template that Snakemake formats: braces kept as they are."""
    return text.replace("{", "{{").replace("}", "}}")


def stage(module, args="", *, rule=None, processes=1):
    """The shell command of a rule that runs `python -m <module> <args>`, logged to {log}.

    `args` are the stage's own arguments, a Snakemake template ("--out {output:q}").
    `rule` (the rule's own name; a stage built on repro.core.stage.Stage)
    adds the arguments every such stage takes: --params {params.cfg:q} (so the
    rule defines params.cfg) --threads {threads} --rule <rule> --scale <scale>.
    (The name is spelled out, not Snakemake's {rule}: `snakemake --lint` flags
    that; tests/test_workflow.py checks that each job passes its own.) With
    processes > 1 the stage runs as that many processes on this node under
    torch.distributed.run (one per GPU at paper scale: the rule asks gpus() of
    the same config section). stdout and stderr go to the rule's log.
    """
    launcher = PYTHON
    if processes > 1:
        launcher += (
            " -m torch.distributed.run --standalone"
            f" --nproc_per_node {int(processes)}"
        )
    command = f"{_literal(launcher)} -m {module}"
    if args:
        command += f" {args}"
    if rule:
        command += (
            " --params {params.cfg:q} --threads {threads}"
            f" --rule {_literal(shlex.quote(rule))} --scale {_literal(shlex.quote(SCALE))}"
        )
    return f"{command} > {{log:q}} 2>&1"


def each_stage(module, runs="{params.runs}"):
    """The shell command of a rule that runs several runs of `python -m <module>` in ONE
    process (repro.core.each: a job's start-up can cost as much as a small run). `runs`
    is a Snakemake template of every run's arguments, each run led by `--` and built
    by each_run. stdout and stderr go to the rule's log."""
    return f"{_literal(PYTHON)} -m repro.core.each {module} {runs} > {{log:q}} 2>&1"


def each_run(args, *, rule_name, cfg, threads):
    """One run's arguments for each_stage: `args` (a dict of option -> value, or a
    list of words), then what every stage takes (stage()'s --params, --threads,
    --rule, --scale), every word quoted for the shell."""
    words = []
    if isinstance(args, dict):
        for option, value in args.items():
            words += [option, str(value)]
    else:
        words += [str(word) for word in args]
    words += ["--params", cfg, "--threads", str(threads)]
    words += ["--rule", rule_name, "--scale", SCALE]
    return "-- " + " ".join(shlex.quote(word) for word in words)


def processes(*keys):
    """The processes of the training stage of config section `keys` (its `processes`, default 1)."""
    node = config
    for key in keys:
        node = node[key]
    return int(node.get("processes", 1))


def gpus(*keys):
    """A model rule's `gpu` resource: at paper scale one GPU per process of section
    `keys` (one without keys), none at tiny and smoke scale. Slurm: --gpus."""
    if SCALE != "paper":
        return 0
    return processes(*keys) if keys else 1


def section(*keys, **extra):
    """A config section as JSON for --params (Snakemake quotes it with :q)."""
    node = config
    for key in keys:
        node = node[key]
    if extra:
        node = {**node, **extra}
    return json.dumps(node, sort_keys=True)


def glyph_params(split):
    """The glyph rule's params: the train split, or a held-out split with its own n, seed."""
    glyphs = dict(config["data"]["glyphs"])
    heldout = {"val": glyphs.pop("val"), "test": glyphs.pop("test")}
    if split in heldout:
        glyphs.update(heldout[split])
    return json.dumps(glyphs, sort_keys=True)


# The data.imagefolders names, as the imagefolder rule's wildcard (none: matches nothing).
IMAGEFOLDERS = sorted(config["data"].get("imagefolders") or {})
IMAGEFOLDER_PATTERN = "|".join(map(re.escape, IMAGEFOLDERS)) or "(?!)"


def imagefolder_params(name):
    """The imagefolder rule's params: entry `name` of data.imagefolders."""
    folders = config["data"].get("imagefolders") or {}
    if name not in folders:
        raise ValueError(
            f"data.imagefolders: no data set {name!r} (known: {sorted(folders)})"
        )
    return json.dumps(folders[name], sort_keys=True)


def classification_split(dataset, split):
    """The file of `split` (train / val / test) of a classification data set: the digits'
    (rule digits) or an entry of data.imagefolders (rule imagefolder)."""
    if dataset == "digits":
        return f"data/digits/{split}.safetensors"
    return f"data/datasets/{dataset}/{split}.safetensors"


# ---- Hub checkpoints: fetched by rules/hub.smk on this host, read from the cache by jobs ----
# The keys come from the papers' hub_keys and the foundation entries (repro.core.hub).
from repro.core.hub import MANIFEST as HUB_MANIFEST
from repro.core.hub import cache_options, hub_sources, keys_on_hub

HUB = config["hub"]
HUB_SOURCES = hub_sources(config)
ON_HUB = keys_on_hub(config)


def hub_input(*keys):
    """The manifest, as input of a job that loads the checkpoints of config `keys` (if on the hub)."""
    return [HUB_MANIFEST] if ON_HUB.intersection(keys) else []


def hub_options(*keys, **defaults):
    """`defaults`, plus from_pretrained's cache options when one of `keys` names a hub checkpoint."""
    if not ON_HUB.intersection(keys):
        return defaults
    return {**defaults, **cache_options(config)}
