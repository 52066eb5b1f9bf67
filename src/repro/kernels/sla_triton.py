"""Fused Triton kernels of sparse-linear attention (SLA, arXiv 2509.24006), forward and backward.

The mathematics is that of `sla_reference.py` (read it first); this file computes the
same (O_s, O_l) with five kernels, written in the style of Triton's fused-attention
tutorial. Per (batch, head), with b_q x b_kv blocks, C critical key blocks per query
block, scale = 1/sqrt(D) and phi the feature map over the head dimension:

forward
  1. _sla_kv_state_kernel   grid (Nk, B*H)   h_j = phi(K_j)^T V_j,  z_j = colsum phi(K_j)
     (torch)                                  H_tot = sum_j h_j,     Z_tot = sum_j z_j
  2. _sla_fwd_kernel        grid (Nq, B*H)   O_s: online-softmax attention over the C
                                              critical blocks of the row, lse saved;
                                              O_l = phi(Q_i) H_i / (phi(Q_i).Z_i + eps)
backward (FlashAttention-2 for the sparse branch, the same pre-aggregation for the linear one)
  3. _sla_bwd_preprocess_kernel (Nq, B*H)  delta_s = rowsum(dO_s * O_s), delta_l the same
                                              with O_l recomputed in fp32 from H_i;
                                              dH_i = f^T dO_l, dZ_i = -f^T delta_l,
                                              f = phi(Q_i) / den
     (torch)                                  dH_tot = sum_i dH_i,   dZ_tot = sum_i dZ_i
  4. _sla_bwd_dq_kernel     grid (Nq, B*H)   dQ = sparse dQ over the critical LUT
                                              + J_phi(Q)^T [(dO_l H_i^T - delta_l Z_i) / den]
  5. _sla_bwd_dkdv_kernel   grid (Nk, B*H)   dK, dV: sparse part over the query blocks for
                                              which this key block is critical (transposed
                                              LUT); linear part dh_j, dz_j aggregated from
                                              dH_i, dZ_i, then dV += phi(K_j) dh_j,
                                              dK += J_phi(K_j)^T (V_j dh_j^T + dz_j)

Design choices (why):

* Block-sparse iteration through lookup tables: the forward and dQ kernels walk
  `mask.critical` (ascending key blocks, C per row). dK/dV need the transpose, whose
  length varies per key block, so it is a CSR table (offsets + query-block indices)
  built in PyTorch with one sort, no device sync. Each kernel owns its output tile and
  writes it once: no atomics, deterministic results, and autotuning can re-run any
  kernel safely.
* Pre-aggregation (the paper's trick): the linear state of row i is the sum of h_j over
  its marginal blocks. "marginal" walks the row's non-marginal blocks (critical +
  negligible) and subtracts them from H_tot; when a call has fewer marginal than
  non-marginal blocks per row, it adds the marginal ones to zero instead (same LUT
  machinery, LIN_ADD): the work is min(#marginal, #non-marginal) state loads per row,
  and H_tot - (almost all of H_tot) never happens, so there is no catastrophic fp32
  cancellation (a row with no marginal block gives exactly 0, like the reference).
  "all" is H_tot with an empty subtraction list. The backward aggregates dH_i onto key
  blocks the same way.
* Precision: the sparse branch multiplies tiles with tl.dot in the inputs' dtype
  (fp16/bf16 tensor cores, P and dS rounded to it as in FlashAttention; fp32 inputs in
  IEEE fp32, so they match the reference to ~1e-6), always with fp32 accumulation.
  The linear branch's products (one per block, not per block pair: cheap) take fp32
  operands (tf32 tensor cores for 16-bit inputs), since sums of phi(k) v over thousands
  of keys overflow fp16. Softmax statistics, denominators, z and every sum are fp32.
  The per-block D x D states that the kernels gather (h_j, dH_i: the bulk of the
  linear branch's memory traffic) are stored in bf16 for bf16 inputs (half the
  traffic, the inputs' own precision) and in fp32 otherwise (fp16 would overflow, bf16
  would be coarser than fp16 inputs); totals are summed in fp32 from the stored
  values, so a subtraction removes exactly what the total holds. The row states H_i
  saved for the backward stay fp32 (read once; dQ of relu/elu rows with small
  denominators is sensitive to them).
* Cost per query block: C critical (K_j, V_j) tile pairs in the sparse branch and
  min(#marginal, #non-marginal) D x D state loads in the linear one. Negligible blocks
  cost no FLOPs, but under pre-aggregation each is one state load; at b_kv = 64, D = 128
  a bf16 h_j (32 KB) weighs as much as K_j and V_j together, so at the paper's k_h 5 %,
  k_l 10 % the linear branch moves about twice the sparse branch's bytes. The dK/dV
  kernel's work per key block is its CSR length: a key block that is critical for every
  row (an attention sink) makes one long program.
* Any length: padded query rows are masked on load/store, padded key tokens get logit
  -inf in the sparse branch and phi(k) = 0 in the states. Any head dim that is a multiple
  of 8 in [16, 128]: tiles are BLOCK_D = next power of two wide, the extra columns masked
  (phi of a padded column is 0).
* The CPU interpreter (TRITON_INTERPRET=1, read by `triton.jit` when a kernel is
  *decorated*, i.e. when this module is imported) multiplies bf16 tiles as raw integers,
  so under the interpreter bf16 operands are upcast to fp32 right before tl.dot
  (exact for bf16 values); on CUDA the bf16 dot runs on tensor cores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from repro.kernels.sla_reference import (
    CRITICAL,
    LINEAR_EPS,
    MARGINAL,
    BlockMask,
    check_sla_args,
)

__all__ = ["sla_triton"]

# Compile-time codes of the feature map and of the linear-branch aggregation.
PHI_CODE = {"softmax": 0, "elu": 1, "relu": 2}
LIN_NONE, LIN_ADD, LIN_SUBTRACT = 0, 1, 2


# Whether the kernels below were built for the CPU interpreter. Triton reads
# TRITON_INTERPRET when @triton.jit decorates a function, i.e. at this module's import;
# setting it later changes nothing for these kernels.
INTERPRETED = bool(triton.knobs.runtime.interpret)


# ----------------------------------------------------------------------------------------
# Autotuning: only num_warps / num_stages (block sizes are fixed by the block mask).
# On CPU tensors (the interpreter) the first config is taken and nothing is benchmarked.
# ----------------------------------------------------------------------------------------
_CONFIGS = [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (2, 3, 4)]


def _prune_on_cpu(configs, named_args, **kwargs):
    first = next(v for v in named_args.values() if isinstance(v, torch.Tensor))
    return configs if first.is_cuda else configs[:1]


def _autotune(key):
    return triton.autotune(
        configs=_CONFIGS, key=key, prune_configs_by={"early_config_prune": _prune_on_cpu}
    )


# ----------------------------------------------------------------------------------------
# Small building blocks
# ----------------------------------------------------------------------------------------
@triton.jit
def _dot(a, b, DOT_DTYPE: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """a @ b with operands rounded to the inputs' dtype and an fp32 accumulator."""
    a = a.to(DOT_DTYPE)
    b = b.to(DOT_DTYPE)
    if UPCAST:  # interpreter only: it cannot multiply bf16 tiles; fp32 holds them exactly
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _dot_fp32(a, b, LIN_PREC: tl.constexpr):
    """a @ b with fp32 operands, for the linear branch (tf32 tensor cores for 16-bit inputs).

    Its products are one per block, not per block pair, so their cost is small, and
    sums of phi(k) v over thousands of keys can exceed the fp16 range.
    """
    return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=LIN_PREC)


