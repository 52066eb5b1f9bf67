"""repro.core.each: several runs of one stage in one process, each as if alone."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from repro.core.each import run_each, split_runs
from repro.core.errors import ReproInputError

# A stage module: draws from every global random state, logs its command, writes --out.
FAKE_STAGE = """
import random, sys
import numpy as np
import torch
from repro.core.errors import ReproInputError
from repro.core.stage import Stage, run

def main(argv=None):
    stage = Stage("fake", paper="p", out="a text file")
    stage.parser.add_argument("--fail", action="store_true")
    args = stage.start(argv)
    if args.fail:
        raise ReproInputError(f"{args.out}: planted failure")
    draws = [torch.rand(1).item(), float(np.random.rand()), random.random()]
    with open(args.out, "w") as f:
        f.write(repr(draws) + "\\n")

if __name__ == "__main__":
    run(main)
"""


def test_split_runs_by_hand():
    assert split_runs(["--", "a", "1", "--", "--b", "x y", "--"]) == [
        ["a", "1"],
        ["--b", "x y"],
        [],
    ]
    with pytest.raises(ReproInputError, match="must follow '--'"):
        split_runs(["a", "--", "b"])
    with pytest.raises(ReproInputError, match="must follow '--'"):
        split_runs([])


def test_every_run_starts_from_the_same_global_random_states():
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    expected = [torch.rand(1).item(), float(np.random.rand()), random.random()]
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    seen = []

    def main(argv):
        seen.append((argv, [torch.rand(1).item(), float(np.random.rand()), random.random()]))
        torch.rand(100)  # a run that draws more must not move the next one

    run_each(main, [["a"], ["b", "c"], []])
    assert [argv for argv, _ in seen] == [["a"], ["b", "c"], []]
    assert all(draws == expected for _, draws in seen)


@pytest.fixture
def fake(tmp_path):
    (tmp_path / "fake_stage.py").write_text(textwrap.dedent(FAKE_STAGE))
    env = {**os.environ, "REPRO_MLFLOW": "0"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    return tmp_path, env


def _python(args, env, cwd):
    return subprocess.run(
        [sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_runs_in_one_process_start_alike_and_log_their_own_commands(fake):
    tmp_path, env = fake
    grouped = _python(
        ["-m", "repro.core.each", "fake_stage", "--", "--out", "a.txt", "--", "--out", "b.txt"],
        env,
        tmp_path,
    )
    assert grouped.returncode == 0, grouped.stderr
    # The second run draws what the first drew: it starts from the same global states.
    assert (tmp_path / "a.txt").read_text() == (tmp_path / "b.txt").read_text()
    # Each run logs its own command as it can be rerun alone.
    assert "command: python -m fake_stage --out a.txt" in grouped.stdout
    assert "command: python -m fake_stage --out b.txt" in grouped.stdout
    assert "run 2 of 2" in grouped.stdout


def test_a_failing_run_ends_the_job_with_one_line_and_later_runs_never_start(fake):
    tmp_path, env = fake
    args = ["-m", "repro.core.each", "fake_stage", "--", "--out", "a.txt"]
    args += ["--", "--out", "b.txt", "--fail", "--", "--out", "c.txt"]
    proc = _python(args, env, tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["error: b.txt: planted failure"]
    assert (tmp_path / "a.txt").exists() and not (tmp_path / "c.txt").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["no_such_stage_module", "--", "--out", "x"], "no stage module 'no_such_stage_module'"),
        (["os", "--", "--out", "x"], "os has no main(argv)"),
        (["fake_stage", "--out", "x"], "must follow '--'"),
        ([], "usage: MODULE -- ARGS"),
    ],
)
def test_bad_command_lines_are_named(fake, args, message):
    tmp_path, env = fake
    proc = _python(["-m", "repro.core.each", *args], env, tmp_path)
    assert proc.returncode == 2
    assert message in proc.stderr and len(proc.stderr.splitlines()) == 1
