"""ProbeX in the shared workflow: config checks and final files (repro.core.papers).

Light on purpose (no torch): Snakemake imports it when it parses the workflow.
Rules: rules/probex.smk. Config: the `probex` section, schema
schemas/probex.schema.yaml. The zoo's base models are built by
repro.foundation.backbones (the foundation room); the zoo, the probes and the
tables are repro.probex's.

A tree of probex.trees is either GENERATED (its base pre-trained by rule probex_base,
its zoo fine-tuned by rule probex_zoo, on the digits: probex.classnames) or IMPORTED:
it names `zoo_dir`, an existing directory of safetensors models (Model-J's), and
optionally `base` (its base model's file), `splits` (a JSON of fixed splits) and
`classnames` (its classes; default probex.classnames); rule probex_zoo_import reads it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from repro.core.papers import PaperSpec

ACCURACY = "results/probex_accuracy.csv"
LAYERS = "results/probex_layers.csv"
ZEROSHOT = "results/probex_zeroshot.csv"
FIGURES = {
    "accuracy": "results/figures/probex_accuracy.png",
    "layers": "results/figures/probex_layers.png",
    "parameters": "results/figures/probex_parameters.png",
    "zeroshot": "results/figures/probex_zeroshot.png",
}
CLAIMS = "results/claims/probex.csv"

# What repro.probex.probe trains per seed: one expert per tree for each method, one
# ProbeX over all trees, and the tree experts behind the nearest-base router.
PER_TREE_METHODS = ("probex", "dense", "statnn")
ACROSS_TREES_METHODS = ("probex_single", "probex_experts")
METHODS = PER_TREE_METHODS + ACROSS_TREES_METHODS


def targets(config: Mapping) -> list[str]:
    return [ACCURACY, LAYERS, ZEROSHOT, *FIGURES.values(), CLAIMS]


def tree_names(px: Mapping) -> list[str]:
    return [tree["name"] for tree in px["trees"]]


# The keys only an imported tree may carry (a generated tree's base and splits are the
# pipeline's own, its classes the digits').
IMPORT_KEYS = ("zoo_dir", "base", "splits", "classnames")


def is_imported(tree: Mapping) -> bool:
    """Whether a probex.trees entry reads existing models (zoo_dir) rather than growing them."""
    return "zoo_dir" in tree


def imported_trees(px: Mapping) -> list[str]:
    return [tree["name"] for tree in px["trees"] if is_imported(tree)]


def generated_trees(px: Mapping) -> list[str]:
    return [tree["name"] for tree in px["trees"] if not is_imported(tree)]


def model_files(zoo_dir: str | Path) -> list[Path]:
    """The models of an imported tree: every *.safetensors file directly under zoo_dir,
    sorted by name (rule probex_zoo_import's inputs; repro.probex.zoo reads the same)."""
    return sorted(p for p in Path(zoo_dir).glob("*.safetensors") if p.is_file())


def tree_classnames(px: Mapping, tree: Mapping) -> list[str]:
    """A tree's class names: its own (an imported tree's `classnames`) or probex.classnames."""
    return list(tree.get("classnames", px["classnames"]))


def tree_checks(px: Mapping) -> list[str]:
    """The trees' own keys: import keys only with zoo_dir, existing files, one class list."""
    errors = []
    for index, tree in enumerate(px["trees"]):
        where = f"probex.trees[{index}]"
        if not is_imported(tree):
            for key in IMPORT_KEYS[1:]:
                if key in tree:
                    errors.append(
                        f"{where}.{key}: only an imported tree (one with zoo_dir) takes "
                        f"{key}; tree {tree['name']!r} is grown by the pipeline (rules "
                        "probex_base, probex_zoo) on probex.classnames"
                    )
            continue
        directory = Path(tree["zoo_dir"])
        if not directory.is_dir():
            errors.append(f"{where}.zoo_dir: {directory} is not a directory")
        elif not model_files(directory):
            errors.append(f"{where}.zoo_dir: {directory} holds no .safetensors model files")
        for key in ("base", "splits"):
            if key in tree and not Path(tree[key]).is_file():
                errors.append(f"{where}.{key}: {tree[key]} is not a file")
    lists = [tree_classnames(px, tree) for tree in px["trees"]]
    for index, names in enumerate(lists[1:], start=1):
        if names != lists[0]:
            own = "classnames" if "classnames" in px["trees"][index] else "probex.classnames"
            errors.append(
                f"probex.trees[{index}].classnames: its classes ({own}, {len(names)}) differ "
                f"from probex.trees[0]'s ({len(lists[0])}); the probes compare trees (one "
                "ProbeX across trees, the router) on one class list"
            )
    return errors


def checks(cfg: Mapping) -> list[str]:
    """Checks between values of the probex section; assumes the schema passed."""
    px = cfg["probex"]
    errors = []
    names = tree_names(px)
    if len(set(names)) != len(names):
        errors.append(f"probex.trees: tree names repeat ({names})")
    errors += tree_checks(px)
    if len(px["classnames"]) != px["num_classes"]:
        errors.append(
            f"probex.classnames: {len(px['classnames'])} names for probex.num_classes "
            f"{px['num_classes']}"
        )
    if not 0 < px["subset_size"] < px["num_classes"]:
        errors.append(
            f"probex.subset_size: {px['subset_size']} must be between 1 and "
            f"probex.num_classes - 1 ({px['num_classes'] - 1}): a model trained on every class "
            "(or none) has nothing for a probe to tell apart"
        )
    split = px["zoo"]["split"]
    if split["val"] + split["test"] >= 1:
        errors.append(
            f"probex.zoo.split: val {split['val']} + test {split['test']} leaves no model to "
            "train the probes on"
        )
    low, high = px["zoo"]["lr"]
    if low > high:
        errors.append(f"probex.zoo.lr: [{low}, {high}] is not a range (low > high)")
    low, high = px["zoo"]["epochs"]
    if low > high:
        errors.append(f"probex.zoo.epochs: [{low}, {high}] is not a range (low > high)")
    heldout = px["zeroshot"]["heldout_classes"]
    if not 2 <= heldout <= px["num_classes"] - 2:
        errors.append(
            f"probex.zeroshot.heldout_classes: {heldout} must be between 2 (a choice to make) "
            f"and probex.num_classes - 2 ({px['num_classes'] - 2}: two seen classes to train on)"
        )
    for key in ("t2i", "clip"):
        if key not in cfg.get("foundation", {}):
            errors.append(f"foundation.{key}: ProbeX's zero-shot path needs this foundation model")
    return errors


PAPER = PaperSpec(
    name="probex",
    title="Learning on Model Weights using Tree Experts (ProbeX)",
    label="ProbeX",
    schema="probex.schema.yaml",
    targets=targets,
    tables=(ACCURACY, LAYERS, ZEROSHOT),
    claims=CLAIMS,
    checks=checks,
)
