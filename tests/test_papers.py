"""The paper registry: each paper registers itself; the shared workflow only iterates.

A paper is its package's `workflow.py` (PAPER = PaperSpec(...)), its schema part,
its rules file (one include line) and its dvc.yaml stage. These tests keep the
registry, the Snakefile, the schema and dvc.yaml from drifting apart.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from repro.core.config import cross_checks, load_schema, load_yaml, schema_errors
from repro.core.errors import ReproInputError
from repro.core.papers import PaperSpec, discover_papers, paper_claims, paper_targets

ROOT = Path(__file__).resolve().parents[1]
PAPERS = discover_papers()


def tiny():
    return load_yaml(ROOT / "config.yaml")


def test_the_papers_register_themselves():
    assert [p.name for p in PAPERS] == ["agd", "datadream", "fedre", "humo", "probex", "sla"]
    for paper in PAPERS:
        assert isinstance(paper, PaperSpec)
        assert (ROOT / "schemas" / paper.schema).is_file(), paper.schema
        targets = paper.targets(tiny())
        assert targets and len(set(targets)) == len(targets), paper.name
        assert set(paper.tables) <= set(targets), paper.name
        assert paper.claims is None or paper.claims in targets, paper.name
        assert all(t.startswith("results/") for t in targets), targets
    assert paper_claims() == [
        "results/claims/agd.csv",
        "results/claims/datadream.csv",
        "results/claims/fedre.csv",
        "results/claims/humo.csv",
        "results/claims/probex.csv",
        "results/claims/sla.csv",
    ]
    assert "results/sla_kernel.csv" in paper_targets(tiny())


def test_workflow_modules_import_no_torch():
    """Snakemake imports them (and the config, hub and foundation helpers) at parse time."""
    code = (
        "import sys\n"
        "from repro.core.papers import discover_papers\n"
        "import repro.core.config, repro.core.hub, repro.foundation.store\n"
        "papers = discover_papers()\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'diffusers', 'transformers', 'triton') "
        "and not getattr(sys.modules[m], '__lazy_stand_in__', False))\n"
        "print(len(papers), heavy)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    count, heavy = proc.stdout.strip().split(" ", 1)
    assert int(count) == len(PAPERS) and heavy == "[]", proc.stdout


def test_core_names_no_paper():
    """core finds the papers; it never imports or names one."""
    for path in (ROOT / "src/repro/core").glob("*.py"):
        text = path.read_text()
        for paper in PAPERS:
            assert f"repro.{paper.name}" not in text, (path, paper.name)
    common = (ROOT / "rules/common.smk").read_text()
    for paper in PAPERS:
        assert f'"{paper.name}"' not in common and f"{paper.name.upper()}" not in common


def test_the_snakefile_includes_each_papers_rules():
    snakefile = (ROOT / "Snakefile").read_text()
    for paper in PAPERS:
        assert f'include: "rules/{paper.name}.smk"' in snakefile, paper.name


def test_dvc_yaml_names_every_target_in_one_stage_cmd_and_outs():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]

    def declared(stage):
        paths = []
        for key in ("outs", "metrics", "plots"):
            for entry in stage.get(key, []):
                paths += list(entry) if isinstance(entry, dict) else [entry]
        return paths

    for paper in PAPERS:
        for target in paper.targets(tiny()):
            owners = [
                name
                for name, stage in stages.items()
                if target in stage["cmd"].split() and target in declared(stage)
            ]
            assert owners, f"{paper.name}: {target} is in no dvc.yaml stage's cmd and outs"


# ----------------------------------------------------------------------------- composition


def fake_paper(tmp_path, name="toy", defs=None, checks=None):
    """A shared schema and one paper's part in tmp_path, as a registered paper would have them."""
    shared = {
        "type": "object",
        "additionalProperties": False,
        "required": ["scale"],
        "$defs": {"posint": {"type": "integer", "minimum": 1}},
        "properties": {"scale": {"enum": ["tiny"]}},
    }
    part = {
        "$defs": defs or {"steps": {"$ref": "#/$defs/posint"}},
        "type": "object",
        "additionalProperties": False,
        "properties": {"steps": {"$ref": "#/$defs/steps"}},
    }
    (tmp_path / "config.schema.yaml").write_text(yaml.safe_dump(shared))
    (tmp_path / f"{name}.schema.yaml").write_text(yaml.safe_dump(part))
    spec = PaperSpec(
        name=name,
        title="A toy paper",
        label=name.upper(),
        schema=f"{name}.schema.yaml",
        targets=lambda config: [f"results/{name}.csv"],
        checks=checks or (lambda config: []),
    )
    return tmp_path / "config.schema.yaml", spec


def test_a_papers_schema_part_is_composed_under_its_name(tmp_path):
    shared, spec = fake_paper(tmp_path)
    schema = load_schema(shared, [spec])
    assert "toy" in schema["required"] and "steps" in schema["$defs"]
    assert schema_errors({"scale": "tiny", "toy": {"steps": 3}}, shared, [spec]) == []
    assert schema_errors({"scale": "tiny", "toy": {"steps": 0}}, shared, [spec]) == [
        "toy.steps: 0 is less than the minimum of 1"
    ]
    assert schema_errors({"scale": "tiny"}, shared, [spec]) == [
        "(top level): 'toy' is a required property"
    ]
    # Without the paper registered, its section is an unknown one.
    errors = schema_errors({"scale": "tiny", "toy": {"steps": 3}}, shared, [])
    assert errors and "'toy' was unexpected" in errors[0]


