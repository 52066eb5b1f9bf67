"""The lazy stand-ins of diffusers' model families: same classes, a fraction of the imports."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from repro.core.lazy_diffusers import submodules_by_name


def _python(code: str, **env) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


LOADED = (
    "import sys, repro\n"
    "from diffusers import DiTTransformer2DModel, WanTransformer3DModel, UNet2DConditionModel\n"
    "from diffusers import AutoencoderKLWan\n"
    "from diffusers.models.transformers.transformer_wan import WanTransformerBlock\n"
    "print(sum(m.startswith('diffusers.models.transformers.') for m in sys.modules))\n"
    "print(DiTTransformer2DModel.__module__, WanTransformer3DModel.__module__)\n"
)


def test_a_class_costs_its_own_module_not_the_whole_family():
    count, dit, wan = _python(LOADED)
    assert int(count) <= 6  # DiT, Wan and what they import, not the 77 of the family
    assert dit == "diffusers.models.transformers.dit_transformer_2d"
    assert wan == "diffusers.models.transformers.transformer_wan"
    # Off: the family's __init__ runs, as diffusers ships it.
    count_off, _, _ = _python(LOADED, REPRO_LAZY_DIFFUSERS="0")
    assert int(count_off) > 50


def test_every_name_of_the_real_package_resolves_to_the_same_object():
    code = (
        "import repro, importlib, ast, pathlib\n"
        "import diffusers.models.transformers as lazy\n"
        "import diffusers.models.unets as lazy_unets\n"
        "from repro.core.lazy_diffusers import submodules_by_name\n"
        "names = sorted(submodules_by_name(pathlib.Path(lazy.__file__)))\n"
        "objs = {n: getattr(lazy, n) for n in names}\n"
        "print(len(names), all(getattr(o, '__name__', n) == n for n, o in objs.items()))\n"
        "print(lazy_unets.UNet2DConditionModel.__module__)\n"
    )
    count, same, unet = _python(code)
    assert int(count) > 50 and same == "True"
    assert unet == "diffusers.models.unets.unet_2d_condition"


def test_a_name_bound_another_way_runs_the_real_init_once():
    code = (
        "import repro\n"
        "import diffusers.models.transformers as t\n"
        "print(t.is_torch_available())\n"  # imported from ...utils, not a submodule
        "print(t._real_init_ran, t.FluxTransformer2DModel.__name__)\n"
    )
    assert _python(code) == ["True", "True", "FluxTransformer2DModel"]


def test_submodules_by_name_reads_aliases_and_nested_blocks(tmp_path: Path):
    init = tmp_path / "__init__.py"
    init.write_text(
        "from ...utils import is_torch_available\n"
        "if is_torch_available():\n"
        "    from .alpha import A, B as Bee\n"
        "    from .beta.gamma import C\n"
        "from .alpha import D\n"
    )
    assert submodules_by_name(init) == {"A": "alpha", "Bee": "alpha", "C": "beta", "D": "alpha"}
