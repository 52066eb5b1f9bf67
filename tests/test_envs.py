"""The conda envs of `snakemake --software-deployment-method conda` are complete and used.

- Every entry of envs/*.yaml is pinned exactly as in requirements.txt /
  constraints.txt; the only unpinned pip entry is the package itself (`-e ../..`),
  plus `-c` lines naming those two files; conda itself brings only python (the
  venv's X.Y) and pip.
- Every module a rule runs (`python -m repro...`) imports, with everything of repro
  it imports in turn (also inside functions), only packages its rule's env lists.
- Under conda the rules call the env's `python`, otherwise the Python that runs
  Snakemake: a dry run with a stand-in `conda` on PATH (no conda is installed here;
  Snakemake only asks it for its version, base prefix and channel priority before
  planning) shows the shell commands.

Relative paths in the envs: Snakemake copies an env file to
.snakemake/conda/<hash>.yaml (snakemake/deployment/conda.py, create_env) and conda
runs pip in that file's directory (conda/env/installers/pip.py, pip_workdir), so a
path there resolves against <working directory>/.snakemake/conda.
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ENVS = sorted((ROOT / "envs").glob("*.yaml"))
# Where pip runs when Snakemake creates an env (see the module docstring).
PIP_CWD = ROOT / ".snakemake" / "conda"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@cache
def pins() -> dict[str, str]:
    """requirements.txt + constraints.txt: canonical name -> exact version."""
    out = {}
    for name in ("requirements.txt", "constraints.txt"):
        for line in (ROOT / name).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                package, sep, version = line.partition("==")
                assert sep, f"{name}: {line!r} is not pinned with =="
                out[canonical(package)] = version.strip()
    return out


def env_spec(path: Path) -> tuple[list[str], list[str]]:
    """(conda entries, pip entries) of an env file."""
    spec = yaml.safe_load(path.read_text())
    conda, pip = [], []
    for dep in spec["dependencies"]:
        if isinstance(dep, dict):
            assert set(dep) == {"pip"}, f"{path.name}: unexpected {dep}"
            pip += dep["pip"]
        else:
            conda.append(str(dep))
    return conda, pip


def listed(path: Path) -> set[str]:
    """The canonical names of the packages an env installs by name."""
    return {canonical(e.partition("==")[0]) for e in env_spec(path)[1] if "==" in e}


@pytest.mark.parametrize("path", ENVS, ids=lambda p: p.name)
def test_env_is_pinned_like_requirements(path):
    conda, pip = env_spec(path)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert sorted(conda) == sorted([f"python={version}", "pip"]), conda
    editable, constraints, problems = [], [], []
    for entry in pip:
        if entry.startswith("-e "):
            editable.append(entry[3:].strip())
        elif entry.startswith("-c "):
            constraints.append(entry[3:].strip())
        elif "==" in entry:
            name, _, version = entry.partition("==")
            want = pins().get(canonical(name))
            if want != version.strip():
                problems.append(f"{entry} (requirements/constraints: {want or 'not pinned'})")
        else:
            problems.append(f"{entry} (unpinned)")
    assert not problems, f"{path.name}: {problems}"
    names = [canonical(e.partition("==")[0]) for e in pip if "==" in e]
    assert len(names) == len(set(names)), f"{path.name}: a package listed twice"
    # The package itself, once, editable, resolving to this repository.
    assert len(editable) == 1, f"{path.name}: the package itself must be there once: {editable}"
    assert (PIP_CWD / editable[0]).resolve() == ROOT
    # Its dependencies (pyproject.toml) come at make setup's pins.
    resolved = sorted((PIP_CWD / c).resolve() for c in constraints)
    assert resolved == [ROOT / "constraints.txt", ROOT / "requirements.txt"], constraints


# ---- every module a rule runs imports only what its env lists ----


def module_file(module: str) -> Path | None:
    base = ROOT / "src" / Path(*module.split("."))
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


@cache
def third_party_imports(module: str) -> frozenset[str]:
    """Top-level names of the non-stdlib, non-repro modules that `module` imports,
    directly or through the repro modules it imports (every import statement,
    also those inside functions: a superset of what one run needs)."""
    seen, found, todo = set(), set(), [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = module_file(name)
        if path is None:  # `from repro.x import function`: not a module
            continue
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parents' __init__
        package = parts if path.name == "__init__.py" else parts[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package[: len(package) - node.level + 1] + [base]).strip(".")
                imported = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for full in imported:
                top = full.split(".")[0]
                if top == "repro":
                    todo.append(full)
                elif top and top != "__future__" and top not in sys.stdlib_module_names:
                    found.add(top)
    return frozenset(found)


def rules() -> dict[str, tuple[str | None, list[str]]]:
    """rule -> (its conda env file, the repro modules it runs), from rules/*.smk."""
    out = {}
    for smk in sorted((ROOT / "rules").glob("*.smk")):
        blocks = re.split(r"^rule (\w+):", smk.read_text(), flags=re.M)
        for name, body in zip(blocks[1::2], blocks[2::2], strict=True):
            env = re.search(r"^\s*conda:\s*\n?\s*[\"']([^\"']+)[\"']", body, flags=re.M)
            modules = re.findall(r"(?:-m |[\"'])(repro(?:\.\w+)+)", body)
            modules = sorted({m for m in modules if module_file(m)})
            out[name] = ((smk.parent / env.group(1)).resolve() if env else None, modules)
    return out


def test_rules_are_found():
    found = rules()
    # The parse above must see the rules; if their form changes, update it.
    assert {"digits", "agd_base", "agd_throughput", "claims", "sla_kernel_bench"} <= set(found)
    assert found["agd_base"] == ((ROOT / "envs" / "agd.yaml"), ["repro.agd.base"])


def test_every_rule_imports_only_what_its_env_lists():
    distributions = {
        top: {canonical(d) for d in dists}
        for top, dists in importlib.metadata.packages_distributions().items()
    }
    problems = []
    for rule, (env, modules) in rules().items():
        if not modules:
            continue
        if env is None:
            problems.append(f"rule {rule} runs {modules} but has no conda: env")
            continue
        have = listed(env)
        for module in modules:
            for top in sorted(third_party_imports(module)):
                dists = distributions.get(top)
                if not dists:
                    problems.append(f"{module} imports {top}: no installed distribution has it")
                elif not dists & have:
                    problems.append(
                        f"rule {rule} ({env.name}): {module} imports {top} "
                        f"({'/'.join(sorted(dists))}), not in the env"
                    )
    assert not problems, "\n".join(problems)


# ---- under conda, the env's python runs the stages ----

# Answers the three questions Snakemake asks conda before planning a dry run.
FAKE_CONDA = """#!/bin/sh
case "$*" in
  "info --json") echo '{"conda_prefix": "/nonexistent/conda", "platform": "linux-64"}' ;;
  "--version") echo "conda 24.7.1" ;;
  "config --get channel_priority --json") echo '{"get": {"channel_priority": "strict"}}' ;;
  *) echo "fake conda: $*" >&2; exit 1 ;;
esac
"""


def shell_commands(tmp_path, *args, path=None):
    env = {**os.environ}
    if path:
        env["PATH"] = f"{path}{os.pathsep}{env['PATH']}"
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile")]
    cmd += ["-d", str(tmp_path / "work"), "-n", "-p", "--profile", str(ROOT / "profiles/smoke")]
    proc = subprocess.run(cmd + list(args), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [
        line.removeprefix("Shell command: ")
        for line in (proc.stdout + proc.stderr).splitlines()
        if line.startswith("Shell command: ") and line != "Shell command: None"  # rule all
    ]
    assert lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return lines


@pytest.mark.slow
def test_rules_run_the_envs_python_under_conda(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "conda").write_text(FAKE_CONDA)
    (fake / "conda").chmod(0o755)
    # The whole DAG at smoke scale: rules of every env.
    with_conda = shell_commands(tmp_path, "--sdm", "conda", path=fake)
    assert all(line.startswith("python -m ") for line in with_conda), with_conda
    without = shell_commands(tmp_path)
    assert len(without) == len(with_conda)
    python = shlex.quote(sys.executable)
    assert all(line.startswith(f"{python} -m ") for line in without), without
