"""Import diffusers' model families lazily: one class costs its own module, not ~90.

`from diffusers import DiTTransformer2DModel` runs `diffusers/models/transformers/__init__.py`,
which imports every transformer diffusers ships (77 modules: Flux, SD3, HunyuanVideo, ...)
before the one asked for; `unets` and `autoencoders` do the same. Each Snakemake job
is a fresh process, so every job paid that: 1.6 s of CPU measured here (5.1 -> 3.5 s for
`import torch; from diffusers import DiTTransformer2DModel`), times the ~300 jobs of
the tiny DAG.

`install()` puts a stand-in package module for each family into `sys.modules` before
diffusers is imported. It has the real package's `__path__`, so submodules import as
usual, and a module `__getattr__` that imports the one submodule defining a name, found
by reading (not running) the real `__init__.py`. A name the real `__init__.py` binds in
some other way makes the stand-in run the real `__init__.py` once, in place: nothing a
caller can ask for is missing, it only costs what it used to.

Installed by `repro/__init__.py`, so every stage and test gets it; REPRO_LAZY_DIFFUSERS=0
turns it off (to rule it out when diffusers misbehaves).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import sys
import types
from pathlib import Path

FAMILIES = ("transformers", "unets", "autoencoders")


def install(families: tuple[str, ...] = FAMILIES) -> list[str]:
    """Put the stand-ins in place; returns the families installed (none if diffusers is
    already imported, absent, or REPRO_LAZY_DIFFUSERS=0)."""
    if os.environ.get("REPRO_LAZY_DIFFUSERS", "1") == "0" or "diffusers.models" in sys.modules:
        return []
    spec = importlib.util.find_spec("diffusers")
    if spec is None or spec.origin is None:
        return []
    models = Path(spec.origin).parent / "models"
    installed = []
    for family in families:
        init = models / family / "__init__.py"
        name = f"diffusers.models.{family}"
        if name in sys.modules or not init.is_file():
            continue
        sys.modules[name] = _stand_in(name, init)
        installed.append(family)
    return installed


def submodules_by_name(init: Path) -> dict[str, str]:
    """{name: submodule} for every `from .submodule import name [as alias]` in `init`."""
    where: dict[str, str] = {}
    for node in ast.walk(ast.parse(init.read_text(), filename=str(init))):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            for alias in node.names:
                where.setdefault(alias.asname or alias.name, node.module.split(".")[0])
    return where


def _stand_in(name: str, init: Path) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__file__ = str(init)
    module.__path__ = [str(init.parent)]
    module.__package__ = name
    module.__lazy_stand_in__ = True  # imports nothing until used (tests tell it apart)
    where = submodules_by_name(init)

    def __getattr__(attr: str):
        if attr in where:
            value = getattr(importlib.import_module(f"{name}.{where[attr]}"), attr)
            setattr(module, attr, value)
            return value
        if attr.startswith("__") or module.__dict__.get("_real_init_ran"):
            raise AttributeError(f"module {name!r} has no attribute {attr!r}")
        # A name bound some other way: run the real __init__ in this module, once.
        module._real_init_ran = True
        code = compile(init.read_text(), str(init), "exec")
        exec(code, module.__dict__)  # noqa: S102 - diffusers' own __init__.py
        return getattr(module, attr)

    module.__getattr__ = __getattr__
    return module
