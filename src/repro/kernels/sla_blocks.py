"""How many key blocks of a row SLA classifies critical and negligible: torch-free, so
the workflow's config checks (parsed by Snakemake) and the kernels count the same way."""

from __future__ import annotations

import math


def block_counts(num_kv_blocks: int, k_h: float, k_l: float) -> tuple[int, int]:
    """How many key blocks per row are critical (ceil of k_h) and negligible (floor of k_l).

    The 1e-9 slack stops 0.05 * 20 = 1.0000000000000002 from rounding up to 2.
    With k_h + k_l <= 1, ceil(k_h N) + floor(k_l N) < N + 1, so the two classes never
    overlap; the clamp only guards the slack.
    """
    n_critical = min(num_kv_blocks, math.ceil(k_h * num_kv_blocks - 1e-9))
    n_negligible = min(num_kv_blocks - n_critical, math.floor(k_l * num_kv_blocks + 1e-9))
    return max(n_critical, 0), max(n_negligible, 0)


def num_blocks(length: int, block: int) -> int:
    """Blocks of `block` tokens covering `length` tokens (the last one may be partial)."""
    return -(-length // block)
