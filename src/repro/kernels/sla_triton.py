"""Fused Triton kernels of sparse-linear attention (SLA, arXiv 2509.24006), forward and backward.

The mathematics is that of `sla_reference.py` (read it first); this file computes the
same (O_s, O_l) with Triton kernels written in the style of Triton's fused-attention
tutorial. Per (batch, head), with b_q x b_kv blocks, C critical key blocks per query
block, scale = 1/sqrt(D) and phi the feature map over the head dimension:

forward, split layout (the default)
  1. _sla_kv_state_kernel   grid (Nk/8, B*H) h_j = phi(K_j)^T V_j,  z_j = colsum phi(K_j)
                                              (stored per block), and their sums over
     (torch)                                  chunks of 8 blocks -> H_tot, Z_tot
  2. _sla_fwd_kernel        grid (Nq, B*H)   O_s: online-softmax attention over the C
                                              critical blocks of the row, lse saved
  3. _sla_fwd_linear_kernel grid (Nq, B*H)   H_i by pre-aggregation of stored states;
                                              O_l = phi(Q_i) H_i / (phi(Q_i).Z_i + eps)
forward, fused layout (fuse_linear=True: SLA-1's form)
  1. _sla_kv_state_kernel                    H_tot, Z_tot only: one reduction
  2. _sla_fwd_kernel                         O_s and O_l in one pass, the linear branch in
                                              token space: each critical block's share
                                              (phi(Q) phi(K_j)^T) V_j is removed inside the
                                              sparse loop from the K_j, V_j tiles already
                                              loaded; no per-block state at all
                                              (training calls gather H_i for the backward)
backward (FlashAttention-2 for the sparse branch, the same pre-aggregation for the linear one)
  4. _sla_bwd_preprocess_kernel (Nq, B*H)  delta_s = rowsum(dO_s * O_s), delta_l the same
                                              with O_l recomputed in fp32 from H_i;
                                              dH_i = f^T dO_l, dZ_i = -f^T delta_l,
                                              f = phi(Q_i) / den
     (torch)                                  dH_tot = sum_i dH_i,   dZ_tot = sum_i dZ_i
  5. _sla_bwd_dq_kernel     grid (Nq, B*H)   dQ = sparse dQ over the critical LUT
                                              + J_phi(Q)^T [(dO_l H_i^T - delta_l Z_i) / den]
  6. _sla_bwd_dkdv_kernel   grid (Nk, B*H)   dK, dV, sparse part: over the query blocks for
                                              which this key block is critical (transposed
                                              LUT)
  7. _sla_bwd_dkdv_linear_kernel (Nk, B*H) dK, dV, linear part, added: dh_j, dz_j
                                              aggregated from dH_i, dZ_i, then
                                              dV += phi(K_j) dh_j,
                                              dK += J_phi(K_j)^T (V_j dh_j^T + dz_j)

Design choices (why):

* Block-sparse iteration through lookup tables: the forward and dQ kernels walk
  `mask.critical` (ascending key blocks, C per row). dK/dV need the transpose, whose
  length varies per key block, so it is a CSR table (offsets + query-block indices)
  built in PyTorch with one sort, no device sync. Each kernel owns its output tile and
  writes it once: no atomics, deterministic results, and autotuning can re-run any
  kernel safely.
* Pre-aggregation (the paper's trick): the linear state of row i is the sum of h_j over
  its marginal blocks. SUBTRACT takes H_tot minus the row's critical and negligible
  blocks; when a row has no more marginal than non-marginal blocks, ADD sums the
  marginal ones from zero instead: min(#marginal, #non-marginal) block visits per row,
  and H_tot - (almost all of H_tot) never happens, so there is no catastrophic fp32
  cancellation (a row with no marginal block gives exactly 0, like the reference). At
  the paper's k_h 5 %, k_l 10 % that is SUBTRACT (26 + 51 visits, not 435). "all" (the
  main branch's form) is H_tot itself: no list, no per-block state, no row state saved
  (the backward reads H_tot). The backward aggregates dH_i onto key blocks the same way.
* Two layouts of the forward's linear branch, both exact. Split: the sparse kernel alone
  (144-211 registers, no spill at 8 warps, sm_90 compile) and a linear kernel that
  gathers stored D x D states (a bf16 h_j is 32 KB, as much as K_j and V_j together).
  Fused: token space inside the sparse kernel, 2 more products per visited block but
  no state stored or gathered; it spills ~100 B at 64 x 64 blocks and ~1.3 KB at
  128 x 64 (sm_90 compile), which is why it is not the default. A first fused version
  that held a D x D fp32 state through the sparse loop spilled 300 B - 3.6 KB in every
  configuration. The benchmark times both (`sla.kernel_bench.forms`).
* Precision: the sparse branch multiplies tiles with tl.dot in the inputs' dtype
  (fp16/bf16 tensor cores, P and dS rounded to it as in FlashAttention; fp32 inputs in
  IEEE fp32, so they match the reference to ~1e-6), always with fp32 accumulation.
  The linear branch's state products (one per block, not per block pair: cheap) take
  fp32 operands (tf32 tensor cores for 16-bit inputs), since sums of phi(k) v over
  thousands of keys overflow fp16; the fused layout's per-block token-space products
  (sums over one block's keys) take the inputs' dtype like the sparse branch. Softmax statistics, denominators, z and every sum are fp32.
  The per-block D x D states that the kernels gather (h_j, dH_i: the bulk of the
  linear branch's memory traffic) are stored in bf16 for bf16 inputs (half the
  traffic, the inputs' own precision) and in fp32 otherwise (fp16 would overflow, bf16
  would be coarser than fp16 inputs); totals are summed in fp32 from the stored
  values, so a subtraction removes exactly what the total holds. The row states H_i
  saved for the backward stay fp32 (read once; dQ of relu/elu rows with small
  denominators is sensitive to them).
* Cost per query block: C critical (K_j, V_j) tile pairs in the sparse branch and
  min(#marginal, #non-marginal) linear visits (a D x D state load, split; a K_j, V_j
  pair and two products, fused). Negligible blocks cost no attention FLOPs, but an
  exact linear branch must remove them from the total: at b_kv = 64, D = 128 either
  visit moves 32 KB, so at the paper's k_h 5 %, k_l 10 % the linear branch moves about
  twice the sparse branch's bytes whatever the layout; with k_l = 0 (SLA-1) the fused
  layout moves no byte beyond the sparse branch's. The dK/dV kernel's work per key block
  is its CSR length: a key block that is critical for every row (an attention sink)
  makes one long program.
* No device sync per call: the plan (lookup tables) is cached on the mask, and a mask
  from `classify_blocks` lists its negligible blocks, so even its first plan needs no
  sync. Padded keys are masked on the last key block only (EVEN_K drops the masks when
  the length is a multiple of the block). Autotune keys hold the loop lengths (critical
  and linear lists, sequence length) besides the shapes and the form.
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
import os
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from repro.kernels.sla_reference import (
    CRITICAL,
    LINEAR_EPS,
    MARGINAL,
    NEGLIGIBLE,
    BlockMask,
    check_sla_args,
)

__all__ = ["plan_summary", "sla_triton"]

# Compile-time codes of the feature map and of the linear-branch aggregation.
PHI_CODE = {"softmax": 0, "elu": 1, "relu": 2}
LIN_NONE, LIN_ADD, LIN_SUBTRACT, LIN_ALL = 0, 1, 2, 3


# Whether the kernels below were built for the CPU interpreter. Triton reads
# TRITON_INTERPRET when @triton.jit decorates a function, i.e. at this module's import;
# setting it later changes nothing for these kernels.
_knobs = getattr(triton, "knobs", None)  # Triton >= 3.4; older ones read the variable
INTERPRETED = (
    bool(_knobs.runtime.interpret)
    if _knobs is not None
    else os.environ.get("TRITON_INTERPRET", "0") == "1"
)


# ----------------------------------------------------------------------------------------
# Autotuning: only num_warps / num_stages (block sizes are fixed by the block mask). The
# keys name what changes the best config: shapes, the form's flags, and the lengths of
# the loops (critical and linear lists, sequence length). On CPU tensors (the
# interpreter) the first config is taken and nothing is benchmarked; REPRO_SLA_AUTOTUNE=0
# takes it on a GPU too (quick correctness runs).
# ----------------------------------------------------------------------------------------
_CONFIGS = [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (2, 3)]
AUTOTUNE = os.environ.get("REPRO_SLA_AUTOTUNE", "1") != "0"


def _prune_configs(configs, named_args, **kwargs):
    """8 warps only for 128-row tiles (4 warps spilled hundreds of bytes to KBs of
    registers at D = 128, sm_90 compile, and such kernels took up to 133 s to compile on
    the H200 machine); then the first config alone on CPU tensors or with AUTOTUNE off."""
    if max(kwargs.get("BLOCK_M", 0), kwargs.get("BLOCK_N", 0)) >= 128:
        configs = [c for c in configs if c.num_warps == 8]
    first = next(v for v in named_args.values() if isinstance(v, torch.Tensor))
    return configs if first.is_cuda and AUTOTUNE else configs[:1]


def _autotune(key):
    return triton.autotune(
        configs=_CONFIGS, key=key, prune_configs_by={"early_config_prune": _prune_configs}
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
# Forward 1: linear-attention states of the key blocks, and their sums over chunks
# ----------------------------------------------------------------------------------------
@_autotune(key=["HEAD_DIM", "BLOCK_N", "PHI_ID", "STORE_BLOCKS", "STORE_TOTAL", "n_k_blocks"])
@triton.jit
def _sla_kv_state_kernel(
    K, V,                         # (B*H, Lk, D)
    H_STATE, Z_STATE,             # out, STORE_BLOCKS: (B*H, Nk, D, D), (B*H, Nk, D)
    H_PART, Z_PART,               # out, STORE_TOTAL: (B*H, n_chunks, D, D), (B*H, n_chunks, D) fp32
    len_k, n_k_blocks, n_chunks,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    CHUNK: tl.constexpr, PHI_ID: tl.constexpr, LIN_PREC: tl.constexpr,
    STORE_BLOCKS: tl.constexpr, STORE_TOTAL: tl.constexpr,
):  # fmt: skip
    # One program per chunk of CHUNK key blocks: h_j = phi(K_j)^T V_j, z_j = colsum phi(K_j)
    # for each block (stored when the call gathers them), and their sum over the chunk
    # (stored when the call needs the total: the host adds the chunks' partial sums).
    # The main form ("all") stores no per-block state at all: one reduction.
    pid_c = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    state = offs_d[:, None] * HEAD_DIM + offs_d[None, :]
    state_mask = d_valid[:, None] & d_valid[None, :]
    h_sum = tl.zeros([BLOCK_D, BLOCK_D], dtype=tl.float32)
    z_sum = tl.zeros([BLOCK_D], dtype=tl.float32)
    first = pid_c * CHUNK
    last = tl.minimum(first + CHUNK, n_k_blocks)
    for j in tl.range(first, last):
        rows = j * BLOCK_N + offs_n
        n_valid = rows < len_k
        kv_tile = bh * len_k * HEAD_DIM + rows[:, None] * HEAD_DIM + offs_d[None, :]
        kv_mask = n_valid[:, None] & d_valid[None, :]
        k = tl.load(K + kv_tile, mask=kv_mask, other=0.0)
        v = tl.load(V + kv_tile, mask=kv_mask, other=0.0)
        phi_k = _feature_map(k.to(tl.float32), d_valid, PHI_ID)
        phi_k = tl.where(n_valid[:, None], phi_k, 0.0)  # padded keys contribute 0
        h = _dot_fp32(tl.trans(phi_k), v, LIN_PREC)  # (BLOCK_D, BLOCK_D), fp32
        z = tl.sum(phi_k, 0)
        if STORE_BLOCKS:
            block = bh * n_k_blocks + j
            h_kept = h.to(H_STATE.dtype.element_ty)
            tl.store(H_STATE + block * HEAD_DIM * HEAD_DIM + state, h_kept, mask=state_mask)
            tl.store(Z_STATE + block * HEAD_DIM + offs_d, z, mask=d_valid)
            # The total holds exactly what was stored, so that subtracting stored states
            # from it removes what it holds.
            h = h_kept.to(tl.float32)
        if STORE_TOTAL:
            h_sum += h
            z_sum += z
    if STORE_TOTAL:
        part = bh * n_chunks + pid_c
        tl.store(H_PART + part * HEAD_DIM * HEAD_DIM + state, h_sum, mask=state_mask)
        tl.store(Z_PART + part * HEAD_DIM + offs_d, z_sum, mask=d_valid)


# ----------------------------------------------------------------------------------------
# Forward 2: sparse branch (block-sparse FlashAttention), and with fuse_linear the linear
# branch too, one query block
# ----------------------------------------------------------------------------------------
@triton.jit
def _linear_scores(phi_q, k, n_valid, d_valid, PHI_ID: tl.constexpr,
                   DOT_DTYPE: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """phi(Q) phi(K_j)^T (BLOCK_M x BLOCK_N, fp32): the linear-attention weights of one key
    block in token space, from the K tile already loaded; padded keys weigh 0."""
    phi_k = _feature_map(k.to(tl.float32), d_valid, PHI_ID)
    phi_k = tl.where(n_valid[:, None], phi_k, 0.0)
    return _dot(phi_q, tl.trans(phi_k), DOT_DTYPE, UPCAST, PREC)


@_autotune(
    key=["HEAD_DIM", "BLOCK_M", "BLOCK_N", "PHI_ID", "LIN_MODE", "SAVE", "EVEN_K",
         "n_crit", "n_lin", "len_k"]
)  # fmt: skip
@triton.jit
def _sla_fwd_kernel(
    Q, K, V,                      # (B*H, Lq, D), (B*H, Lk, D), (B*H, Lk, D)
    CRIT_LUT,                     # (B*H, Nq, n_crit) int32: critical key blocks, ascending
    LIN_LUT,                      # (B*H, Nq, n_lin) int32: negligible (SUBTRACT) or marginal (ADD)
    H_TOTAL, Z_TOTAL,             # (B*H, D, D), (B*H, D) fp32: sums over all key blocks
    OS, OL,                       # outputs (B*H, Lq, D), q's dtype
    LSE, DEN,                     # SAVE: (B*H, Lq) fp32: base-2 log-sum-exp, linear denominator
    sm_scale, len_q, len_k, n_q_blocks, n_crit, n_lin,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, PHI_ID: tl.constexpr, LIN_MODE: tl.constexpr,
    SAVE: tl.constexpr, EVEN_K: tl.constexpr, EPS: tl.constexpr,
    DOT_DTYPE: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    LIN_PREC: tl.constexpr,
):  # fmt: skip
    # The fused linear branch works in token space, with no per-block D x D state: a key
    # block's share of the row's linear attention is
    #     phi(Q) h_j = (phi(Q) phi(K_j)^T) V_j,   phi(Q) z_j = rowsum(phi(Q) phi(K_j)^T),
    # two products on the K_j, V_j tiles, like the sparse branch's QK^T and PV. So
    #   SUBTRACT  O_l = (phi(Q) H_tot - sum_{critical + negligible} ...) / (... + eps):
    #             the critical blocks inside the sparse loop, where K_j, V_j are loaded
    #             anyway (SLA-1's form), the negligible ones in a second loop over their
    #             K, V tiles; H_tot comes from one reduction over all keys.
    #   ADD       the marginal blocks' shares from zero;  ALL  phi(Q) H_tot alone.
    # The split layout (LIN_MODE = NONE here, _sla_fwd_linear_kernel beside) gathers
    # stored states instead.
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
    if LIN_MODE == 1 or LIN_MODE == 2:  # the blocks' shares: numerator and denominator
        phi_q = _feature_map(q.to(tl.float32), d_valid, PHI_ID).to(DOT_DTYPE)
        num = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        den_part = tl.zeros([BLOCK_M], dtype=tl.float32)

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
        if EVEN_K:
            kv_mask = d_valid[None, :]
        else:
            kv_mask = n_valid[:, None] & d_valid[None, :]
        k = tl.load(K + k_base + kv_tile, mask=kv_mask, other=0.0)
        v = tl.load(V + k_base + kv_tile, mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), DOT_DTYPE, UPCAST, PREC) * qk_scale
        if not EVEN_K:
            if start_n + BLOCK_N > len_k:  # only the last key block holds padded keys
                s = tl.where(n_valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every block has a valid key
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)  # 0 on the first block (m_i = -inf)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p, v, DOT_DTYPE, UPCAST, PREC)
        m_i = m_new
        if LIN_MODE == 2:  # LIN_SUBTRACT: a critical block is not marginal
            s_lin = _linear_scores(phi_q, k, n_valid, d_valid, PHI_ID, DOT_DTYPE, UPCAST, PREC)
            num += _dot(s_lin, v, DOT_DTYPE, UPCAST, PREC)
            den_part += tl.sum(s_lin, 1)
    # No critical block (C = 0): l = 0, O_s = 0 and lse = m = -inf (the backward skips it).
    l_i = tl.where(l_i > 0, l_i, 1.0)
    tl.store(OS + q_base + q_tile, (acc / l_i[:, None]).to(OS.dtype.element_ty), mask=q_mask)
    if SAVE:
        tl.store(LSE + bh * len_q + offs_m, m_i + tl.log2(l_i), mask=m_valid)

    # ---- linear branch: O_l = phi(Q) H_i / (phi(Q) . Z_i + eps) ------------------------
    if LIN_MODE == 1 or LIN_MODE == 2:  # the negligible (SUBTRACT) / marginal (ADD) blocks
        lin = LIN_LUT + row * n_lin
        for c in tl.range(0, n_lin):
            start_n = tl.load(lin + c) * BLOCK_N
            n_valid = start_n + offs_n < len_k
            kv_tile = (start_n + offs_n)[:, None] * HEAD_DIM + offs_d[None, :]
            kv_mask = n_valid[:, None] & d_valid[None, :]
            k = tl.load(K + k_base + kv_tile, mask=kv_mask, other=0.0)
            v = tl.load(V + k_base + kv_tile, mask=kv_mask, other=0.0)
            s_lin = _linear_scores(phi_q, k, n_valid, d_valid, PHI_ID, DOT_DTYPE, UPCAST, PREC)
            num += _dot(s_lin, v, DOT_DTYPE, UPCAST, PREC)
            den_part += tl.sum(s_lin, 1)
    if LIN_MODE != 0:  # not LIN_NONE
        if LIN_MODE != 1:  # SUBTRACT, ALL: phi(Q) H_tot, phi(Q) . Z_tot
            phi_q = _feature_map(q.to(tl.float32), d_valid, PHI_ID)
            state = offs_d[:, None] * HEAD_DIM + offs_d[None, :]
            h = tl.load(H_TOTAL + bh * HEAD_DIM * HEAD_DIM + state,
                        mask=d_valid[:, None] & d_valid[None, :], other=0.0)  # fmt: skip
            z = tl.load(Z_TOTAL + bh * HEAD_DIM + offs_d, mask=d_valid, other=0.0)
            total = _dot_fp32(phi_q, h, LIN_PREC)
            den = tl.sum(phi_q * z[None, :], 1)
            if LIN_MODE == 2:
                total -= num
                den -= den_part
        else:
            total = num
            den = den_part
        den += EPS
        tl.store(OL + q_base + q_tile, (total / den[:, None]).to(OL.dtype.element_ty),
                 mask=q_mask)  # fmt: skip
        if SAVE:  # for the backward (its row states are gathered beside this kernel)
            tl.store(DEN + bh * len_q + offs_m, den, mask=m_valid)


# ----------------------------------------------------------------------------------------
# Forward 3 (the split form, the default): linear branch alone, one query block
# ----------------------------------------------------------------------------------------
@_autotune(key=["HEAD_DIM", "BLOCK_M", "PHI_ID", "LIN_MODE", "SAVE", "ROWS_ONLY", "n_lin", "len_q"])
@triton.jit
def _sla_fwd_linear_kernel(
    Q, LIN_LUT,                   # LIN_LUT (B*H, Nq, n_lin): critical + negligible (SUBTRACT),
                                  # marginal (ADD), nothing (ALL)
    H_STATE, Z_STATE, H_TOTAL, Z_TOTAL, OL, DEN, H_ROW, Z_ROW,  # as in _sla_fwd_kernel
    len_q, n_q_blocks, n_k_blocks, n_lin,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    SUB_M: tl.constexpr, PHI_ID: tl.constexpr, LIN_MODE: tl.constexpr, SAVE: tl.constexpr,
    ROWS_ONLY: tl.constexpr, EPS: tl.constexpr, LIN_PREC: tl.constexpr,
):  # fmt: skip
    # The sparse kernel above runs with LIN_MODE = NONE beside this one: apart, neither
    # holds the D x D state next to the attention tiles, which spilled registers at
    # D = 128 (sm_90, every num_warps / block size tried).
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    row = bh * n_q_blocks + pid_m
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    state = offs_d[:, None] * HEAD_DIM + offs_d[None, :]
    state_mask = d_valid[:, None] & d_valid[None, :]
    if LIN_MODE == 1:  # LIN_ADD
        h = tl.zeros([BLOCK_D, BLOCK_D], dtype=tl.float32)
        z = tl.zeros([BLOCK_D], dtype=tl.float32)
    else:  # LIN_SUBTRACT, LIN_ALL
        h = tl.load(H_TOTAL + bh * HEAD_DIM * HEAD_DIM + state, mask=state_mask, other=0.0)
        z = tl.load(Z_TOTAL + bh * HEAD_DIM + offs_d, mask=d_valid, other=0.0)
    lin = LIN_LUT + row * n_lin
    for c in tl.range(0, n_lin):
        block = bh * n_k_blocks + tl.load(lin + c)
        h_j = tl.load(H_STATE + block * HEAD_DIM * HEAD_DIM + state, mask=state_mask,
                      other=0.0).to(tl.float32)  # fmt: skip
        z_j = tl.load(Z_STATE + block * HEAD_DIM + offs_d, mask=d_valid, other=0.0)
        if LIN_MODE == 1:
            h += h_j
            z += z_j
        else:
            h -= h_j
            z -= z_j
    # The query block in sub-tiles of SUB_M rows: the D x D state is the big tile here.
    # ROWS_ONLY: the fused kernel wrote O_l and den; only the row states are wanted.
    for sub in tl.static_range(0, 0 if ROWS_ONLY else BLOCK_M // SUB_M):
        offs_m = pid_m * BLOCK_M + sub * SUB_M + tl.arange(0, SUB_M)
        m_valid = offs_m < len_q
        q_tile = bh * len_q * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
        q_mask = m_valid[:, None] & d_valid[None, :]
        q = tl.load(Q + q_tile, mask=q_mask, other=0.0)
        phi_q = _feature_map(q.to(tl.float32), d_valid, PHI_ID)
        den = tl.sum(phi_q * z[None, :], 1) + EPS
        o_l = _dot_fp32(phi_q, h, LIN_PREC) / den[:, None]
        tl.store(OL + q_tile, o_l.to(OL.dtype.element_ty), mask=q_mask)
        if SAVE:
            tl.store(DEN + bh * len_q + offs_m, den, mask=m_valid)
    if SAVE and LIN_MODE != 3:  # ALL: the backward reads H_tot, Z_tot themselves
        tl.store(H_ROW + row * HEAD_DIM * HEAD_DIM + state, h, mask=state_mask)
        tl.store(Z_ROW + row * HEAD_DIM + offs_d, z, mask=d_valid)


# ----------------------------------------------------------------------------------------
# Backward 3: deltas and per-query-block linear gradients dH_i, dZ_i
# ----------------------------------------------------------------------------------------
@_autotune(key=["HEAD_DIM", "BLOCK_M", "PHI_ID", "HAS_DOS", "HAS_DOL", "ROW_STATE", "len_q"])
@triton.jit
def _sla_bwd_preprocess_kernel(
    Q, OS, DOS, DOL, DEN,         # (B*H, Lq, D) and (B*H, Lq)
    H_ROW,                        # fp32 from the forward: (B*H, Nq, D, D), or (B*H, D, D) H_tot
    DELTA_S, DELTA_L,             # out (B*H, Lq) fp32
    DH_STATE, DZ_STATE,           # out (B*H, Nq, D, D), (B*H, Nq, D)
    len_q, n_q_blocks,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    PHI_ID: tl.constexpr, HAS_DOS: tl.constexpr, HAS_DOL: tl.constexpr,
    ROW_STATE: tl.constexpr, LIN_PREC: tl.constexpr,
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
        h_row = row if ROW_STATE else bh  # the main form ("all") keeps H_tot only
        state = offs_d[:, None] * HEAD_DIM + offs_d[None, :]
        state_mask = d_valid[:, None] & d_valid[None, :]
        h = tl.load(H_ROW + h_row * HEAD_DIM * HEAD_DIM + state, mask=state_mask, other=0.0)
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
@_autotune(
    key=["HEAD_DIM", "BLOCK_M", "BLOCK_N", "PHI_ID", "HAS_DOS", "HAS_DOL", "ROW_STATE",
         "EVEN_K", "n_crit", "len_k"]
)  # fmt: skip
@triton.jit
def _sla_bwd_dq_kernel(
    Q, K, V, DOS, DOL, DQ,
    LSE, DELTA_S, DELTA_L, DEN,   # (B*H, Lq) fp32
    H_ROW, Z_ROW,                 # fp32 from the forward: per query block, or H_tot, Z_tot
    CRIT_LUT,
    sm_scale, len_q, len_k, n_q_blocks, n_crit,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, PHI_ID: tl.constexpr, HAS_DOS: tl.constexpr, HAS_DOL: tl.constexpr,
    ROW_STATE: tl.constexpr, EVEN_K: tl.constexpr,
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
            kv_tile = (start_n + offs_n)[:, None] * HEAD_DIM + offs_d[None, :]
            if EVEN_K:
                kv_mask = d_valid[None, :]
            else:
                kv_mask = (start_n + offs_n < len_k)[:, None] & d_valid[None, :]
            k = tl.load(K + k_base + kv_tile, mask=kv_mask, other=0.0)
            v = tl.load(V + k_base + kv_tile, mask=kv_mask, other=0.0)
            s = _dot(q, tl.trans(k), DOT_DTYPE, UPCAST, PREC) * qk_scale
            p = tl.exp2(s - lse[:, None])
            if not EVEN_K:
                if start_n + BLOCK_N > len_k:  # only the last key block holds padded keys
                    p = tl.where((start_n + offs_n < len_k)[None, :], p, 0.0)
            dp = _dot(do, tl.trans(v), DOT_DTYPE, UPCAST, PREC)
            ds = p * (dp - delta[:, None])
            dq += _dot(ds, k, DOT_DTYPE, UPCAST, PREC)
        dq *= sm_scale

    if HAS_DOL:
        # dphi(q) = (g H_i^T - delta_l Z_i) / den, then back through phi.
        h_row = row if ROW_STATE else bh  # the main form ("all") keeps H_tot only
        state = offs_d[:, None] * HEAD_DIM + offs_d[None, :]
        h = tl.load(H_ROW + h_row * HEAD_DIM * HEAD_DIM + state,
                    mask=d_valid[:, None] & d_valid[None, :], other=0.0)  # fmt: skip
        z = tl.load(Z_ROW + h_row * HEAD_DIM + offs_d, mask=d_valid, other=0.0)
        den = tl.load(DEN + bh * len_q + offs_m, mask=m_valid, other=1.0)
        delta_l = tl.load(DELTA_L + bh * len_q + offs_m, mask=m_valid, other=0.0)
        do_l = tl.load(DOL + q_tile, mask=q_mask, other=0.0)
        dphi = _dot_fp32(do_l, tl.trans(h), LIN_PREC) - delta_l[:, None] * z[None, :]
        dphi = dphi / den[:, None]
        x = q.to(tl.float32)
        dq += _feature_map_bwd(x, _feature_map(x, d_valid, PHI_ID), dphi, PHI_ID)

    tl.store(DQ + q_tile, dq.to(DQ.dtype.element_ty), mask=q_mask)


# ----------------------------------------------------------------------------------------
# Backward 5: dK, dV of one key block, sparse part (FlashAttention-2 over the transposed LUT)
# ----------------------------------------------------------------------------------------
@_autotune(key=["HEAD_DIM", "BLOCK_M", "BLOCK_N", "len_q", "n_crit_entries"])
@triton.jit
def _sla_bwd_dkdv_kernel(
    Q, K, V, DOS, DK, DV,
    LSE, DELTA_S,                 # (B*H, Lq) fp32
    CRIT_T_OFF, CRIT_T_IDX,       # CSR: query blocks for which key block j is critical
    sm_scale, len_q, len_k, n_k_blocks, n_crit_entries,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    # The linear part is a kernel of its own (below): together the two held too many
    # registers (the D x D state beside the dK, dV accumulators) and spilled.
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

    # Transposed FlashAttention-2: P^T = 2^(K Q^T scale - lse), dV += P^T dO,
    # dP^T = V dO^T, dS^T = P^T (dP^T - delta), dK += scale dS^T Q.
    # Padded keys: k = 0 rows give finite P^T rows that are never stored.
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

    tl.store(DK + kv_tile, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + kv_tile, dv.to(DV.dtype.element_ty), mask=kv_mask)


# ----------------------------------------------------------------------------------------
# Backward 6: dK, dV of one key block, linear part (added to the sparse part when there is one)
# ----------------------------------------------------------------------------------------
@_autotune(key=["HEAD_DIM", "BLOCK_N", "PHI_ID", "LIN_MODE", "ACCUMULATE", "n_lin_entries"])
@triton.jit
def _sla_bwd_dkdv_linear_kernel(
    K, V, DK, DV,
    LIN_T_OFF, LIN_T_IDX,         # CSR: query blocks whose linear list holds key block j
    DH_STATE, DZ_STATE,           # per query block dH_i, dZ_i
    DH_TOTAL, DZ_TOTAL,           # (B*H, D, D), (B*H, D) fp32: sums over all query blocks
    len_k, n_q_blocks, n_k_blocks, n_lin_entries,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    PHI_ID: tl.constexpr, LIN_MODE: tl.constexpr, ACCUMULATE: tl.constexpr,
    LIN_PREC: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_valid = offs_n < len_k
    d_valid = offs_d < HEAD_DIM
    kv_tile = bh * len_k * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    kv_mask = n_valid[:, None] & d_valid[None, :]
    state = offs_d[:, None] * HEAD_DIM + offs_d[None, :]
    state_mask = d_valid[:, None] & d_valid[None, :]

    # dh_j = sum of dH_i over the rows where j is marginal, by pre-aggregation, the
    # forward's lists transposed: dH_tot - sum over the rows where j is critical or
    # negligible (SUBTRACT), 0 + sum over the rows where j is marginal (ADD), or dH_tot
    # itself (ALL).
    if LIN_MODE == 1:  # LIN_ADD
        dh = tl.zeros([BLOCK_D, BLOCK_D], dtype=tl.float32)
        dz = tl.zeros([BLOCK_D], dtype=tl.float32)
    else:
        dh = tl.load(DH_TOTAL + bh * HEAD_DIM * HEAD_DIM + state, mask=state_mask, other=0.0)
        dz = tl.load(DZ_TOTAL + bh * HEAD_DIM + offs_d, mask=d_valid, other=0.0)
    if LIN_MODE == 1 or LIN_MODE == 2:
        csr = bh * (n_k_blocks + 1) + pid_n
        start = tl.load(LIN_T_OFF + csr)
        end = tl.load(LIN_T_OFF + csr + 1)
        for t in tl.range(start, end):
            row = bh * n_q_blocks + tl.load(LIN_T_IDX + bh * n_lin_entries + t)
            dh_i = tl.load(DH_STATE + row * HEAD_DIM * HEAD_DIM + state, mask=state_mask,
                           other=0.0).to(tl.float32)  # fmt: skip
            dz_i = tl.load(DZ_STATE + row * HEAD_DIM + offs_d, mask=d_valid, other=0.0)
            if LIN_MODE == 2:
                dh -= dh_i
                dz -= dz_i
            else:
                dh += dh_i
                dz += dz_i

    # h_j = phi(K_j)^T V_j, z_j = colsum phi(K_j):
    #   dV_j += phi(K_j) dh_j,   dphi(K_j) = V_j dh_j^T + dz_j, then back through phi.
    k = tl.load(K + kv_tile, mask=kv_mask, other=0.0)
    v = tl.load(V + kv_tile, mask=kv_mask, other=0.0)
    x = k.to(tl.float32)
    phi_k = _feature_map(x, d_valid, PHI_ID)
    dv = _dot_fp32(phi_k, dh, LIN_PREC)
    dphi = _dot_fp32(v, tl.trans(dh), LIN_PREC) + dz[None, :]
    dk = _feature_map_bwd(x, phi_k, dphi, PHI_ID)
    if ACCUMULATE:  # the sparse part, written by the kernel above
        dk += tl.load(DK + kv_tile, mask=kv_mask, other=0.0).to(tl.float32)
        dv += tl.load(DV + kv_tile, mask=kv_mask, other=0.0).to(tl.float32)
    tl.store(DK + kv_tile, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + kv_tile, dv.to(DV.dtype.element_ty), mask=kv_mask)


# ----------------------------------------------------------------------------------------
# Host side: plans (lookup tables, cached per mask), launches, autograd
# ----------------------------------------------------------------------------------------
LIN_MODE_NAMES = {LIN_NONE: "none", LIN_ADD: "add", LIN_SUBTRACT: "subtract", LIN_ALL: "all"}
# Key blocks per program of the state kernel: 512 key blocks (L 32760) make 64 chunks per
# (batch, head), enough programs to fill the GPU with few partial sums to add.
STATE_CHUNK = 8
SUB_TILE_ROWS = 64


@dataclass
class _Plan:
    """Everything about one call that is fixed by the mask and the shapes (cached on the mask)."""

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
    lin_lut: torch.Tensor  # (B*H, Nq, n_lin) int32: negligible (SUBTRACT) or marginal (ADD)
    fuse_linear: bool = False  # the linear branch inside the sparse kernel (else its own)
    cache: dict = field(default_factory=dict, repr=False)  # derived lookup tables

    @property
    def block_d(self) -> int:
        return max(16, triton.next_power_of_2(self.head_dim))

    @property
    def sub_m(self) -> int:
        """Query rows per sub-tile where a kernel splits a query block (D x D state or
        dK/dV accumulators beside it): 128-row tiles spilled registers at D = 128."""
        return min(self.block_q, SUB_TILE_ROWS)

    @property
    def even_k(self) -> bool:
        return self.len_k % self.block_kv == 0

    def crit_transposed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """CSR of the query blocks for which each key block is critical (dK/dV, sparse)."""
        if "crit" not in self.cache:
            self.cache["crit"] = _transpose_lut(self.crit_lut, self.n_k_blocks)
        return self.cache["crit"]

    def row_lut(self) -> torch.Tensor:
        """Every key block whose state a row adds (ADD: its marginal blocks) or subtracts
        (SUBTRACT: its critical and its negligible blocks) — the split linear kernel's list."""
        if "rows" not in self.cache:
            lut = self.lin_lut
            if self.lin_mode == LIN_SUBTRACT:
                lut = torch.cat([self.crit_lut, self.lin_lut], dim=-1).contiguous()
            self.cache["rows"] = lut
        return self.cache["rows"]

    def lin_transposed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """CSR of the query blocks whose linear list holds each key block (dK/dV, linear)."""
        if "lin" not in self.cache:
            self.cache["lin"] = _transpose_lut(self.row_lut(), self.n_k_blocks)
        return self.cache["lin"]


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
    return order[..., :count].sort(dim=-1).values.to(torch.int32).contiguous()


