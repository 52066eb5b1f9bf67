"""repro.core.cli: the stage command line, threads and the allocator setting."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from repro.core.cli import parse_stage_args, stage_parser

# 50 rounds of a forward-like pattern (four 8-24 MB activations, then all freed);
# prints the minor page faults the rounds cost.
FAULTS = """
import json, resource, sys, torch
from repro.core.cli import keep_freed_memory
applied = keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def step():
    xs = [torch.ones(n) for n in (2_000_000, 4_000_000, 2_000_000, 6_000_000)]
    return sum(x.sum() for x in xs)
for _ in range(3):
    step()
before = faults()
for _ in range(50):
    step()
print(json.dumps({"applied": applied, "faults": faults() - before}))
"""


def run_faults(env_extra: dict) -> dict:
    env = {**os.environ, **env_extra}
    out = subprocess.run(
        [sys.executable, "-c", FAULTS], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_keep_freed_memory_stops_page_faults_of_a_reused_buffer():
    tuned = run_faults({"REPRO_MALLOC_TUNING": "1"})
    default = run_faults({"REPRO_MALLOC_TUNING": "0"})
    assert tuned["applied"] is True
    assert default["applied"] is False
    # glibc's default gives (some of) the freed 56 MB back each round and faults it in
    # again: 3,900-11,700 faults per round measured. Kept, it is reused: 0-120 per round.
    assert default["faults"] > 50 * 1000
    assert tuned["faults"] < 50 * 500


def test_stage_args_parse_params_and_threads(tmp_path):
    import torch

    params = tmp_path / "p.json"
    params.write_text(json.dumps({"steps": 3}))
    before = torch.get_num_threads()
    try:
        args = parse_stage_args(stage_parser("x"), ["--params", f"@{params}", "--threads", "1"])
        assert args.params == {"steps": 3}
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_stage_args_refuse_params_that_are_not_an_object():
    with pytest.raises(SystemExit):
        stage_parser("x").parse_args(["--params", "[1, 2]"])
