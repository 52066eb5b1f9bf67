# Shared set-up: config validation, the Python that runs every stage, helpers.
import json
import os
import shlex
import sys

from snakemake.utils import validate

validate(config, os.path.join(workflow.basedir, "schemas", "config.schema.yaml"))


def check_config(cfg):
    """Cross-field checks JSON schema cannot express; each error names its key."""
    errors = []
    traj = cfg["agd"]["trajectories"]
    if traj["w_min"] > traj["w_max"]:
        errors.append(
            f"agd.trajectories: w_min ({traj['w_min']}) must be <= w_max ({traj['w_max']})"
        )
    for w in cfg["agd"]["eval"]["guidance_scales"]:
        if not traj["w_min"] <= w <= traj["w_max"]:
            errors.append(
                f"agd.eval.guidance_scales: {w} lies outside the trained range "
                f"agd.trajectories [w_min, w_max] = [{traj['w_min']}, {traj['w_max']}]"
            )
    model = cfg["agd"]["base"]["model"]
    if model["sample_size"] % model["patch_size"]:
        errors.append(
            f"agd.base.model.patch_size: {model['patch_size']} does not divide "
            f"sample_size {model['sample_size']}"
        )
    n_classes = model["num_embeds_ada_norm"]
    for c in cfg["agd"]["figures"]["grid_classes"]:
        if c >= n_classes:
            errors.append(
                f"agd.figures.grid_classes: class {c} >= num_embeds_ada_norm ({n_classes})"
            )
    if errors:
        raise ValueError("invalid config:\n  " + "\n  ".join(errors))


check_config(config)

SCALE = config["scale"]
SEEDS = config["seeds"]
THREADS = config["max_threads"]

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


# ---- AGD: which files a job needs, chosen from the wildcards ----
AGD = config["agd"]
AGD_FIGURES = [
    "results/figures/agd_fid_vs_w.png",
    "results/figures/agd_samples.png",
    "results/figures/agd_speed.png",
]


def agd_eval_inputs(wildcards):
    """The models one evaluation job needs, by checkpoint and method (all seeds)."""
    inputs = {
        "classifier": "models/core/digit_classifier.safetensors",
        "reference": "data/digits/test.safetensors",
        "checkpoint": f"models/agd/{wildcards.agd_checkpoint}",
    }
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