def _check_mask_shapes(q, k, mask: BlockMask) -> tuple[int, int]:
    """Shape checks that need no device sync; returns (Nq, Nk)."""
    batch, heads, len_q, _ = q.shape
    len_k = k.shape[2]
    n_q, n_k = -(-len_q // mask.block_q), -(-len_k // mask.block_kv)
    expected = (batch, heads, n_q, n_k)
    if tuple(mask.classes.shape) != expected:
        raise ValueError(
            f"mask.classes has shape {tuple(mask.classes.shape)}; for q {tuple(q.shape)}, "
            f"k {tuple(k.shape)} and blocks {mask.block_q}x{mask.block_kv} it must be {expected}"
        )
    for name in ("critical", "negligible"):
        lut = getattr(mask, name)
        if lut is None:
            continue
        if lut.dim() != 4 or tuple(lut.shape[:3]) != expected[:3]:
            raise ValueError(
                f"mask.{name} has shape {tuple(lut.shape)}; it must be "
                f"{expected[:3] + ('n_' + name,)}"
            )
        if lut.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"mask.{name} must hold integer indices, got {lut.dtype}")
    if (
        mask.critical.shape[-1] + (0 if mask.negligible is None else mask.negligible.shape[-1])
        > n_k
    ):
        raise ValueError("mask.critical and mask.negligible list more blocks than a row has")
    return n_q, n_k