@triton.jit
def _feature_map(x, d_valid, PHI_ID: tl.constexpr):
    """phi(x) over the head dimension of an fp32 tile; padded columns (d >= D) give 0.

    softmax: exp(x - max) / sum exp(x - max)      elu: x + 1 (x > 0), exp(x) (x <= 0)
    relu:    max(x, 0)
    """
    if PHI_ID == 0:
        x = tl.where(d_valid[None, :], x, float("-inf"))
        e = tl.exp(x - tl.max(x, 1)[:, None])
        f = e / tl.sum(e, 1)[:, None]
    elif PHI_ID == 1:
        f = tl.where(x > 0, x + 1.0, tl.exp(tl.minimum(x, 0.0)))
    else:
        f = tl.maximum(x, 0.0)
    return tl.where(d_valid[None, :], f, 0.0)


@triton.jit
def _feature_map_bwd(x, f, df, PHI_ID: tl.constexpr):
    """dL/dx from dL/df = df, f = phi(x) (fp32 tiles, rows independent).

    softmax: f * (df - sum_d df f)   elu: df (x > 0), df * exp(x) = df * f (x <= 0)
    relu:    df * [x > 0]
    """
    if PHI_ID == 0:
        dx = f * (df - tl.sum(df * f, 1)[:, None])
    elif PHI_ID == 1:
        dx = tl.where(x > 0, df, df * f)
    else:
        dx = tl.where(x > 0, df, 0.0)
    return dx


# ----------------------------------------------------------------------------------------
# Forward 1: per-key-block linear-attention states
# ----------------------------------------------------------------------------------------
@_autotune(key=["HEAD_DIM", "BLOCK_N", "PHI_ID"])
@triton.jit
def _sla_kv_state_kernel(
    K, V, H_STATE, Z_STATE,  # in: (B*H, Lk, D); out: (B*H, Nk, D, D), (B*H, Nk, D)
    len_k, n_k_blocks,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    PHI_ID: tl.constexpr, LIN_PREC: tl.constexpr,
):  # fmt: skip
    # h_j = phi(K_j)^T V_j (D x D) and z_j = colsum phi(K_j) (D); padded keys contribute 0.
    pid_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_valid = offs_n < len_k
    d_valid = offs_d < HEAD_DIM
    kv_tile = bh * len_k * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    kv_mask = n_valid[:, None] & d_valid[None, :]
    k = tl.load(K + kv_tile, mask=kv_mask, other=0.0)
    v = tl.load(V + kv_tile, mask=kv_mask, other=0.0)
    phi_k = _feature_map(k.to(tl.float32), d_valid, PHI_ID)
    phi_k = tl.where(n_valid[:, None], phi_k, 0.0)

    h = _dot_fp32(tl.trans(phi_k), v, LIN_PREC)  # (BLOCK_D, BLOCK_D), fp32
    z = tl.sum(phi_k, 0)

    block = bh * n_k_blocks + pid_n
    state = offs_d[:, None] * HEAD_DIM + offs_d[None, :]
    state_mask = d_valid[:, None] & d_valid[None, :]
    tl.store(H_STATE + block * HEAD_DIM * HEAD_DIM + state, h.to(H_STATE.dtype.element_ty),
             mask=state_mask)  # fmt: skip
    tl.store(Z_STATE + block * HEAD_DIM + offs_d, z, mask=d_valid)


