"""Validation of the merged workflow config, before any job runs.

The JSON schema checks keys, types, ranges and allowed names: the shared part
(schemas/config.schema.yaml) composed with each registered paper's part
(schemas/<paper>.schema.yaml, see repro.core.papers). `cross_checks` adds what a
schema cannot say (one value against another): the shared sections' checks
here, each paper's in its repro.<paper>.workflow. Every message starts with the
dotted key it is about.

    python -m repro.core.config config.yaml configs/smoke.yaml   # merge, validate, report
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml
from jsonschema import Draft202012Validator

from repro.core.errors import ReproInputError
from repro.core.papers import PaperSpec, discover_papers

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


def load_schema(
    schema_path: str | Path = SCHEMA, papers: Sequence[PaperSpec] | None = None
) -> dict:
    """The shared schema at `schema_path` composed with every paper's part.

    Each paper's part (`PaperSpec.schema`, a file beside the shared one) becomes
    properties[paper.name], required; its $defs join the shared $defs, so either
    may be referenced as "#/$defs/<name>". The top level keeps
    additionalProperties: false, so a section no paper registers is refused.
    """
    schema_path = Path(schema_path)
    schema = load_yaml(schema_path)
    papers = discover_papers() if papers is None else papers
    defs = schema.setdefault("$defs", {})
    properties = schema.setdefault("properties", {})
    required = schema.setdefault("required", [])
    for paper in papers:
        part_path = schema_path.parent / paper.schema
        part = load_yaml(part_path)
        part.pop("$schema", None)
        for name, definition in part.pop("$defs", {}).items():
            if name in defs:
                raise ReproInputError(
                    f"{part_path}: $defs.{name} is already defined (shared part or another paper)"
                )
            defs[name] = definition
        if paper.name in properties:
            raise ReproInputError(
                f"{part_path}: config section {paper.name!r} is already in the shared schema"
            )
        properties[paper.name] = part
        required.append(paper.name)
    return schema


def schema_errors(
    config: Mapping, schema_path: str | Path = SCHEMA, papers: Sequence[PaperSpec] | None = None
) -> list[str]:
    validator = Draft202012Validator(load_schema(schema_path, papers))
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


# The glyph splits whose seeds must differ: held-out glyphs must not repeat the training ones.
GLYPH_SEEDS = (("seed", "val.seed"), ("seed", "test.seed"), ("val.seed", "test.seed"))


def shared_checks(cfg: Mapping) -> list[str]:
    """Checks between values of the shared sections; assumes the schema passed."""
    errors = []
    glyphs = cfg["data"]["glyphs"]
    seeds = {
        "seed": glyphs["seed"],
        "val.seed": glyphs["val"]["seed"],
        "test.seed": glyphs["test"]["seed"],
    }
    for a, b in GLYPH_SEEDS:
        if seeds[a] == seeds[b]:
            errors.append(
                f"data.glyphs.{b}: {seeds[b]} equals data.glyphs.{a}; the seeds of train, "
                "val and test must differ (held-out glyphs must not repeat the fine-tuning ones)"
            )
    data = cfg["data"]["digits"]
    if data["val_fraction"] + data["test_fraction"] >= 0.8:
        errors.append("data.digits: val_fraction + test_fraction leaves under 20% to train on")
    return errors


def cross_checks(cfg: Mapping, papers: Sequence[PaperSpec] | None = None) -> list[str]:
    """Checks between values: the shared ones, then each paper's; assumes the schema passed."""
    papers = discover_papers() if papers is None else papers
    errors = shared_checks(cfg)
    for paper in papers:
        errors += paper.checks(cfg)
    return errors


def validate_config(
    config: Mapping, schema_path: str | Path = SCHEMA, papers: Sequence[PaperSpec] | None = None
) -> None:
    """Raise ReproInputError listing every problem, each naming its key."""
    errors = schema_errors(config, schema_path, papers)
    if not errors:
        errors = cross_checks(config, papers)
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