def _negligible_lut(mask: BlockMask, classes, critical, n_k: int, linear: str) -> torch.Tensor:
    """The negligible blocks of each row, checked, for a mask that does not list them
    (built by hand): one device sync validates it against `classes`."""
    n_crit = critical.shape[-1]
    non_marginal = (classes != MARGINAL).sum(-1)
    zero = torch.zeros((), device=classes.device, dtype=torch.int32)
    stats = torch.stack(
        [
            critical.min() if n_crit else zero,
            critical.max() if n_crit else zero,
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
    return _select_blocks(classes == NEGLIGIBLE, max(nm_hi - n_crit, 0))


def _make_plan(q, k, mask: BlockMask, phi: str, linear: str, fuse_linear: bool = False) -> _Plan:
    """The launch plan of a call, cached on the mask: a mask reused across calls (layers,
    timing loops) is planned once, and a mask from `classify_blocks` (which lists its
    negligible blocks) is planned without a device sync."""
    key = (q.device, tuple(q.shape), tuple(k.shape), phi, linear, fuse_linear)
    if key in mask.plans:
        return mask.plans[key]
    n_q, n_k = _check_mask_shapes(q, k, mask)
    batch, heads, len_q, head_dim = q.shape
    bh = batch * heads
    classes = mask.classes.to(q.device)
    critical = mask.critical.to(q.device, torch.int32)
    n_crit = critical.shape[-1]
    if mask.negligible is not None:
        negligible = mask.negligible.to(q.device, torch.int32)
    else:
        negligible = _negligible_lut(mask, classes, critical, n_k, linear)
    n_neg = negligible.shape[-1]
    n_marginal = n_k - n_crit - n_neg

    no_blocks = torch.zeros(bh, n_q, 0, dtype=torch.int32, device=q.device)
    if linear == "none" or (linear == "marginal" and n_marginal == 0):
        # No linear block in any row: O_l = 0 / (0 + eps) = 0 exactly, its gradient too.
        lin_mode, lin_lut = LIN_NONE, no_blocks
    elif linear == "all":
        lin_mode, lin_lut = LIN_ALL, no_blocks  # H_tot: no list, no per-block state
    elif n_marginal <= n_crit + n_neg:
        # State loads per row: add the marginal blocks to zero (n_marginal loads) ...
        lin_mode = LIN_ADD
        lin_lut = _select_blocks(classes == MARGINAL, n_marginal).reshape(bh, n_q, n_marginal)
    else:
        # ... or subtract the others from H_tot (n_crit + n_neg loads, the critical ones
        # inside the sparse loop). Subtraction only when the marginal blocks are the
        # majority, so H_tot - (almost all of H_tot) never happens: no catastrophic fp32
        # cancellation, and a row with no marginal block is exactly 0 (LIN_NONE above).
        lin_mode, lin_lut = LIN_SUBTRACT, negligible.reshape(bh, n_q, n_neg)

    plan = _Plan(
        batch=batch,
        heads=heads,
        len_q=len_q,
        len_k=k.shape[2],
        head_dim=head_dim,
        block_q=mask.block_q,
        block_kv=mask.block_kv,
        n_q_blocks=n_q,
        n_k_blocks=n_k,
        phi_id=PHI_CODE[phi],
        lin_mode=lin_mode,
        crit_lut=critical.reshape(bh, n_q, n_crit).contiguous(),
        lin_lut=lin_lut.contiguous(),
        fuse_linear=fuse_linear,
    )
    mask.plans[key] = plan
    return plan


def plan_summary(
    q, k, mask: BlockMask, *, phi: str = "softmax", linear: str = "marginal",
    fuse_linear: bool = False,
) -> dict:  # fmt: skip
    """How a call runs its linear branch: the aggregation chosen and what each row visits.

    lin_mode: "none", "add" (the marginal blocks summed from zero), "subtract" (H_tot minus
    the critical and negligible blocks) or "all" (H_tot); n_critical: key blocks per row in
    the sparse loop; n_linear: key-block states per row gathered beyond the critical ones
    (under "subtract" the critical blocks' states are gathered too: n_critical more).
    """
    plan = _make_plan(q, k, mask, phi, linear, fuse_linear)
    return {
        "lin_mode": LIN_MODE_NAMES[plan.lin_mode],
        "n_critical": plan.crit_lut.shape[-1],
        "n_linear": plan.lin_lut.shape[-1],
    }


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


def _kv_states(k, v, plan: _Plan, dot: dict, store_blocks: bool):
    """Per-key-block states (when asked for) and their totals (SUBTRACT, ALL)."""
    bh, d, n_k = plan.batch * plan.heads, plan.head_dim, plan.n_k_blocks
    dev, f32 = k.device, torch.float32
    store_total = plan.lin_mode in (LIN_SUBTRACT, LIN_ALL)
    n_chunks = -(-n_k // STATE_CHUNK)
    unused = _unused(dev)
    h_state = z_state = h_part = z_part = unused
    if store_blocks:
        h_state = torch.empty(bh, n_k, d, d, device=dev, dtype=_state_dtype(k.dtype))
        z_state = torch.empty(bh, n_k, d, device=dev, dtype=f32)
    if store_total:
        h_part = torch.empty(bh, n_chunks, d, d, device=dev, dtype=f32)
        z_part = torch.empty(bh, n_chunks, d, device=dev, dtype=f32)
    _sla_kv_state_kernel[(n_chunks, bh)](
        k, v, h_state, z_state, h_part, z_part, plan.len_k, n_k, n_chunks,
        HEAD_DIM=d, BLOCK_D=plan.block_d, BLOCK_N=plan.block_kv, CHUNK=STATE_CHUNK,
        PHI_ID=plan.phi_id, LIN_PREC=dot["LIN_PREC"],
        STORE_BLOCKS=store_blocks, STORE_TOTAL=store_total,
    )  # fmt: skip
    h_total = h_part.sum(1) if store_total else unused
    z_total = z_part.sum(1) if store_total else unused
    return h_state, z_state, h_total, z_total


def _forward(q, k, v, plan: _Plan, save_for_backward: bool):
    """O_s, O_l and what the backward needs. Split layout: the sparse kernel, then the
    linear kernel gathering stored per-block states. Fused layout: one kernel in token
    space on totals alone; a training call also gathers the row states for the backward."""
    bh, d = plan.batch * plan.heads, plan.head_dim
    dev, f32 = q.device, torch.float32
    n_q = plan.n_q_blocks
    dot = _dot_args(q.dtype)
    mode = plan.lin_mode
    fused = plan.fuse_linear or mode == LIN_NONE
    gathered = mode in (LIN_ADD, LIN_SUBTRACT) and (save_for_backward or not fused)
    o_s = torch.empty_like(q)
    o_l = torch.zeros_like(q) if mode == LIN_NONE else torch.empty_like(q)
    unused = _unused(dev)
    lse = den = h_row = z_row = unused
    h_state = z_state = h_total = z_total = unused
    if save_for_backward:  # the inference path saves nothing
        lse = torch.empty(bh, plan.len_q, device=dev, dtype=f32)
        den = torch.empty(bh, plan.len_q, device=dev, dtype=f32)
    if mode in (LIN_SUBTRACT, LIN_ALL) or gathered:
        h_state, z_state, h_total, z_total = _kv_states(k, v, plan, dot, store_blocks=gathered)
    if save_for_backward and gathered:
        h_row = torch.empty(bh, n_q, d, d, device=dev, dtype=f32)
        z_row = torch.empty(bh, n_q, d, device=dev, dtype=f32)
    elif save_for_backward and mode == LIN_ALL:  # every row's state is the total
        h_row, z_row = h_total, z_total

    _sla_fwd_kernel[(n_q, bh)](
        q, k, v, plan.crit_lut, plan.lin_lut, h_total, z_total, o_s, o_l, lse, den,
        1.0 / math.sqrt(d), plan.len_q, plan.len_k, n_q,
        plan.crit_lut.shape[-1], plan.lin_lut.shape[-1],
        HEAD_DIM=d, BLOCK_D=plan.block_d, BLOCK_M=plan.block_q, BLOCK_N=plan.block_kv,
        PHI_ID=plan.phi_id, LIN_MODE=mode if fused else LIN_NONE,
        SAVE=save_for_backward, EVEN_K=plan.even_k, EPS=LINEAR_EPS, **dot,
    )  # fmt: skip
    if gathered or (mode == LIN_ALL and not fused):
        rows = plan.row_lut()
        _sla_fwd_linear_kernel[(n_q, bh)](
            q, rows, h_state, z_state, h_total, z_total, o_l, den, h_row, z_row,
            plan.len_q, n_q, plan.n_k_blocks, rows.shape[-1],
            HEAD_DIM=d, BLOCK_D=plan.block_d, BLOCK_M=plan.block_q, SUB_M=plan.sub_m,
            PHI_ID=plan.phi_id, LIN_MODE=mode, SAVE=save_for_backward, ROWS_ONLY=fused,
            EPS=LINEAR_EPS, LIN_PREC=dot["LIN_PREC"],
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
    row_state = plan.lin_mode != LIN_ALL
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
    flags = dict(HAS_DOS=has_dos, HAS_DOL=has_dol, ROW_STATE=row_state)
    _sla_bwd_preprocess_kernel[(n_q, bh)](
        q, o_s, do_s, do_l, den, h_row, delta_s, delta_l, dh_state, dz_state,
        plan.len_q, n_q, **common, **flags, LIN_PREC=dot["LIN_PREC"],
    )  # fmt: skip
    if has_dol and plan.lin_mode in (LIN_SUBTRACT, LIN_ALL):
        dh_total = dh_state.sum(1, dtype=f32)
        dz_total = dz_state.sum(1)

    scale = 1.0 / math.sqrt(d)
    _sla_bwd_dq_kernel[(n_q, bh)](
        q, k, v, do_s, do_l, dq, lse, delta_s, delta_l, den, h_row, z_row, plan.crit_lut,
        scale, plan.len_q, plan.len_k, n_q, n_crit,
        BLOCK_N=plan.block_kv, EVEN_K=plan.even_k, **common, **flags, **dot,
    )  # fmt: skip

    if has_dos:
        crit_off, crit_idx = plan.crit_transposed()
        _sla_bwd_dkdv_kernel[(n_k, bh)](
            q, k, v, do_s, dk, dv, lse, delta_s, crit_off, crit_idx,
            scale, plan.len_q, plan.len_k, n_k, n_q * n_crit,
            # Whole query blocks: 64-row sub-tiles, pipelined, spilled more at 128 x 64
            # (sm_90 compile: 760 B of stack against 392 B at 8 warps).
            HEAD_DIM=d, BLOCK_D=plan.block_d, BLOCK_M=plan.block_q, BLOCK_N=plan.block_kv, DOT_DTYPE=dot["DOT_DTYPE"], UPCAST=dot["UPCAST"], PREC=dot["PREC"],
        )  # fmt: skip
    if has_dol:
        lin_off, lin_idx, n_lin_entries = unused, unused, 0
        if plan.lin_mode in (LIN_ADD, LIN_SUBTRACT):
            lin_off, lin_idx = plan.lin_transposed()
            n_lin_entries = lin_idx.shape[-1]
        _sla_bwd_dkdv_linear_kernel[(n_k, bh)](
            k, v, dk, dv, lin_off, lin_idx, dh_state, dz_state, dh_total, dz_total,
            plan.len_k, n_q, n_k, n_lin_entries,
            HEAD_DIM=d, BLOCK_D=plan.block_d, BLOCK_N=plan.block_kv, PHI_ID=plan.phi_id,
            LIN_MODE=plan.lin_mode, ACCUMULATE=has_dos, LIN_PREC=dot["LIN_PREC"],
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
    fuse_linear: bool = False,
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
    plan = _make_plan(q, k, mask, phi, linear, fuse_linear)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _SLAFunction.apply(q, k, v, plan)
    o_s, o_l, _ = _forward(q, k, v, plan, save_for_backward=False)
    return o_s, o_l
