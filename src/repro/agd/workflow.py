"""AGD in the shared workflow: config checks, hub keys and final files (repro.core.papers).

Light on purpose (no torch): Snakemake imports it when it parses the workflow.
Rules: rules/agd.smk. Config: the `agd` section, schema schemas/agd.schema.yaml.
"""

from __future__ import annotations

from collections.abc import Mapping

from repro.core.papers import PaperSpec

TABLE = "results/agd_fid.csv"
METRICS = "results/agd_metrics.json"
THROUGHPUT = "results/agd_throughput.csv"
FIGURES = (
    "results/figures/agd_fid_vs_w.png",
    "results/figures/agd_fidelity_vs_w.png",
    "results/figures/agd_samples.png",
    "results/figures/agd_speed.png",
)
CLAIMS = "results/claims/agd.csv"
# The scale ladder: the main run and each rung of agd.ladder.rungs, side by side.
LADDER = "results/agd_ladder.csv"
LADDER_FIGURE = "results/figures/agd_ladder.png"
# What a rung may not change: it reuses the main run's data, hub checkpoints and seeds.
RUNG_FIXED = ("pretrained", "subfolder", "vae", "local_files_only")


def targets(config: Mapping) -> list[str]:
    ladder = [LADDER, LADDER_FIGURE] if ladder_rungs(config) else []
    return [TABLE, METRICS, THROUGHPUT, *FIGURES, CLAIMS, *ladder]


def ladder_rungs(config: Mapping) -> list[str]:
    """The rung names of agd.ladder.rungs that are on (a rung set to null is off)."""
    rungs = (config["agd"].get("ladder") or {}).get("rungs") or {}
    return [name for name, overlay in rungs.items() if overlay is not None]


def rung_config(config: Mapping, name: str) -> dict:
    """The agd config of ladder rung `name`: the agd section with its overlay merged in."""
    from repro.core.config import merge

    agd = {k: v for k, v in config["agd"].items() if k != "ladder"}
    return merge(agd, config["agd"]["ladder"]["rungs"][name])


def unknown_keys(base: Mapping, overlay: Mapping, where: str) -> list[str]:
    """Keys of `overlay` that `base` lacks (a typo in a rung's overlay), as dotted paths."""
    errors = []
    for key, value in overlay.items():
        path = f"{where}.{key}"
        if key not in base:
            errors.append(f"{path}: no such key in the agd section")
        elif isinstance(value, Mapping) and isinstance(base[key], Mapping):
            errors += unknown_keys(base[key], value, path)
        elif key in RUNG_FIXED:
            errors.append(f"{path}: a ladder rung reuses the main run's {key}")
    return errors


def checks(cfg: Mapping) -> list[str]:
    """Checks between values of the agd section and of each ladder rung's merged
    config; assumes the schema passed."""
    errors = section_checks(cfg["agd"], "agd")
    for name in ladder_rungs(cfg):
        where = f"agd.ladder.rungs.{name}"
        overlay = cfg["agd"]["ladder"]["rungs"][name]
        errors += unknown_keys(cfg["agd"], overlay, where)
        if not errors:
            errors += section_checks(rung_config(cfg, name), where)
    return errors


def section_checks(agd: Mapping, where: str) -> list[str]:
    """The checks of one agd config (the section or a rung's merge), keys named
    from `where`."""
    errors = []
    traj = agd["trajectories"]
    if traj["w_min"] > traj["w_max"]:
        errors.append(
            f"{where}.trajectories.w_min: {traj['w_min']} is above w_max {traj['w_max']} "
            "(the guidance range is [w_min, w_max])"
        )
    else:
        for w in agd["eval"]["guidance_scales"]:
            if not traj["w_min"] <= w <= traj["w_max"]:
                errors.append(
                    f"{where}.eval.guidance_scales: {w} lies outside the trained range "
                    f"{where}.trajectories [w_min, w_max] = [{traj['w_min']}, {traj['w_max']}]"
                )
    for key in ("methods", "transfer_methods"):
        if agd["eval"][key] and "cfg" not in agd["eval"][key]:
            errors.append(
                f"{where}.eval.{key}: must include cfg (fidelity and every claim compare with CFG)"
            )
    distill = agd["distill"]
    if distill["adapter_type"] not in distill["adapter_types"]:
        errors.append(
            f"{where}.distill.adapter_type: {distill['adapter_type']!r} (the headline type, used by "
            f"the ablations) is not in agd.distill.adapter_types {distill['adapter_types']}"
        )
    sampler = agd["sampler"]
    if sampler["kind"] == "ddim" and sampler.get("variance_type", "fixed_small") != "fixed_small":
        errors.append(
            f"{where}.sampler.variance_type: {sampler['variance_type']!r} needs kind 'ddpm' "
            "(DDIM has no variance to learn)"
        )
    model = agd["base"]["model"]
    if model["sample_size"] % model["patch_size"]:
        errors.append(
            f"{where}.base.model.patch_size: {model['patch_size']} does not divide "
            f"sample_size {model['sample_size']}"
        )
    n_classes = model["num_embeds_ada_norm"]
    for c in agd["figures"]["grid_classes"]:
        if c >= n_classes:
            errors.append(
                f"{where}.figures.grid_classes: class {c} does not exist "
                f"(agd.base.model.num_embeds_ada_norm = {n_classes})"
            )
    w = agd["figures"]["grid_guidance_scale"]
    if not traj["w_min"] <= w <= traj["w_max"]:
        errors.append(
            f"{where}.figures.grid_guidance_scale: {w} lies outside agd.trajectories "
            f"[w_min, w_max] = [{traj['w_min']}, {traj['w_max']}]"
        )
    return errors


PAPER = PaperSpec(
    name="agd",
    title="Efficient Distillation of Classifier-Free Guidance using Adapters",
    label="AGD",
    schema="agd.schema.yaml",
    targets=targets,
    tables=(TABLE,),
    claims=CLAIMS,
    checks=checks,
    hub_keys=(
        ("agd.base.pretrained", "agd.base.subfolder"),
        ("agd.base.vae", None),
        ("agd.transfer.pretrained", "agd.transfer.subfolder"),
    ),
)
