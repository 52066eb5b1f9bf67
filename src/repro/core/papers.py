"""The paper registry: what each paper adds to the shared workflow, found, never named.

Each paper package `repro.<name>` has a light module `repro.<name>.workflow`
(no torch, no diffusers: Snakemake imports it when it parses the workflow)
that defines `PAPER = PaperSpec(...)`:

- its config section (`name`, validated by `schemas/<schema>`, a part of the
  config schema that `repro.core.config` composes under `properties[name]`),
- the cross-field checks of that section (`checks`),
- the config keys that may name hub checkpoints (`hub_keys`, read by
  `repro.core.hub`),
- its final files (`targets`: headline tables, figures, its claims), which the
  Snakefile's `rule all` and dvc.yaml must name; `tables` (the headline tables,
  shown in the report) and `claims` (its claims CSV, merged into
  results/claims.csv).

`discover_papers()` imports every `repro.<package>.workflow` there is (core,
kernels and foundation have none), so core, rules/common.smk and the Snakefile
iterate over the papers without naming one. A new paper adds its package with
a `workflow.py`, `schemas/<name>.schema.yaml`, `rules/<name>.smk` (one include
line in the Snakefile), its config section in config.yaml and a dvc.yaml stage.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache

import repro

# Packages that are shared rooms, not papers.
SHARED_PACKAGES = frozenset({"core", "kernels", "foundation"})


def no_checks(config: Mapping) -> list[str]:
    return []


@dataclass(frozen=True)
class PaperSpec:
    """One paper, as the shared workflow sees it.

    name:     its package and config section ("agd"): repro.<name>, config[name].
    title:    the paper's title, for people.
    label:    its short name in tables, claims and the report's categories ("AGD").
    schema:   file name of its config schema part, in the directory of the shared
              schema (schemas/): the schema of config[name]; its `$defs` join the
              shared ones (and may use them, e.g. "#/$defs/posint").
    targets:  config -> every final file of the paper (tables, figures, its claims).
    tables:   its headline tables (a subset of targets), shown in the report.
    claims:   its claims CSV (merged into results/claims.csv), or None.
    checks:   config -> messages, each starting with the dotted key it is about;
              checks between values that a schema cannot express. Called only
              once the schema passed.
    hub_keys: (config key naming a checkpoint, config key of its subfolder or None)
              for every checkpoint the paper may load from the hub.
    """

    name: str
    title: str
    label: str
    schema: str
    targets: Callable[[Mapping], list[str]]
    tables: tuple[str, ...] = ()
    claims: str | None = None
    checks: Callable[[Mapping], list[str]] = no_checks
    hub_keys: tuple[tuple[str, str | None], ...] = field(default_factory=tuple)

    def __post_init__(self):
        if not self.name.isidentifier() or self.name != self.name.lower():
            raise ValueError(f"PaperSpec.name: {self.name!r} is not a lower-case package name")
        for key, subfolder in self.hub_keys:
            for k in (key, subfolder):
                if k is not None and not k.startswith(f"{self.name}."):
                    raise ValueError(
                        f"PaperSpec({self.name}).hub_keys: {k!r} is outside config section "
                        f"{self.name!r}"
                    )


@cache
def discover_papers() -> tuple[PaperSpec, ...]:
    """The PAPER spec of every repro.<package>.workflow module, sorted by name."""
    papers = []
    for module in pkgutil.iter_modules(repro.__path__):
        if not module.ispkg or module.name in SHARED_PACKAGES:
            continue
        name = f"repro.{module.name}.workflow"
        if importlib.util.find_spec(name) is None:
            continue
        spec = getattr(importlib.import_module(name), "PAPER", None)
        if not isinstance(spec, PaperSpec):
            raise TypeError(f"{name}: defines no PAPER = PaperSpec(...)")
        if spec.name != module.name:
            raise ValueError(f"{name}: PAPER.name is {spec.name!r}, expected {module.name!r}")
        papers.append(spec)
    return tuple(sorted(papers, key=lambda p: p.name))


def paper_targets(config: Mapping, papers: Sequence[PaperSpec] | None = None) -> list[str]:
    """Every paper's final files, each once, in registry order."""
    papers = discover_papers() if papers is None else papers
    return list(dict.fromkeys(t for p in papers for t in p.targets(config)))


def paper_claims(papers: Sequence[PaperSpec] | None = None) -> list[str]:
    """The claims CSVs of the papers that have one (inputs of results/claims.csv)."""
    papers = discover_papers() if papers is None else papers
    return [p.claims for p in papers if p.claims]