# ----------------------------------------------------------------------------------------
# Forward 2: sparse branch (block-sparse FlashAttention) + linear branch, one query block
# ----------------------------------------------------------------------------------------
@_autotune(key=["HEAD_DIM", "BLOCK_M", "BLOCK_N", "PHI_ID", "LIN_MODE"])
@triton.jit
def _sla_fwd_kernel(
    Q, K, V,                      # (B*H, Lq, D), (B*H, Lk, D), (B*H, Lk, D)
    CRIT_LUT,                     # (B*H, Nq, n_crit) int32: critical key blocks, ascending
    LIN_LUT,                      # (B*H, Nq, n_lin) int32: key blocks to add / subtract
    H_STATE, Z_STATE,             # per key block h_j, z_j
    H_TOTAL, Z_TOTAL,             # (B*H, D, D), (B*H, D) fp32: sums over all key blocks
    OS, OL,                       # outputs (B*H, Lq, D), q's dtype
    LSE, DEN,                     # (B*H, Lq) fp32: base-2 log-sum-exp, linear denominator
    H_ROW, Z_ROW,                 # (B*H, Nq, D, D), (B*H, Nq, D) fp32: the row's states
    sm_scale, len_q, len_k, n_q_blocks, n_k_blocks, n_crit, n_lin,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, PHI_ID: tl.constexpr, LIN_MODE: tl.constexpr,
    SAVE_ROW_STATE: tl.constexpr, EPS: tl.constexpr,
    DOT_DTYPE: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    LIN_PREC: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    row = bh * n_q_blocks + pid_m  # this program's (batch*head, query block)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < len_q
    d_valid = offs_d < HEAD_DIM
    q_tile = offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    q_mask = m_valid[:, None] & d_valid[None, :]
    q_base = bh * len_q * HEAD_DIM
    k_base = bh * len_k * HEAD_DIM
    q = tl.load(Q + q_base + q_tile, mask=q_mask, other=0.0)

    # ---- sparse branch: online softmax over the critical key blocks -------------------
    # For each block: s = Q K_j^T scale (base 2), m' = max(m, rowmax s), p = 2^(s - m'),
    # l = l 2^(m - m') + rowsum p, acc = acc 2^(m - m') + p V_j;  O_s = acc / l.
    qk_scale = sm_scale * 1.4426950408889634  # log2(e): exp(x) = exp2(x log2 e)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    crit = CRIT_LUT + row * n_crit
    for c in tl.range(0, n_crit):
        start_n = tl.load(crit + c) * BLOCK_N
        n_valid = start_n + offs_n < len_k
        kv_tile = (start_n + offs_n)[:, None] * HEAD_DIM + offs_d[None, :]
        kv_mask = n_valid[:, None] & d_valid[None, :]
        k = tl.load(K + k_base + kv_tile, mask=kv_mask, other=0.0)
        v = tl.load(V + k_base + kv_tile, mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), DOT_DTYPE, UPCAST, PREC) * qk_scale
        s = tl.where(n_valid[None, :], s, float("-inf"))  # padded keys of the last block
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every block has a valid key
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)  # 0 on the first block (m_i = -inf)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p, v, DOT_DTYPE, UPCAST, PREC)
        m_i = m_new
    # No critical block (C = 0): l = 0, O_s = 0 and lse = m = -inf (the backward skips it).
    l_i = tl.where(l_i > 0, l_i, 1.0)
    tl.store(OS + q_base + q_tile, (acc / l_i[:, None]).to(OS.dtype.element_ty), mask=q_mask)
    tl.store(LSE + bh * len_q + offs_m, m_i + tl.log2(l_i), mask=m_valid)

    # ---- linear branch: O_l = phi(Q) H_i / (phi(Q) . Z_i + eps) ------------------------
    # Pre-aggregation: H_i = H_tot - sum_{j in LUT} h_j (LIN_SUBTRACT) or
    #                  H_i =   0   + sum_{j in LUT} h_j (LIN_ADD), the same for Z_i.
    if LIN_MODE != 0:  # not LIN_NONE
        state = offs_d[:, None] * HEAD_DIM + offs_d[None, :]
        state_mask = d_valid[:, None] & d_valid[None, :]
        if LIN_MODE == 2:  # LIN_SUBTRACT
            h = tl.load(H_TOTAL + bh * HEAD_DIM * HEAD_DIM + state, mask=state_mask, other=0.0)
            z = tl.load(Z_TOTAL + bh * HEAD_DIM + offs_d, mask=d_valid, other=0.0)
        else:
            h = tl.zeros([BLOCK_D, BLOCK_D], dtype=tl.float32)
            z = tl.zeros([BLOCK_D], dtype=tl.float32)
        lin = LIN_LUT + row * n_lin
        for c in tl.range(0, n_lin):
            block = bh * n_k_blocks + tl.load(lin + c)
            h_j = tl.load(H_STATE + block * HEAD_DIM * HEAD_DIM + state, mask=state_mask,
                          other=0.0).to(tl.float32)  # fmt: skip
            z_j = tl.load(Z_STATE + block * HEAD_DIM + offs_d, mask=d_valid, other=0.0)
            if LIN_MODE == 2:  # LIN_SUBTRACT
                h -= h_j
                z -= z_j
            else:
                h += h_j
                z += z_j
        phi_q = _feature_map(q.to(tl.float32), d_valid, PHI_ID)
        den = tl.sum(phi_q * z[None, :], 1) + EPS
        o_l = _dot_fp32(phi_q, h, LIN_PREC) / den[:, None]
        tl.store(OL + q_base + q_tile, o_l.to(OL.dtype.element_ty), mask=q_mask)
        if SAVE_ROW_STATE:  # for the backward: dphi(Q) needs H_i, Z_i and den
            tl.store(DEN + bh * len_q + offs_m, den, mask=m_valid)
            tl.store(H_ROW + row * HEAD_DIM * HEAD_DIM + state, h.to(H_ROW.dtype.element_ty),
                     mask=state_mask)  # fmt: skip
            tl.store(Z_ROW + row * HEAD_DIM + offs_d, z, mask=d_valid)


