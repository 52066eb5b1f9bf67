"""The SLA reference and the blockwise PyTorch path: the mathematics everything else is tested against."""

import math
import re

import pytest
import torch
import torch.nn.functional as F

from repro.kernels.sla import sla_attention
from repro.kernels.sla_reference import (
    CRITICAL,
    MARGINAL,
    NEGLIGIBLE,
    block_counts,
    check_sla_args,
    classify_blocks,
    feature_map,
    pool_blocks,
    sla_blockwise,
    sla_reference,
)


def qkv(batch, heads, length, head_dim, dtype=torch.float32, seed=0, len_k=None):
    gen = torch.Generator().manual_seed(seed)
    len_k = len_k or length
    shapes = [(batch, heads, length, head_dim)] + [(batch, heads, len_k, head_dim)] * 2
    return [torch.randn(*s, generator=gen, dtype=dtype) for s in shapes]


def dense_sla(q, k, v, block_q, block_kv, k_h, k_l, phi, linear):
    """A third, independent formulation: loop over query tokens, classes looked up per pair."""
    mask = classify_blocks(q, k, block_q=block_q, block_kv=block_kv, k_h=k_h, k_l=k_l)
    o_s, o_l = torch.zeros_like(q), torch.zeros_like(q)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            for i in range(q.shape[2]):
                cls = mask.classes[b, h, i // block_q]
                per_key = cls[torch.arange(k.shape[2]) // block_kv]
                crit = per_key == CRITICAL
                if crit.any():
                    s = (k[b, h, crit] @ q[b, h, i]) / math.sqrt(q.shape[-1])
                    o_s[b, h, i] = torch.softmax(s, 0) @ v[b, h, crit]
                lin = {
                    "marginal": per_key == MARGINAL,
                    "all": torch.ones_like(crit),
                    "none": torch.zeros_like(crit),
                }[linear]
                if lin.any():
                    a = feature_map(k[b, h, lin], phi) @ feature_map(q[b, h, i], phi)
                    o_l[b, h, i] = (a @ v[b, h, lin]) / (a.sum() + 1e-6)
    return o_s, o_l


CASES = [
    # batch, heads, length, head_dim, block_q, block_kv, k_h, k_l, phi, linear
    (1, 2, 50, 16, 16, 16, 0.25, 0.25, "softmax", "marginal"),
    (2, 1, 37, 32, 16, 16, 0.5, 0.0, "elu", "marginal"),
    (1, 1, 64, 16, 32, 16, 0.0, 0.5, "relu", "all"),
    (1, 2, 70, 24, 16, 32, 0.3, 0.4, "softmax", "none"),
    (1, 1, 33, 16, 16, 16, 1.0, 0.0, "softmax", "marginal"),
]


@pytest.mark.parametrize("case", CASES)
def test_reference_matches_a_token_loop(case):
    batch, heads, length, head_dim, bq, bkv, k_h, k_l, phi, linear = case
    q, k, v = qkv(batch, heads, length, head_dim, torch.float64)
    mask = classify_blocks(q, k, block_q=bq, block_kv=bkv, k_h=k_h, k_l=k_l)
    o_s, o_l = sla_reference(q, k, v, mask, phi=phi, linear=linear)
    want_s, want_l = dense_sla(q, k, v, bq, bkv, k_h, k_l, phi, linear)
    torch.testing.assert_close(o_s, want_s, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(o_l, want_l, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("case", CASES)
def test_blockwise_path_matches_reference_forward_and_backward(case):
    batch, heads, length, head_dim, bq, bkv, k_h, k_l, phi, linear = case
    q, k, v = qkv(batch, heads, length, head_dim, torch.float64, seed=1)
    mask = classify_blocks(q, k, block_q=bq, block_kv=bkv, k_h=k_h, k_l=k_l)
    grads = []
    for fn in (sla_reference, sla_blockwise):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        o_s, o_l = fn(*leaves, mask, phi=phi, linear=linear)
        gen = torch.Generator().manual_seed(7)
        upstream = (o_s * torch.randn(o_s.shape, generator=gen, dtype=o_s.dtype)).sum() + (
            o_l * torch.randn(o_l.shape, generator=gen, dtype=o_l.dtype)
        ).sum()
        upstream.backward()
        grads.append((o_s.detach(), o_l.detach(), *[t.grad for t in leaves]))
    for got, want in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("phi", ["softmax", "elu", "relu"])
def test_reference_gradcheck_float64(phi):
    # relu's kink is measure-zero for Gaussian inputs; gradcheck's eps stays away from it.
    q, k, v = qkv(1, 1, 20, 16, torch.float64, seed=3)
    mask = classify_blocks(q, k, block_q=16, block_kv=16, k_h=0.5, k_l=0.0)
    # Two key blocks: one critical, one marginal, so both branches carry gradient.
    assert mask.classes.eq(CRITICAL).any() and mask.classes.eq(MARGINAL).any()
    for fn in (sla_reference, sla_blockwise):

        def f(q, k, v, fn=fn):
            return fn(q, k, v, mask, phi=phi, linear="marginal")

        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("length", [16, 45, 64])
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_full_critical_is_exact_softmax_attention(length, backend):
    q, k, v = qkv(2, 3, length, 32, seed=length)
    out = sla_attention(q, k, v, block_q=16, block_kv=16, k_h=1.0, k_l=0.0, backend=backend)
    assert out.mask.fractions()["critical"] == 1.0
    torch.testing.assert_close(
        out.o_s, F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-5
    )
    # No marginal block: the linear branch is exactly zero.
    assert out.o_l.abs().max() == 0


def test_cross_attention_lengths():
    q, k, v = qkv(1, 2, 40, 16, seed=5, len_k=90)
    out = sla_attention(q, k, v, block_q=16, block_kv=32, k_h=1.0, k_l=0.0, backend="torch")
    torch.testing.assert_close(
        out.o_s, F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-5
    )


def test_low_precision_inputs_accumulate_in_float32():
    q, k, v = qkv(1, 2, 48, 32, seed=9)
    mask = classify_blocks(q, k, block_q=16, block_kv=16, k_h=0.34, k_l=0.33)
    want_s, want_l = sla_reference(q, k, v, mask)
    for dtype, tol in ((torch.bfloat16, 3e-2), (torch.float16, 4e-3)):
        low = [t.to(dtype) for t in (q, k, v)]
        for fn in (sla_reference, sla_blockwise):
            o_s, o_l = fn(*low, mask)
            assert o_s.dtype == dtype and o_l.dtype == dtype
            torch.testing.assert_close(o_s.float(), want_s, rtol=tol, atol=tol)
            torch.testing.assert_close(o_l.float(), want_l, rtol=tol, atol=tol)


def test_classification_counts_and_ranking():
    q, k, _ = qkv(2, 2, 100, 16, seed=11)
    bq, bkv, k_h, k_l = 16, 16, 0.3, 0.4
    mask = classify_blocks(q, k, block_q=bq, block_kv=bkv, k_h=k_h, k_l=k_l)
    n_q, n_k = 7, 7
    assert mask.classes.shape == (2, 2, n_q, n_k)
    n_crit, n_negl = block_counts(n_k, k_h, k_l)
    assert (n_crit, n_negl) == (3, 2)
    assert (mask.classes == CRITICAL).sum(-1).eq(n_crit).all()
    assert (mask.classes == NEGLIGIBLE).sum(-1).eq(n_negl).all()
    # The lookup table lists exactly the critical blocks, ascending.
    assert mask.critical.shape == (2, 2, n_q, n_crit)
    assert (mask.critical.diff(dim=-1) > 0).all()
    from_lut = torch.zeros_like(mask.classes, dtype=torch.bool)
    from_lut.scatter_(-1, mask.critical.long(), True)
    assert torch.equal(from_lut, mask.classes == CRITICAL)
    # Critical blocks score above marginal ones, marginal above negligible.
    logits = pool_blocks(q, bq) @ pool_blocks(k, bkv).transpose(-1, -2)
    for hi, lo in ((CRITICAL, MARGINAL), (MARGINAL, NEGLIGIBLE)):
        worst_hi = logits.masked_fill(mask.classes != hi, math.inf).amin(-1)
        best_lo = logits.masked_fill(mask.classes != lo, -math.inf).amax(-1)
        assert (worst_hi >= best_lo).all()


def test_pool_blocks_averages_only_valid_tokens():
    x = torch.arange(20, dtype=torch.float32).view(1, 1, 20, 1).expand(1, 1, 20, 16)
    pooled = pool_blocks(x, 16)
    assert pooled[0, 0, :, 0].tolist() == [7.5, 17.5]  # mean of 0..15, mean of 16..19


@pytest.mark.parametrize(
    "n_blocks,k_h,k_l,want",
    [
        (20, 0.05, 0.10, (1, 2)),
        (10, 0.0, 0.0, (0, 0)),
        (10, 1.0, 0.0, (10, 0)),
        (7, 0.5, 0.5, (4, 3)),
        (3, 0.01, 0.99, (1, 2)),
        (512, 0.05, 0.10, (26, 51)),
    ],
)
def test_block_counts(n_blocks, k_h, k_l, want):
    assert block_counts(n_blocks, k_h, k_l) == want


@pytest.mark.parametrize(
    "change,argument",
    [
        (dict(q=torch.randn(1, 2, 32)), "q must have shape"),
        (dict(k=torch.randn(1, 3, 32, 16)), "agree in (batch, heads)"),
        (dict(v=torch.randn(1, 2, 31, 16)), "k and v must have the same length"),
        (dict(v=torch.randn(1, 2, 32, 32)), "head_dim"),
        (
            dict(
                q=torch.randn(1, 2, 32, 12),
                k=torch.randn(1, 2, 32, 12),
                v=torch.randn(1, 2, 32, 12),
            ),
            "head_dim 12",
        ),
        (
            dict(
                q=torch.randn(1, 2, 32, 256),
                k=torch.randn(1, 2, 32, 256),
                v=torch.randn(1, 2, 32, 256),
            ),
            "head_dim 256",
        ),
        (dict(q=torch.randn(1, 2, 32, 16).double()), "share a dtype"),
        (dict(q=torch.zeros(1, 2, 32, 16, dtype=torch.int32)), "dtype"),
        (dict(block_q=24), "block_q=24"),
        (dict(block_kv=8), "block_kv=8"),
        (dict(k_h=0.7, k_l=0.4), "k_h + k_l"),
        (dict(k_h=-0.1), "k_h=-0.1"),
        (dict(k_l=1.5), "k_l=1.5"),
        (dict(phi="tanh"), "phi='tanh'"),
        (dict(linear="most"), "linear='most'"),
    ],
)
def test_bad_arguments_name_the_argument(change, argument):
    args = dict(
        q=torch.randn(1, 2, 32, 16),
        k=torch.randn(1, 2, 32, 16),
        v=torch.randn(1, 2, 32, 16),
        block_q=16,
        block_kv=16,
        k_h=0.25,
        k_l=0.25,
        phi="softmax",
        linear="marginal",
    )
    args.update(change)
    with pytest.raises(ValueError, match=re.escape(argument)):
        check_sla_args(**args)
    with pytest.raises(ValueError, match=re.escape(argument)):
        sla_attention(**args)


def test_unknown_backend():
    q, k, v = qkv(1, 1, 16, 16)
    with pytest.raises(ValueError, match="backend='cuda'"):
        sla_attention(q, k, v, block_q=16, block_kv=16, backend="cuda")
