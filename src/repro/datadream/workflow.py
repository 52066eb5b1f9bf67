"""DataDream in the shared workflow: config checks, hub keys and final files (repro.core.papers).

Light on purpose (no torch): Snakemake imports it when it parses the workflow.
Rules: rules/datadream.smk. Config: the `datadream` section, schema
schemas/datadream.schema.yaml. The generator and the CLIP are foundation models
(foundation.t2i, foundation.clip): their hub ids are the foundation section's.
"""

from __future__ import annotations

from collections.abc import Mapping

from repro.core.papers import PaperSpec

ACCURACY = "results/datadream_accuracy.csv"
FID = "results/datadream_fid.csv"
FIGURES = {
    "main": "results/figures/datadream_main.png",
    "n_synthetic": "results/figures/datadream_n_synthetic.png",
    "shots": "results/figures/datadream_shots.png",
    "samples": "results/figures/datadream_samples.png",
}
CLAIMS = "results/claims/datadream.csv"

# The generators of synthetic sets: the unadapted text-to-image model (the baseline the
# official code cannot produce) and the two DataDream variants (repro.datadream.lora).
UNADAPTED = "unadapted"
VARIANTS = ("cls", "dset")
# The classifiers trained per seed (repro.datadream.classify): method x generator.
NO_GENERATOR = "none"


def targets(config: Mapping) -> list[str]:
    return [ACCURACY, FID, *FIGURES.values(), CLAIMS]


def generators(dd: Mapping) -> list[str]:
    """Every generator of a synthetic set: the unadapted model, then each LoRA variant."""
    return [UNADAPTED, *dd["lora"]["variants"]]


def runs(dd: Mapping) -> list[tuple[str, str, int]]:
    """(method, generator, shots) of every classifier run of one seed.

    Zero-shot CLIP and the unadapted generator's synthetic-only classifier see no real
    image: their shots are 0. Real-only runs at every few-shot size; the methods that
    use synthetic data run at the shots the generator is adapted on (adapt_shots),
    real + unadapted synthetic too, so that every comparison is at equal real data.
    """
    out = [("zero_shot", NO_GENERATOR, 0), ("synthetic", UNADAPTED, 0)]
    out += [("real", NO_GENERATOR, shots) for shots in dd["shots"]]
    for shots in dd["adapt_shots"]:
        out += [("real_synthetic", UNADAPTED, shots)]
        for variant in dd["lora"]["variants"]:
            out += [("synthetic", variant, shots), ("real_synthetic", variant, shots)]
    return out


def synthetic_sets(dd: Mapping) -> list[tuple[str, int]]:
    """(generator, shots) of every synthetic set; the unadapted one has shots 0."""
    return [(UNADAPTED, 0)] + [
        (variant, shots) for shots in dd["adapt_shots"] for variant in dd["lora"]["variants"]
    ]


def checks(cfg: Mapping) -> list[str]:
    """Checks between values of the datadream section; assumes the schema passed."""
    dd = cfg["datadream"]
    errors = []
    for shots in dd["adapt_shots"]:
        if shots not in dd["shots"]:
            errors.append(
                f"datadream.adapt_shots: {shots} is not in datadream.shots {dd['shots']} "
                "(the real-only baseline must exist at every adapted size)"
            )
    if dd["main_shots"] not in dd["adapt_shots"]:
        errors.append(
            f"datadream.main_shots: {dd['main_shots']} is not in datadream.adapt_shots "
            f"{dd['adapt_shots']} (the main table compares DataDream at that size)"
        )
    if "{classname}" not in dd["prompt"]:
        errors.append(
            f"datadream.prompt: {dd['prompt']!r} has no {{classname}} placeholder "
            "(one prompt per class)"
        )
    names = dd["classnames"]
    if len(set(names)) != len(names):
        errors.append(f"datadream.classnames: {names} repeats a name")
    weights = dd["classifier"]["real_weight"] + dd["classifier"]["synthetic_weight"]
    if abs(weights - 1.0) > 1e-9:
        errors.append(
            f"datadream.classifier.real_weight + synthetic_weight: must sum to 1, got {weights:g}"
        )
    dataset = dd.get("dataset", "digits")
    folders = cfg.get("data", {}).get("imagefolders") or {}
    if dataset != "digits" and dataset not in folders:
        errors.append(
            f"datadream.dataset: {dataset!r} is neither 'digits' nor a data set of "
            f"data.imagefolders ({sorted(folders)})"
        )
    for key in ("t2i", "clip"):
        if key not in cfg.get("foundation", {}):
            errors.append(f"foundation.{key}: DataDream needs this foundation model")
    return errors


PAPER = PaperSpec(
    name="datadream",
    title="DataDream: Few-shot Guided Dataset Generation",
    label="DataDream",
    schema="datadream.schema.yaml",
    targets=targets,
    tables=(ACCURACY, FID),
    claims=CLAIMS,
    checks=checks,
)