# ----------------------------------------------------------------------------------------
# Backward 3: deltas and per-query-block linear gradients dH_i, dZ_i
# ----------------------------------------------------------------------------------------
@_autotune(key=["HEAD_DIM", "BLOCK_M", "PHI_ID", "HAS_DOS", "HAS_DOL"])
@triton.jit
def _sla_bwd_preprocess_kernel(
    Q, OS, DOS, DOL, DEN,         # (B*H, Lq, D) and (B*H, Lq)
    H_ROW,                        # (B*H, Nq, D, D) fp32 from the forward
    DELTA_S, DELTA_L,             # out (B*H, Lq) fp32
    DH_STATE, DZ_STATE,           # out (B*H, Nq, D, D), (B*H, Nq, D)
    len_q, n_q_blocks,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    PHI_ID: tl.constexpr, HAS_DOS: tl.constexpr, HAS_DOL: tl.constexpr,
    LIN_PREC: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < len_q
    d_valid = offs_d < HEAD_DIM
    tile = bh * len_q * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    mask = m_valid[:, None] & d_valid[None, :]

    if HAS_DOS:  # delta_s = rowsum(dO_s * O_s), the softmax-backward correction
        o = tl.load(OS + tile, mask=mask, other=0.0).to(tl.float32)
        do = tl.load(DOS + tile, mask=mask, other=0.0).to(tl.float32)
        tl.store(DELTA_S + bh * len_q + offs_m, tl.sum(o * do, 1), mask=m_valid)

    if HAS_DOL:
        # o = phi(q) H / den, den = phi(q).Z + eps; with g = dO_l, delta_l = g . o:
        #   dH_i = sum_rows phi(q)^T g / den,   dZ_i = -sum_rows phi(q) delta_l / den.
        # o is recomputed in fp32 (one small product): the stored O_l is rounded to the
        # inputs' dtype, and g H^T - delta_l Z cancels where |mean v| >> std v.
        row = bh * n_q_blocks + pid_m
        state = offs_d[:, None] * HEAD_DIM + offs_d[None, :]
        state_mask = d_valid[:, None] & d_valid[None, :]
        h = tl.load(H_ROW + row * HEAD_DIM * HEAD_DIM + state, mask=state_mask, other=0.0)
        q = tl.load(Q + tile, mask=mask, other=0.0).to(tl.float32)
        den = tl.load(DEN + bh * len_q + offs_m, mask=m_valid, other=1.0)
        phi_q = _feature_map(q, d_valid, PHI_ID) / den[:, None]
        phi_q = tl.where(m_valid[:, None], phi_q, 0.0)  # padded rows carry no gradient
        do = tl.load(DOL + tile, mask=mask, other=0.0).to(tl.float32)
        delta_l = tl.sum(_dot_fp32(phi_q, h, LIN_PREC) * do, 1)
        tl.store(DELTA_L + bh * len_q + offs_m, delta_l, mask=m_valid)
        dh = _dot_fp32(tl.trans(phi_q), do, LIN_PREC)
        dz = -tl.sum(phi_q * delta_l[:, None], 0)
        tl.store(DH_STATE + row * HEAD_DIM * HEAD_DIM + state, dh.to(DH_STATE.dtype.element_ty),
                 mask=state_mask)  # fmt: skip
        tl.store(DZ_STATE + row * HEAD_DIM + offs_d, dz, mask=d_valid)


# ----------------------------------------------------------------------------------------
# Backward 4: dQ (sparse: FlashAttention-2 over the critical LUT; linear: through phi)
# ----------------------------------------------------------------------------------------
@_autotune(key=["HEAD_DIM", "BLOCK_M", "BLOCK_N", "PHI_ID", "HAS_DOS", "HAS_DOL"])
@triton.jit
def _sla_bwd_dq_kernel(
    Q, K, V, DOS, DOL, DQ,
    LSE, DELTA_S, DELTA_L, DEN,   # (B*H, Lq) fp32
    H_ROW, Z_ROW,                 # (B*H, Nq, D, D), (B*H, Nq, D) fp32 from the forward
    CRIT_LUT,
    sm_scale, len_q, len_k, n_q_blocks, n_crit,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, PHI_ID: tl.constexpr, HAS_DOS: tl.constexpr, HAS_DOL: tl.constexpr,
    DOT_DTYPE: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    LIN_PREC: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    row = bh * n_q_blocks + pid_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < len_q
    d_valid = offs_d < HEAD_DIM
    q_tile = bh * len_q * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    q_mask = m_valid[:, None] & d_valid[None, :]
    k_base = bh * len_k * HEAD_DIM
    q = tl.load(Q + q_tile, mask=q_mask, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    if HAS_DOS:
        # P = 2^(s - lse) recomputed, dP = dO V^T, dS = P (dP - delta), dQ = scale dS K.
        do = tl.load(DOS + q_tile, mask=q_mask, other=0.0)
        lse = tl.load(LSE + bh * len_q + offs_m, mask=m_valid, other=0.0)
        delta = tl.load(DELTA_S + bh * len_q + offs_m, mask=m_valid, other=0.0)
        qk_scale = sm_scale * 1.4426950408889634
        crit = CRIT_LUT + row * n_crit
        for c in tl.range(0, n_crit):
            start_n = tl.load(crit + c) * BLOCK_N
            n_valid = start_n + offs_n < len_k
            kv_tile = (start_n + offs_n)[:, None] * HEAD_DIM + offs_d[None, :]
            kv_mask = n_valid[:, None] & d_valid[None, :]
            k = tl.load(K + k_base + kv_tile, mask=kv_mask, other=0.0)
            v = tl.load(V + k_base + kv_tile, mask=kv_mask, other=0.0)
            s = _dot(q, tl.trans(k), DOT_DTYPE, UPCAST, PREC) * qk_scale
            p = tl.where(n_valid[None, :], tl.exp2(s - lse[:, None]), 0.0)
            dp = _dot(do, tl.trans(v), DOT_DTYPE, UPCAST, PREC)
            ds = p * (dp - delta[:, None])
            dq += _dot(ds, k, DOT_DTYPE, UPCAST, PREC)
        dq *= sm_scale

    if HAS_DOL:
        # dphi(q) = (g H_i^T - delta_l Z_i) / den, then back through phi.
        state = offs_d[:, None] * HEAD_DIM + offs_d[None, :]
        h = tl.load(H_ROW + row * HEAD_DIM * HEAD_DIM + state,
                    mask=d_valid[:, None] & d_valid[None, :], other=0.0)  # fmt: skip
        z = tl.load(Z_ROW + row * HEAD_DIM + offs_d, mask=d_valid, other=0.0)
        den = tl.load(DEN + bh * len_q + offs_m, mask=m_valid, other=1.0)
        delta_l = tl.load(DELTA_L + bh * len_q + offs_m, mask=m_valid, other=0.0)
        do_l = tl.load(DOL + q_tile, mask=q_mask, other=0.0)
        dphi = _dot_fp32(do_l, tl.trans(h), LIN_PREC) - delta_l[:, None] * z[None, :]
        dphi = dphi / den[:, None]
        x = q.to(tl.float32)
        dq += _feature_map_bwd(x, _feature_map(x, d_valid, PHI_ID), dphi, PHI_ID)

    tl.store(DQ + q_tile, dq.to(DQ.dtype.element_ty), mask=q_mask)


# ----------------------------------------------------------------------------------------
# Backward 5: dK, dV of one key block (sparse over the transposed LUT; linear via dh_j)
# ----------------------------------------------------------------------------------------
@_autotune(key=["HEAD_DIM", "BLOCK_M", "BLOCK_N", "PHI_ID", "LIN_MODE", "HAS_DOS", "HAS_DOL"])
@triton.jit
def _sla_bwd_dkdv_kernel(
    Q, K, V, DOS, DK, DV,
    LSE, DELTA_S,                 # (B*H, Lq) fp32
    CRIT_T_OFF, CRIT_T_IDX,       # CSR: query blocks for which key block j is critical
    LIN_T_OFF, LIN_T_IDX,         # CSR: query blocks whose linear LUT holds key block j
    DH_STATE, DZ_STATE,           # per query block dH_i, dZ_i
    DH_TOTAL, DZ_TOTAL,           # (B*H, D, D), (B*H, D) fp32: sums over all query blocks
    sm_scale, len_q, len_k, n_q_blocks, n_k_blocks, n_crit_entries, n_lin_entries,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, PHI_ID: tl.constexpr, LIN_MODE: tl.constexpr,
    HAS_DOS: tl.constexpr, HAS_DOL: tl.constexpr,
    DOT_DTYPE: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    LIN_PREC: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_valid = offs_n < len_k
    d_valid = offs_d < HEAD_DIM
    kv_tile = bh * len_k * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    kv_mask = n_valid[:, None] & d_valid[None, :]
    q_base = bh * len_q * HEAD_DIM
    k = tl.load(K + kv_tile, mask=kv_mask, other=0.0)
    v = tl.load(V + kv_tile, mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    csr = bh * (n_k_blocks + 1) + pid_n

    if HAS_DOS:
        # Transposed FlashAttention-2: P^T = 2^(K Q^T scale - lse), dV += P^T dO,
        # dP^T = V dO^T, dS^T = P^T (dP^T - delta), dK += scale dS^T Q.
        qk_scale = sm_scale * 1.4426950408889634
        start = tl.load(CRIT_T_OFF + csr)
        end = tl.load(CRIT_T_OFF + csr + 1)
        for t in tl.range(start, end):
            start_m = tl.load(CRIT_T_IDX + bh * n_crit_entries + t) * BLOCK_M
            m_valid = start_m + offs_m < len_q
            q_tile = q_base + (start_m + offs_m)[:, None] * HEAD_DIM + offs_d[None, :]
            q_mask = m_valid[:, None] & d_valid[None, :]
            q = tl.load(Q + q_tile, mask=q_mask, other=0.0)
            do = tl.load(DOS + q_tile, mask=q_mask, other=0.0)
            # Padded query rows: lse = +inf gives P = 0.
            lse = tl.load(LSE + bh * len_q + start_m + offs_m, mask=m_valid, other=float("inf"))
            delta = tl.load(DELTA_S + bh * len_q + start_m + offs_m, mask=m_valid, other=0.0)
            p_t = tl.exp2(_dot(k, tl.trans(q), DOT_DTYPE, UPCAST, PREC) * qk_scale - lse[None, :])
            dv += _dot(p_t, do, DOT_DTYPE, UPCAST, PREC)
            dp_t = _dot(v, tl.trans(do), DOT_DTYPE, UPCAST, PREC)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += _dot(ds_t, q, DOT_DTYPE, UPCAST, PREC)
        dk *= sm_scale

    if HAS_DOL:
        # dh_j = sum of dH_i over the rows where j is marginal, by pre-aggregation:
        # dH_tot - sum over rows where j is not (LIN_SUBTRACT), or 0 + sum (LIN_ADD).
        state = offs_d[:, None] * HEAD_DIM + offs_d[None, :]
        state_mask = d_valid[:, None] & d_valid[None, :]
        if LIN_MODE == 2:  # LIN_SUBTRACT
            dh = tl.load(DH_TOTAL + bh * HEAD_DIM * HEAD_DIM + state, mask=state_mask, other=0.0)
            dz = tl.load(DZ_TOTAL + bh * HEAD_DIM + offs_d, mask=d_valid, other=0.0)
        else:
            dh = tl.zeros([BLOCK_D, BLOCK_D], dtype=tl.float32)
            dz = tl.zeros([BLOCK_D], dtype=tl.float32)
        start = tl.load(LIN_T_OFF + csr)
        end = tl.load(LIN_T_OFF + csr + 1)
        for t in tl.range(start, end):
            row = bh * n_q_blocks + tl.load(LIN_T_IDX + bh * n_lin_entries + t)
            dh_i = tl.load(DH_STATE + row * HEAD_DIM * HEAD_DIM + state, mask=state_mask,
                           other=0.0).to(tl.float32)  # fmt: skip
            dz_i = tl.load(DZ_STATE + row * HEAD_DIM + offs_d, mask=d_valid, other=0.0)
            if LIN_MODE == 2:  # LIN_SUBTRACT
                dh -= dh_i
                dz -= dz_i
            else:
                dh += dh_i
                dz += dz_i
        # h_j = phi(K_j)^T V_j, z_j = colsum phi(K_j):
        #   dV_j += phi(K_j) dh_j,   dphi(K_j) = V_j dh_j^T + dz_j, then back through phi.
        x = k.to(tl.float32)
        phi_k = _feature_map(x, d_valid, PHI_ID)
        dv += _dot_fp32(phi_k, dh, LIN_PREC)
        dphi = _dot_fp32(v, tl.trans(dh), LIN_PREC) + dz[None, :]
        dk += _feature_map_bwd(x, phi_k, dphi, PHI_ID)

    tl.store(DK + kv_tile, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + kv_tile, dv.to(DV.dtype.element_ty), mask=kv_mask)


# ----------------------------------------------------------------------------------------
# Host side: lookup tables, launches, autograd
# ----------------------------------------------------------------------------------------
@dataclass
class _Plan:
    """Everything about one call that is fixed by the mask and the shapes."""

    batch: int
    heads: int
    len_q: int
    len_k: int
    head_dim: int
    block_q: int
    block_kv: int
    n_q_blocks: int
    n_k_blocks: int
    phi_id: int
    lin_mode: int
    crit_lut: torch.Tensor  # (B*H, Nq, n_crit) int32
    lin_lut: torch.Tensor  # (B*H, Nq, n_lin) int32

    @property
    def block_d(self) -> int:
        return max(16, triton.next_power_of_2(self.head_dim))


def _transpose_lut(lut: torch.Tensor, n_cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR transpose of a per-row LUT: for every column j, the rows whose LUT holds j.

    lut: (BH, Nr, C) column indices per row. Returns offsets (BH, n_cols + 1) int32 and
    indices (BH, Nr * C) int32: the rows of column j are indices[bh, off[j]:off[j+1]],
    ascending. One sort of the (column, row) keys; no device sync.
    """
    bh, n_rows, per_row = lut.shape
    cols = lut.reshape(bh, n_rows * per_row).long()
    rows = torch.arange(n_rows, device=lut.device).repeat_interleave(per_row)
    keys = torch.sort(cols * n_rows + rows, dim=-1).values
    indices = (keys % n_rows).to(torch.int32)
    counts = torch.zeros(bh, n_cols, dtype=torch.long, device=lut.device)
    counts.scatter_add_(1, cols, torch.ones_like(cols))
    offsets = torch.nn.functional.pad(counts.cumsum(1), (1, 0)).to(torch.int32)
    return offsets.contiguous(), indices.contiguous()


def _select_blocks(selected: torch.Tensor, count: int) -> torch.Tensor:
    """Indices (ascending) of the `count` True entries of each row of a boolean matrix."""
    order = torch.sort(selected.to(torch.int8), dim=-1, descending=True, stable=True).indices
    return order[..., :count].to(torch.int32).contiguous()


def _make_plan(q, k, mask: BlockMask, phi: str, linear: str) -> _Plan:
    batch, heads, len_q, head_dim = q.shape
    len_k = k.shape[2]
    n_q, n_k = -(-len_q // mask.block_q), -(-len_k // mask.block_kv)
    expected = (batch, heads, n_q, n_k)
    if tuple(mask.classes.shape) != expected:
        raise ValueError(
            f"mask.classes has shape {tuple(mask.classes.shape)}; for q {tuple(q.shape)}, "
            f"k {tuple(k.shape)} and blocks {mask.block_q}x{mask.block_kv} it must be {expected}"
        )
    if tuple(mask.critical.shape[:3]) != expected[:3] or mask.critical.dim() != 4:
        raise ValueError(
            f"mask.critical has shape {tuple(mask.critical.shape)}; it must be "
            f"{expected[:3] + ('n_critical',)}"
        )
    if mask.critical.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"mask.critical must hold integer indices, got {mask.critical.dtype}")
    classes = mask.classes.to(q.device)
    critical = mask.critical.to(q.device, torch.int32)
    n_crit = critical.shape[-1]
    bh = batch * heads

    # One device sync validates the LUT and counts the linear blocks per row.
    non_marginal = (classes != MARGINAL).sum(-1)
    stats = torch.stack(
        [
            critical.min() if n_crit else torch.zeros((), device=q.device, dtype=torch.int32),
            critical.max() if n_crit else torch.zeros((), device=q.device, dtype=torch.int32),
            non_marginal.min().to(torch.int32),
            non_marginal.max().to(torch.int32),
            (classes == CRITICAL).sum(-1).max().to(torch.int32),
        ]
    ).tolist()
    lo, hi, nm_lo, nm_hi, crit_in_classes = stats
    if n_crit and (lo < 0 or hi >= n_k):
        raise ValueError(f"mask.critical holds block indices in [{lo}, {hi}], outside [0, {n_k})")
    if crit_in_classes != n_crit:
        raise ValueError(
            f"mask.classes marks up to {crit_in_classes} critical blocks per row, "
            f"mask.critical lists {n_crit}: the two disagree"
        )

    if linear == "marginal" and nm_lo != nm_hi:
        raise ValueError(
            "every query-block row must have the same number of non-marginal blocks; "
            f"mask.classes has between {nm_lo} and {nm_hi}"
        )
    n_marginal = n_k - nm_hi
    no_blocks = torch.zeros(bh, n_q, 0, dtype=torch.int32, device=q.device)
    if linear == "none" or (linear == "marginal" and n_marginal == 0):
        # No linear block in any row: O_l = 0 / (0 + eps) = 0 exactly, its gradient too.
        lin_mode, lin_lut = LIN_NONE, no_blocks
    elif linear == "all":
        lin_mode, lin_lut = LIN_SUBTRACT, no_blocks  # H_tot minus nothing
    elif n_marginal <= nm_hi:
        # Work = state loads per row: add the marginal blocks to zero ...
        lin_mode = LIN_ADD
        lin_lut = _select_blocks(classes == MARGINAL, n_marginal).reshape(bh, n_q, n_marginal)
    else:
        # ... or subtract the non-marginal ones (critical + negligible) from H_tot.
        lin_mode = LIN_SUBTRACT
        lin_lut = _select_blocks(classes != MARGINAL, nm_hi).reshape(bh, n_q, nm_hi)

    return _Plan(
        batch=batch,
        heads=heads,
        len_q=len_q,
        len_k=len_k,
        head_dim=head_dim,
        block_q=mask.block_q,
        block_kv=mask.block_kv,
        n_q_blocks=n_q,
        n_k_blocks=n_k,
        phi_id=PHI_CODE[phi],
        lin_mode=lin_mode,
        crit_lut=critical.reshape(bh, n_q, n_crit).contiguous(),
        lin_lut=lin_lut.contiguous(),
    )


def _dot_args(dtype: torch.dtype) -> dict:
    """How tl.dot runs for an input dtype: the sparse branch's operand dtype, the
    interpreter's bf16 upcast, and the fp32 precision of each branch."""
    upcast = dtype == torch.bfloat16 and INTERPRETED
    return dict(
        DOT_DTYPE={torch.float32: tl.float32, torch.float16: tl.float16}.get(dtype, tl.bfloat16),
        UPCAST=upcast,
        PREC="ieee" if dtype == torch.float32 or upcast else "tf32",
        LIN_PREC="ieee" if dtype == torch.float32 else "tf32",
    )


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Storage of the gathered per-block D x D states: bf16 for bf16 inputs, else fp32.

    bf16 halves the linear branch's memory traffic at the inputs' own precision; fp16
    would overflow (sums of phi(k) v) and bf16 would be coarser than fp16 inputs.
    """
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def _unused(device) -> torch.Tensor:
    """A stand-in for a pointer argument that a compile-time flag switches off."""
    return torch.empty(1, device=device, dtype=torch.float32)


def _forward(q, k, v, plan: _Plan, save_for_backward: bool):
    bh, d = plan.batch * plan.heads, plan.head_dim
    dev, f32 = q.device, torch.float32
    n_q, n_k = plan.n_q_blocks, plan.n_k_blocks
    dot = _dot_args(q.dtype)
    o_s = torch.empty_like(q)
    o_l = torch.zeros_like(q) if plan.lin_mode == LIN_NONE else torch.empty_like(q)
    lse = torch.empty(bh, plan.len_q, device=dev, dtype=f32)
    den = torch.empty(bh, plan.len_q, device=dev, dtype=f32)
    unused = _unused(dev)
    h_state = z_state = h_total = z_total = h_row = z_row = unused

    if plan.lin_mode != LIN_NONE:
        h_state = torch.empty(bh, n_k, d, d, device=dev, dtype=_state_dtype(q.dtype))
        z_state = torch.empty(bh, n_k, d, device=dev, dtype=f32)
        _sla_kv_state_kernel[(n_k, bh)](
            k, v, h_state, z_state, plan.len_k, n_k,
            HEAD_DIM=d, BLOCK_D=plan.block_d, BLOCK_N=plan.block_kv, PHI_ID=plan.phi_id,
            LIN_PREC=dot["LIN_PREC"],
        )  # fmt: skip
        if plan.lin_mode == LIN_SUBTRACT:
            h_total = h_state.sum(1, dtype=f32)
            z_total = z_state.sum(1)
        if save_for_backward:
            h_row = torch.empty(bh, n_q, d, d, device=dev, dtype=f32)
            z_row = torch.empty(bh, n_q, d, device=dev, dtype=f32)

    _sla_fwd_kernel[(n_q, bh)](
        q, k, v, plan.crit_lut, plan.lin_lut, h_state, z_state, h_total, z_total,
        o_s, o_l, lse, den, h_row, z_row,
        1.0 / math.sqrt(d), plan.len_q, plan.len_k, n_q, n_k,
        plan.crit_lut.shape[-1], plan.lin_lut.shape[-1],
        HEAD_DIM=d, BLOCK_D=plan.block_d, BLOCK_M=plan.block_q, BLOCK_N=plan.block_kv,
        PHI_ID=plan.phi_id, LIN_MODE=plan.lin_mode, SAVE_ROW_STATE=save_for_backward,
        EPS=LINEAR_EPS, **dot,
    )  # fmt: skip
    return o_s, o_l, (lse, den, h_row, z_row)


def _backward(q, k, v, o_s, do_s, do_l, saved, plan: _Plan):
    lse, den, h_row, z_row = saved
    bh, d = plan.batch * plan.heads, plan.head_dim
    dev, f32 = q.device, torch.float32
    n_q, n_k = plan.n_q_blocks, plan.n_k_blocks
    n_crit = plan.crit_lut.shape[-1]
    has_dos = do_s is not None and n_crit > 0
    has_dol = do_l is not None and plan.lin_mode != LIN_NONE
    dot = _dot_args(q.dtype)
    unused = _unused(dev)
    do_s = do_s.contiguous() if has_dos else unused
    do_l = do_l.contiguous() if has_dol else unused
    delta_s = torch.empty(bh, plan.len_q, device=dev, dtype=f32) if has_dos else unused
    delta_l = torch.empty(bh, plan.len_q, device=dev, dtype=f32) if has_dol else unused
    dh_state = dz_state = dh_total = dz_total = unused
    if has_dol:
        dh_state = torch.empty(bh, n_q, d, d, device=dev, dtype=_state_dtype(q.dtype))
        dz_state = torch.empty(bh, n_q, d, device=dev, dtype=f32)

    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if not (has_dos or has_dol):
        return dq.zero_(), dk.zero_(), dv.zero_()

    common = dict(HEAD_DIM=d, BLOCK_D=plan.block_d, BLOCK_M=plan.block_q, PHI_ID=plan.phi_id)
    flags = dict(HAS_DOS=has_dos, HAS_DOL=has_dol)
    _sla_bwd_preprocess_kernel[(n_q, bh)](
        q, o_s, do_s, do_l, den, h_row, delta_s, delta_l, dh_state, dz_state,
        plan.len_q, n_q, **common, **flags, LIN_PREC=dot["LIN_PREC"],
    )  # fmt: skip
    if has_dol and plan.lin_mode == LIN_SUBTRACT:
        dh_total = dh_state.sum(1, dtype=f32)
        dz_total = dz_state.sum(1)

    scale = 1.0 / math.sqrt(d)
    _sla_bwd_dq_kernel[(n_q, bh)](
        q, k, v, do_s, do_l, dq, lse, delta_s, delta_l, den, h_row, z_row, plan.crit_lut,
        scale, plan.len_q, plan.len_k, n_q, n_crit,
        BLOCK_N=plan.block_kv, **common, **flags, **dot,
    )  # fmt: skip

    crit_off, crit_idx = _transpose_lut(plan.crit_lut, n_k) if has_dos else (unused, unused)
    lin_off, lin_idx = _transpose_lut(plan.lin_lut, n_k) if has_dol else (unused, unused)
    _sla_bwd_dkdv_kernel[(n_k, bh)](
        q, k, v, do_s, dk, dv, lse, delta_s, crit_off, crit_idx, lin_off, lin_idx,
        dh_state, dz_state, dh_total, dz_total,
        scale, plan.len_q, plan.len_k, n_q, n_k,
        n_q * n_crit, n_q * plan.lin_lut.shape[-1],
        BLOCK_N=plan.block_kv, LIN_MODE=plan.lin_mode, **common, **flags, **dot,
    )  # fmt: skip
    return dq, dk, dv


class _SLAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: _Plan):
        o_s, o_l, saved = _forward(q, k, v, plan, save_for_backward=True)
        ctx.save_for_backward(q, k, v, o_s, *saved)
        ctx.plan = plan
        ctx.set_materialize_grads(False)  # a branch whose output is unused costs nothing
        return o_s, o_l

    @staticmethod
    @once_differentiable
    def backward(ctx, do_s, do_l):
        q, k, v, o_s, *saved = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, o_s, do_s, do_l, saved, ctx.plan)
        return dq, dk, dv, None


def sla_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: BlockMask,
    *,
    phi: str = "softmax",
    linear: str = "marginal",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(O_s, O_l) of sparse-linear attention with the fused Triton kernels; differentiable.

    q: (B, H, Lq, D), k, v: (B, H, Lk, D) on CUDA (or on CPU with TRITON_INTERPRET=1 set
    before this module is imported), fp32 / fp16 / bf16, D a multiple of 8 in [16, 128].
    `mask` from `classify_blocks`; phi and linear as in `sla_reference`. Outputs in q's
    dtype; everything is accumulated in fp32.
    """
    check_sla_args(
        q, k, v, block_q=mask.block_q, block_kv=mask.block_kv, k_h=0.0, k_l=0.0,
        phi=phi, linear=linear,
    )  # fmt: skip
    if q.dtype == torch.float64:
        raise ValueError("q has dtype torch.float64: the Triton kernels take fp32, fp16 or bf16")
    if q.device.type != "cuda" and not INTERPRETED:
        raise ValueError(
            f"q is on {q.device}: the Triton kernels need CUDA tensors "
            "(or TRITON_INTERPRET=1 set before importing repro.kernels.sla_triton)"
        )
    plan = _make_plan(q, k, mask, phi, linear)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _SLAFunction.apply(q, k, v, plan)
    o_s, o_l, _ = _forward(q, k, v, plan, save_for_backward=False)
    return o_s, o_l
