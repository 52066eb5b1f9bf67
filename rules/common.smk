# Shared set-up: config validation, the Python that runs every stage, helpers.
import json
import os
import shlex
import sys

from repro.core.config import validate_config
from repro.core.errors import ReproInputError

# A bad config fails here, before any job runs, naming every offending key.
try:
    validate_config(
        config, os.path.join(workflow.basedir, "schemas", "config.schema.yaml")
    )
except ReproInputError as err:
    raise ValueError(str(err)) from None

SCALE = config["scale"]
SEEDS = config["seeds"]
THREADS = config["threads"]["default"]
BASE_THREADS = config["threads"]["base"]

# Every stage runs as `python -m repro.<paper>.<stage>` with the Python that runs
# Snakemake (the package is installed in it: `make setup` or `pip install -e .`).
PYTHON = shlex.quote(sys.executable)


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


# ---- Hub checkpoints: fetched by rules/hub.smk on this host, read from the cache by jobs ----
from repro.core.hub import hub_sources

HUB = config["hub"]
HUB_SOURCES = hub_sources(config)
HUB_MANIFEST = "models/hub/manifest.json"


def hub_input(*keys):
    """The manifest, as input of a job that loads the checkpoints of config `keys` (if on the hub)."""
    return [HUB_MANIFEST] if any(s.key in keys for s in HUB_SOURCES) else []


def hub_options(*keys, **defaults):
    """`defaults`, plus from_pretrained's cache options when one of `keys` names a hub checkpoint."""
    if not any(s.key in keys for s in HUB_SOURCES):
        return defaults
    options = {**defaults, "cache_dir": HUB["cache_dir"]}
    if HUB["offline"]:
        options["local_files_only"] = True
    return options


# ---- AGD: which files a job needs, chosen from the wildcards ----
AGD = config["agd"]
# FID with Inception-v3 features (paper scale) reads converted weights: the local
# rule inception_weights fetches them unless agd.eval.inception_weights names a file.
INCEPTION_WEIGHTS = (
    AGD["eval"].get("inception_weights") or "models/hub/inception_v3_fid.safetensors"
)
USES_INCEPTION = AGD["eval"]["feature_net"] == "inception"
AGD_FIGURES = [
    "results/figures/agd_fid_vs_w.png",
    "results/figures/agd_samples.png",
    "results/figures/agd_speed.png",
]


def agd_eval_inputs(wildcards):
    """The models one evaluation job needs, by checkpoint and method (all seeds)."""
    heldout = "glyphs" if wildcards.agd_checkpoint == "derived" else "digits"
    inputs = {
        "classifier": "models/core/digit_classifier.safetensors",
        # The derived checkpoint is fine-tuned on glyphs: its samples are scored
        # against held-out glyphs, the base's against held-out real digits; the
        # val split picks the guidance scale, the test split is reported.
        "reference": f"data/{heldout}/test.safetensors",
        "validation": f"data/{heldout}/val.safetensors",
        "checkpoint": f"models/agd/{wildcards.agd_checkpoint}",
    }
    if USES_INCEPTION:
        inputs["inception_weights"] = INCEPTION_WEIGHTS
    method = wildcards.agd_method
    if method == "agd":
        inputs["adapters"] = [
            f"models/agd/adapters/cfg_s{s}.safetensors" for s in SEEDS
        ]
    elif method == "agd_standard":
        inputs["adapters"] = [
            f"models/agd/adapters/standard_s{s}.safetensors" for s in SEEDS
        ]
    elif method == "gd":
        inputs["gd"] = [f"models/agd/gd_s{s}" for s in SEEDS]
    elif method == "real":
        inputs["train"] = "data/digits/train.safetensors"
    return inputs


def agd_eval_tables(wildcards=None):
    tables = ["results/agd/eval/base/real.csv"]
    tables += [f"results/agd/eval/base/{m}.csv" for m in AGD["eval"]["methods"]]
    tables += [
        f"results/agd/eval/derived/{m}.csv" for m in AGD["eval"]["transfer_methods"]
    ]
    return tables


def eval_option(flag, key):
    """Turn an optional input (one path or one per seed) into quoted arguments."""

    def option(wildcards, input):
        if key not in input.keys():
            return ""
        paths = input[key] if isinstance(input[key], list) else [input[key]]
        return " ".join([flag] + [shlex.quote(str(p)) for p in paths])

    return option
