"""Validation of the merged workflow config, before any job runs.

The JSON schema (schemas/config.schema.yaml) checks keys, types, ranges and
allowed names; `cross_checks` adds what a schema cannot say (one value against
another). Every message starts with the dotted key it is about.

    python -m repro.core.config config.yaml configs/smoke.yaml   # merge, validate, report
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Mapping
from pathlib import Path

import yaml
from jsonschema import Draft202012Validator

from repro.core.errors import ReproInputError

SCHEMA = Path(__file__).resolve().parents[3] / "schemas" / "config.schema.yaml"


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ReproInputError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ReproInputError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(data, dict):
        raise ReproInputError(f"{path}: a config file must hold a mapping at the top level")
    return data


def merge(base: Mapping, overlay: Mapping) -> dict:
    """Deep-merge overlay into base, as Snakemake merges --configfile overlays."""
    out = copy.deepcopy(dict(base))
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def schema_errors(config: Mapping, schema_path: str | Path = SCHEMA) -> list[str]:
    schema = load_yaml(schema_path)
    validator = Draft202012Validator(schema)
    messages = []
    for error in sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path)):
        key = ".".join(str(p) for p in error.absolute_path) or "(top level)"
        if error.validator == "enum":
            allowed = ", ".join(repr(v) for v in error.validator_value)
            messages.append(
                f"{key}: {error.instance!r} is not one of the allowed values: {allowed}"
            )
        else:
            messages.append(f"{key}: {error.message}")
    return messages


def cross_checks(cfg: Mapping) -> list[str]:
    """Checks between values; assumes the schema passed."""
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
    bench = cfg["sla"]["kernel_bench"]
    splits = [("k_l", s, bench["k_l"]) for s in [bench["sparsity"], *bench["sparsities"]]]
    splits += [
        (f"forms[{i}].k_l", bench["sparsity"], form["k_l"])
        for i, form in enumerate(bench.get("forms", []))
    ]
    for key, s, k_l in splits:
        if (1.0 - s) + k_l > 1.0 + 1e-9:
            errors.append(
                f"sla.kernel_bench: sparsity {s} leaves {1 - s:.3g} of the blocks critical, "
                f"which with {key} = {k_l} negligible exceeds all of them"
            )
    glyphs = cfg["data"]["glyphs"]
    seeds = {
        "seed": glyphs["seed"],
        "val.seed": glyphs["val"]["seed"],
        "test.seed": glyphs["test"]["seed"],
    }
    if len(set(seeds.values())) < 3:
        errors.append(
            f"data.glyphs: the seeds of train, val and test must differ (got {seeds}); "
            "held-out glyphs must not repeat the fine-tuning ones"
        )
    data = cfg["data"]["digits"]
    if data["val_fraction"] + data["test_fraction"] >= 0.8:
        errors.append("data.digits: val_fraction + test_fraction leaves under 20% to train on")
    return errors


def validate_config(config: Mapping, schema_path: str | Path = SCHEMA) -> None:
    """Raise ReproInputError listing every problem, each naming its key."""
    errors = schema_errors(config, schema_path)
    if not errors:
        errors = cross_checks(config)
    if errors:
        raise ReproInputError("invalid config:\n  " + "\n  ".join(errors))


def main(argv: list[str] | None = None) -> None:
    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        raise SystemExit("usage: python -m repro.core.config config.yaml [overlay.yaml ...]")
    config: dict = {}
    for path in paths:
        config = merge(config, load_yaml(path))
    try:
        validate_config(config)
    except ReproInputError as err:
        raise SystemExit(str(err)) from None
    print(f"config OK: scale {config['scale']}")


if __name__ == "__main__":
    main()
