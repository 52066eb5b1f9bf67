"""repro.kernels.sla_compile_report: the kernels compiled for sm_90 on a CPU, read back.

Runs in a subprocess with TRITON_INTERPRET=0 (this session's Triton kernels are built for
the interpreter, which compiles nothing)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from repro.kernels import sla_compile_report as report


def test_reports_registers_and_spills_of_a_real_sm90_build():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    cmd = [sys.executable, "-m", "repro.kernels.sla_compile_report", "--kernels", "kv_state",
           "--block-q", "64", "--warps", "8", "--stages", "2", "--head-dim", "64"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [line.split() for line in proc.stdout.splitlines()]
    assert lines[0][:2] == ["kernel", "variant"]
    rows = {tuple(line[:2]): line[2:] for line in lines[1:]}
    assert set(rows) == {("kv_state", "blocks+total"), ("kv_state", "total")}
    for block, warps, stages, regs, stack, async_loads, wgmma in rows.values():
        assert (block, warps, stages) == ("64x64", "8", "2")
        assert 0 < int(regs) <= 255 and int(stack) >= 0
        # h_j = phi(K_j)^T V_j, 64 x 64 x 64: a Hopper tensor-core dot (wgmma): an sm_90 build.
        assert int(wgmma) >= 1 and int(async_loads) >= 0


def test_unknown_kernel_is_named():
    with pytest.raises(ValueError, match="kernel 'fwd2'"):
        report._variants("fwd2", 128, 64, 64)
