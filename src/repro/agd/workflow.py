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


def targets(config: Mapping) -> list[str]:
    return [TABLE, METRICS, THROUGHPUT, *FIGURES, CLAIMS]


def checks(cfg: Mapping) -> list[str]:
    """Checks between values of the agd section; assumes the schema passed."""
    errors = []
    agd = cfg["agd"]
    traj = agd["trajectories"]
    if traj["w_min"] > traj["w_max"]:
        errors.append(
            f"agd.trajectories.w_min: {traj['w_min']} is above w_max {traj['w_max']} "
            "(the guidance range is [w_min, w_max])"
        )
    else:
        for w in agd["eval"]["guidance_scales"]:
            if not traj["w_min"] <= w <= traj["w_max"]:
                errors.append(
                    f"agd.eval.guidance_scales: {w} lies outside the trained range "
                    f"agd.trajectories [w_min, w_max] = [{traj['w_min']}, {traj['w_max']}]"
                )
    for key in ("methods", "transfer_methods"):
        if "cfg" not in agd["eval"][key]:
            errors.append(
                f"agd.eval.{key}: must include cfg (fidelity and every claim compare with CFG)"
            )
    distill = agd["distill"]
    if distill["adapter_type"] not in distill["adapter_types"]:
        errors.append(
            f"agd.distill.adapter_type: {distill['adapter_type']!r} (the headline type, used by "
            f"the ablations) is not in agd.distill.adapter_types {distill['adapter_types']}"
        )
    sampler = agd["sampler"]
    if sampler["kind"] == "ddim" and sampler.get("variance_type", "fixed_small") != "fixed_small":
        errors.append(
            f"agd.sampler.variance_type: {sampler['variance_type']!r} needs kind 'ddpm' "
            "(DDIM has no variance to learn)"
        )
    model = agd["base"]["model"]
    if model["sample_size"] % model["patch_size"]:
        errors.append(
            f"agd.base.model.patch_size: {model['patch_size']} does not divide "
            f"sample_size {model['sample_size']}"
        )
    n_classes = model["num_embeds_ada_norm"]
    for c in agd["figures"]["grid_classes"]:
        if c >= n_classes:
            errors.append(
                f"agd.figures.grid_classes: class {c} does not exist "
                f"(agd.base.model.num_embeds_ada_norm = {n_classes})"
            )
    w = agd["figures"]["grid_guidance_scale"]
    if not traj["w_min"] <= w <= traj["w_max"]:
        errors.append(
            f"agd.figures.grid_guidance_scale: {w} lies outside agd.trajectories "
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
