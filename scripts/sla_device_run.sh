#!/usr/bin/env bash
# The SLA kernels on a GPU machine, in one command (issue 16):
#
#   bash scripts/sla_device_run.sh [extra repro.sla.kernel_device options]
#
# Runs `python -m repro.sla.kernel_device` from the repository root with the config's
# sla.kernel_bench params (config.yaml; --params JSON overrides): the correctness check
# against the float64 reference, then the timed table within --budget-s (default 420 s).
# Writes device_info.json, correctness.csv, sla_kernel.csv and autotune.log (everything
# printed, Triton's autotuning choices included) into $OUT, or results/ when OUT is
# unset. The whole run is capped at 480 s; the bench's per-point lines in the log keep
# the numbers even if the cap cuts the run short. Needs torch, triton, pandas,
# safetensors and pyyaml only; PYTHON picks the interpreter (default: python).
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
out="${OUT:-$root/results}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"  # a relative OUT is relative to where this was called from
cd "$root"
export TRITON_PRINT_AUTOTUNING=1 PYTHONUNBUFFERED=1 PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"

timeout --kill-after=10 480 "${PYTHON:-python}" -m repro.sla.kernel_device \
    --out-dir "$out" --config config.yaml "$@" 2>&1 | tee "$out/autotune.log"
