"""ProbeX in the shared workflow: config checks and final files (repro.core.papers).

Light on purpose (no torch): Snakemake imports it when it parses the workflow.
Rules: rules/probex.smk. Config: the `probex` section, schema
schemas/probex.schema.yaml. The zoo's base models are built by
repro.foundation.backbones (the foundation room); the zoo, the probes and the
tables are repro.probex's.
"""

from __future__ import annotations

from collections.abc import Mapping

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


def checks(cfg: Mapping) -> list[str]:
    """Checks between values of the probex section; assumes the schema passed."""
    px = cfg["probex"]
    errors = []
    names = tree_names(px)
    if len(set(names)) != len(names):
        errors.append(f"probex.trees: tree names repeat ({names})")
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