def test_a_papers_defs_may_not_shadow_shared_ones(tmp_path):
    shared, spec = fake_paper(tmp_path, defs={"posint": {"type": "integer"}})
    with pytest.raises(ReproInputError, match=r"toy.schema.yaml: \$defs.posint"):
        load_schema(shared, [spec])


def test_a_papers_checks_run_after_the_shared_ones():
    spec = PaperSpec(
        name="toy",
        title="A toy paper",
        label="TOY",
        schema="toy.schema.yaml",
        targets=lambda config: [],
        checks=lambda config: [f"toy.steps: {config['toy']['steps']} is odd"],
    )
    cfg = {**tiny(), "toy": {"steps": 3}}
    cfg["data"]["glyphs"]["val"]["seed"] = cfg["data"]["glyphs"]["seed"]
    errors = cross_checks(cfg, [spec])
    assert errors[0].startswith("data.glyphs.val.seed") and errors[-1] == "toy.steps: 3 is odd"


def test_paper_spec_refuses_hub_keys_outside_its_section():
    with pytest.raises(ValueError, match="outside config section 'toy'"):
        PaperSpec(
            name="toy",
            title="t",
            label="T",
            schema="toy.schema.yaml",
            targets=lambda config: [],
            hub_keys=(("agd.base.pretrained", None),),
        )


# ----------------------------------------------------------------------------- the plan


def dry_run(workdir, *args):
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(workdir)]
    proc = subprocess.run(
        [*cmd, "-n", "-p", "--cores", "8", *args], capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def jobs(plan):
    """[(rule, job block)] of a dry run's plan."""
    blocks = re.split(r"\n(?=(?:local)?rule \w+:\n)", plan)
    return [(b.split(":", 1)[0].split()[-1], b) for b in blocks if re.match(r"(local)?rule ", b)]


def test_rule_all_asks_for_every_papers_targets_and_each_stage_names_its_rule(tmp_path):
    config = tiny()
    plan = dry_run(tmp_path, "--configfile", str(ROOT / "configs/smoke.yaml"))
    planned = jobs(plan)
    (all_job,) = [block for rule, block in planned if rule == "all"]
    inputs = next(line for line in all_job.splitlines() if "input:" in line)
    for target in [*paper_targets(config), "results/claims.csv"]:
        assert target in inputs, target
    (claims,) = [block for rule, block in planned if rule == "claims"]
    assert all(c in claims for c in paper_claims())
    staged = set()
    for rule, block in planned:
        # Every stage with the common arguments names its own rule (MLflow's rule tag).
        named = re.findall(r"--rule (\S+)", block)
        assert set(named) <= {rule}, (rule, named)
        assert "--scale smoke" in block or not named, rule
        staged.update(named)
    assert {"digits", "agd_distill", "agd_eval", "sla_kernel_bench"} <= staged


def test_paper_scale_runs_multi_process_stages_under_torchrun(tmp_path):
    overlay = tmp_path / "procs.yaml"
    overlay.write_text(json.dumps({"agd": {"distill": {"processes": 3}, "gd": {"processes": 1}}}))
    plan = dry_run(
        tmp_path,
        "models/agd/adapters/base/cfg_offset_s0.safetensors",
        "models/agd/gd_s0",
        "--configfile",
        str(ROOT / "configs/paper.yaml"),
        str(overlay),
    )
    by_rule = dict(jobs(plan))
    distill, gd = by_rule["agd_distill"], by_rule["agd_gd"]
    assert (
        "-m torch.distributed.run --standalone --nproc_per_node 3 -m repro.agd.distill" in distill
    )
    assert "gpu=3" in distill
    assert "torch.distributed.run" not in gd and "gpu=1" in gd
    assert re.search(r"python\S* -m repro\.agd\.gd ", gd)


def test_agd_plans_the_base_first_then_the_chain_to_its_longest_evaluation(tmp_path):
    # Scheduling only (the jobs and their commands are the same in any order): on two
    # cores, the base's CFG chain ahead of the rest kept its 83-s evaluation from
    # running alone at the end.
    plan = dry_run(tmp_path, "results/agd_fid.csv")
    planned = []
    for rule, block in jobs(plan):
        found = re.search(r"wildcards: (.*)", block)
        wildcards = dict(w.split("=", 1) for w in found.group(1).split(", ")) if found else {}
        priority = re.search(r"priority: (\d+)", block)
        planned.append((rule, wildcards, int(priority.group(1)) if priority else 0))
    by_priority = {p: [(r, w) for r, w, q in planned if q == p] for p in (0, 1, 2, 3)}
    assert [r for r, _ in by_priority[3]] == ["agd_base"]
    assert sorted(r for r, _ in by_priority[1]) == ["agd_gd"] * 3
    chain = by_priority[2]
    assert sorted({r for r, _ in chain}) == ["agd_distill", "agd_eval", "agd_trajectories"]
    assert len(chain) == 3 + 12 + 1  # 3 seeds' trajectories, 4 types x 3 seeds, one eval
    for rule, wildcards in chain:
        assert wildcards["agd_checkpoint"] == "base", (rule, wildcards)
        assert wildcards.get("traj", "cfg") == "cfg" and wildcards.get("agd_method", "agd") == "agd"
    # Just outside the chain: the derived checkpoint's AGD evaluation, the standard
    # trajectories' adapters.
    rest = by_priority[0]
    assert (
        "agd_eval",
        {"agd_root": "agd", "agd_checkpoint": "derived", "agd_method": "agd"},
    ) in rest
    assert any(r == "agd_distill" and w["traj"] == "standard" for r, w in rest)
