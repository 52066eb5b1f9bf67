"""The fused SLA Triton kernels against the dense PyTorch reference, forward and backward.

The real @triton.jit kernels run on CPU tensors through Triton's interpreter
(TRITON_INTERPRET=1, set by tests/conftest.py before triton is first imported, since
Triton reads it when @triton.jit decorates a function).

Every case compares O_s, O_l and the gradients of q, k, v (random upstream gradients
on both outputs) with autograd through `sla_reference` in float64 on the same
dtype-rounded inputs. Tolerances, as max|x - ref| <= atol + rtol * max|ref| per tensor:
fp32 1e-5 / 1e-5 (the kernels multiply fp32 tiles in IEEE fp32; observed <= 4e-6);
fp16 2e-3 / 1e-3 (observed <= 1.1e-3) and bf16 4e-2 / 1e-2 (observed <= 6e-2 on
gradients of magnitude ~5): the sparse branch's products take operands rounded to the
input dtype (P, dS, as in FlashAttention), bf16 inputs keep bf16 linear states, and
outputs and gradients are rounded to the input dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from repro.kernels import sla_triton as sla_triton_module
from repro.kernels.sla import sla_attention
from repro.kernels.sla_reference import (
    CRITICAL,
    MARGINAL,
    NEGLIGIBLE,
    BlockMask,
    classify_blocks,
    sla_reference,
)

# tests/conftest.py sets TRITON_INTERPRET=1 before triton is first imported; with an
# explicit TRITON_INTERPRET=0 the same tests run the compiled kernels on a GPU.
DEVICE = "cpu" if sla_triton_module.INTERPRETED else "cuda"
pytestmark = pytest.mark.skipif(
    DEVICE == "cuda" and not torch.cuda.is_available(),
    reason="TRITON_INTERPRET=0 and no CUDA device: nothing can run the Triton kernels",
)
sla_triton = sla_triton_module.sla_triton

TOLERANCE = {  # (atol, rtol)
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 1e-3),
    torch.bfloat16: (4e-2, 1e-2),
}
PHIS = ("softmax", "elu", "relu")
# (k_h, k_l): nothing critical, everything critical, everything negligible, no marginal
# block, and mixes whose linear branch adds marginal blocks or subtracts the others.
FRACTIONS = ((0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (0.25, 0.75), (0.3, 0.3), (0.1, 0.0), (0.5, 0.2))
# (batch, heads, Lq, Lk, head_dim, block_q, block_kv)
SHAPES = (
    (2, 2, 75, 75, 32, 16, 32),  # length a multiple of neither block
    (1, 3, 64, 64, 16, 16, 16),  # whole blocks only
    (2, 1, 100, 100, 64, 32, 16),
    (1, 2, 50, 70, 72, 32, 16),  # Lq != Lk, head_dim 72 (not a power of two)
    (1, 1, 17, 17, 16, 16, 16),  # one full block and a single-token block
)


@dataclass(frozen=True)
class Case:
    shape: tuple
    k_h: float
    k_l: float
    phi: str
    linear: str
    dtype: torch.dtype

    def __str__(self):
        b, h, lq, lk, d, bq, bkv = self.shape
        name = str(self.dtype).removeprefix("torch.")
        return (
            f"{name}-B{b}H{h}L{lq}x{lk}D{d}-blk{bq}x{bkv}-kh{self.k_h}-kl{self.k_l}"
            f"-{self.phi}-{self.linear}"
        )


def _cases():
    cases = []
    # fp32: every feature map x linear mode x fraction pair, shapes in rotation.
    for phi in PHIS:
        for linear in ("marginal", "all"):
            for k_h, k_l in FRACTIONS:
                shape = SHAPES[len(cases) % len(SHAPES)]
                cases.append(Case(shape, k_h, k_l, phi, linear, torch.float32))
    for k_h, k_l in FRACTIONS:  # "none" does not depend on phi
        cases.append(
            Case(SHAPES[len(cases) % len(SHAPES)], k_h, k_l, "softmax", "none", torch.float32)
        )
    # fp16 / bf16: every feature map and linear mode once, fractions and shapes in rotation.
    for i, dtype in enumerate((torch.float16, torch.bfloat16)):
        n = 0
        for phi in PHIS:
            for linear in ("marginal", "all", "none"):
                k_h, k_l = FRACTIONS[(n + 3 * i) % len(FRACTIONS)]
                cases.append(Case(SHAPES[(n + i) % len(SHAPES)], k_h, k_l, phi, linear, dtype))
                n += 1
        cases.append(Case((1, 1, 40, 40, 128, 16, 16), 0.3, 0.3, "softmax", "marginal", dtype))
    return cases


CASES = _cases()


def _inputs(case: Case, seed: int = 0):
    b, h, lq, lk, d, bq, bkv = case.shape
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, d, generator=gen).to(DEVICE)
    k = torch.randn(b, h, lk, d, generator=gen).to(DEVICE)
    v = torch.randn(b, h, lk, d, generator=gen).to(DEVICE)
    mask = classify_blocks(q, k, block_q=bq, block_kv=bkv, k_h=case.k_h, k_l=case.k_l)
    q, k, v = (t.to(case.dtype) for t in (q, k, v))
    grads = [torch.randn(b, h, lq, d, generator=gen).to(DEVICE, case.dtype) for _ in range(2)]
    return q, k, v, mask, grads


def _assert_close(name, got, ref, dtype):
    atol, rtol = TOLERANCE[dtype]
    assert got.dtype == dtype, f"{name}: dtype {got.dtype}, expected {dtype}"
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    err = (got.double() - ref).abs().max().item()
    bound = atol + rtol * ref.abs().max().item()
    assert err <= bound, f"{name}: max abs error {err:.3g} > {bound:.3g}"


def _reference(q, k, v, mask, grads, phi, linear, use=(True, True)):
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    outs = sla_reference(*leaves, mask, phi=phi, linear=linear)
    pairs = [(o, g.double()) for o, g, u in zip(outs, grads, use, strict=True) if u]
    torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    return outs, [t.grad for t in leaves]


def _triton(q, k, v, mask, grads, phi, linear, use=(True, True), fuse_linear=False):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    outs = sla_triton(*leaves, mask, phi=phi, linear=linear, fuse_linear=fuse_linear)
    pairs = [(o, g) for o, g, u in zip(outs, grads, use, strict=True) if u]
    torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    return outs, [t.grad for t in leaves]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_and_backward_match_reference(case):
    q, k, v, mask, grads = _inputs(case)
    (ref_s, ref_l), ref_grads = _reference(q, k, v, mask, grads, case.phi, case.linear)
    (o_s, o_l), got_grads = _triton(q, k, v, mask, grads, case.phi, case.linear)
    _assert_close("o_s", o_s, ref_s, case.dtype)
    _assert_close("o_l", o_l, ref_l, case.dtype)
    for name, got, ref in zip(("dq", "dk", "dv"), got_grads, ref_grads, strict=True):
        _assert_close(name, got, ref, case.dtype)


@pytest.mark.parametrize("use", [(True, False), (False, True)], ids=["only_o_s", "only_o_l"])
def test_gradient_through_one_branch(use):
    case = Case(SHAPES[0], 0.3, 0.3, "elu", "marginal", torch.float32)
    q, k, v, mask, grads = _inputs(case, seed=1)
    _, ref_grads = _reference(q, k, v, mask, grads, case.phi, case.linear, use)
    _, got_grads = _triton(q, k, v, mask, grads, case.phi, case.linear, use)
    for name, got, ref in zip(("dq", "dk", "dv"), got_grads, ref_grads, strict=True):
        _assert_close(name, got, ref, case.dtype)


# Each way the kernels can run the linear branch, picked by the plan (the mode is
# asserted, so a change of rule cannot silently drop a path): (shape, k_h, k_l, linear,
# expected mode). Shapes as SHAPES; 128-row query blocks with 64-row key blocks are the
# paper benchmark's shape.
PATHS = (
    ((1, 2, 200, 200, 32, 32, 16), 0.1, 0.0, "marginal", "subtract"),  # SLA-1: k_l = 0
    ((1, 2, 200, 200, 32, 32, 16), 0.15, 0.2, "marginal", "subtract"),  # three classes
    ((2, 1, 192, 192, 16, 16, 16), 0.2, 0.1, "marginal", "subtract"),  # L % block = 0
    ((1, 2, 100, 100, 32, 16, 32), 0.5, 0.25, "marginal", "add"),
    ((1, 1, 300, 300, 64, 128, 64), 0.2, 0.2, "marginal", "subtract"),  # 128 x 64 blocks
    ((1, 1, 300, 300, 64, 128, 64), 0.2, 0.0, "all", "all"),
    ((1, 1, 256, 256, 64, 128, 64), 0.25, 0.0, "none", "none"),
)


@pytest.mark.parametrize("fuse_linear", [False, True], ids=["split", "fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("path", PATHS, ids=lambda p: f"{p[4]}-{p[0][2]}-blk{p[0][5]}x{p[0][6]}")
def test_every_linear_path_matches_reference(path, dtype, fuse_linear):
    """Both layouts of the forward: the linear branch in a kernel of its own (the default)
    and fused into the sparse kernel (critical states subtracted inside its loop)."""
    shape, k_h, k_l, linear, mode = path
    case = Case(shape, k_h, k_l, "softmax", linear, dtype)
    q, k, v, mask, grads = _inputs(case, seed=5)
    assert sla_triton_module.plan_summary(q, k, mask, linear=linear)["lin_mode"] == mode
    (ref_s, ref_l), ref_grads = _reference(q, k, v, mask, grads, case.phi, linear)
    (o_s, o_l), got_grads = _triton(q, k, v, mask, grads, case.phi, linear, fuse_linear=fuse_linear)
    _assert_close("o_s", o_s, ref_s, dtype)
    _assert_close("o_l", o_l, ref_l, dtype)
    for name, got, ref in zip(("dq", "dk", "dv"), got_grads, ref_grads, strict=True):
        _assert_close(name, got, ref, dtype)


@pytest.mark.parametrize("fuse_linear", [False, True], ids=["split", "fused"])
@pytest.mark.parametrize("path", PATHS[1::2], ids=lambda p: p[4])
def test_inference_path_matches_training_path(path, fuse_linear):
    """Without requires_grad nothing is saved for a backward; the outputs must not change."""
    shape, k_h, k_l, linear, _ = path
    case = Case(shape, k_h, k_l, "softmax", linear, torch.float32)
    q, k, v, mask, _ = _inputs(case, seed=2)
    kw = dict(linear=linear, fuse_linear=fuse_linear)
    with torch.no_grad():
        plain = sla_triton(q, k, v, mask, **kw)
    trained = sla_triton(*(t.clone().requires_grad_() for t in (q, k, v)), mask, **kw)
    for a, b in zip(plain, trained, strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("k_h", "k_l", "linear", "mode", "n_lin"),
    [
        # 5 key blocks per row. Subtract: H_tot minus the critical blocks (inside the sparse
        # loop) and the negligible ones (the list); add: the marginal blocks from zero.
        (0.1, 0.0, "marginal", "subtract", 0),  # 1 critical, 4 marginal: the SLA-1 form
        (0.2, 0.2, "marginal", "subtract", 1),  # 1 + 1 non-marginal, 3 marginal
        (0.3, 0.3, "marginal", "add", 2),  # 2 + 1 non-marginal, 2 marginal: add those two
        (0.2, 0.4, "marginal", "add", 2),  # 1 + 2 non-marginal, 2 marginal
        (0.0, 0.0, "marginal", "subtract", 0),  # everything marginal: H_tot itself
        (0.25, 0.75, "marginal", "none", 0),  # no marginal block: O_l = 0 exactly
        (0.3, 0.3, "all", "all", 0),  # the main form: H_tot, no list
        (0.3, 0.0, "none", "none", 0),
    ],
)
def test_pre_aggregation_walks_the_shorter_list(k_h, k_l, linear, mode, n_lin):
    q = torch.randn(1, 2, 75, 16)
    mask = classify_blocks(q, q, block_q=16, block_kv=16, k_h=k_h, k_l=k_l)
    plan = sla_triton_module._make_plan(q, q, mask, "softmax", linear)
    assert sla_triton_module.LIN_MODE_NAMES[plan.lin_mode] == mode
    assert plan.lin_lut.shape == (2, 5, n_lin)
    assert sla_triton_module.plan_summary(q, q, mask, linear=linear) == {
        "lin_mode": mode,
        "n_critical": mask.n_critical,
        "n_linear": n_lin,
    }
    # The list of a row holds its marginal blocks (add) or its negligible ones (subtract).
    listed_class = {"add": MARGINAL, "subtract": NEGLIGIBLE}.get(mode)
    rows = zip(plan.lin_lut.reshape(10, n_lin).tolist(), mask.classes.reshape(10, 5), strict=True)
    for listed, row_classes in rows:
        assert listed == sorted(listed)
        if listed_class is not None:
            assert bool((row_classes[listed] == listed_class).all())
    # The same plan from a mask that does not list its negligible blocks (built by hand).
    bare = BlockMask(mask.classes, mask.critical, mask.block_q, mask.block_kv)
    again = sla_triton_module._make_plan(q, q, bare, "softmax", linear)
    assert again.lin_mode == plan.lin_mode and torch.equal(again.lin_lut, plan.lin_lut)


def test_plan_is_cached_on_the_mask():
    q = torch.randn(1, 2, 75, 16)
    mask = classify_blocks(q, q, block_q=16, block_kv=16, k_h=0.2, k_l=0.2)
    first = sla_triton_module._make_plan(q, q, mask, "softmax", "marginal")
    assert sla_triton_module._make_plan(q, q, mask, "softmax", "marginal") is first
    assert sla_triton_module._make_plan(q, q, mask, "softmax", "all") is not first


def test_transposed_lut_lists_the_rows_of_each_column():
    gen = torch.Generator().manual_seed(3)
    n_rows, n_cols, per_row = 6, 7, 3
    lut = (
        torch.stack(
            [
                torch.randperm(n_cols, generator=gen)[:per_row].sort().values
                for _ in range(2 * n_rows)
            ]
        )
        .reshape(2, n_rows, per_row)
        .to(torch.int32)
    )
    offsets, indices = sla_triton_module._transpose_lut(lut, n_cols)
    for bh in range(2):
        for j in range(n_cols):
            rows = indices[bh, offsets[bh, j] : offsets[bh, j + 1]].tolist()
            expected = [i for i in range(n_rows) if j in lut[bh, i].tolist()]
            assert rows == expected


def test_dispatcher_runs_the_triton_backend():
    q, k, v = (torch.randn(1, 2, 40, 16, device=DEVICE) for _ in range(3))
    kwargs = dict(block_q=16, block_kv=16, k_h=0.3, k_l=0.3)
    got = sla_attention(q, k, v, backend="triton", **kwargs)
    ref = sla_attention(q, k, v, backend="reference", **kwargs)
    torch.testing.assert_close(got.o_s, ref.o_s, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.o_l, ref.o_l, atol=1e-5, rtol=1e-5)


def test_bad_arguments_are_named():
    q = torch.randn(1, 1, 32, 16, device=DEVICE)
    mask = classify_blocks(q, q, block_q=16, block_kv=16, k_h=0.5, k_l=0.0)
    with pytest.raises(ValueError, match="float64"):
        sla_triton(q.double(), q.double(), q.double(), mask)
    longer = torch.randn(1, 1, 48, 16, device=DEVICE)
    with pytest.raises(ValueError, match="mask.classes"):
        sla_triton(longer, longer, longer, mask)
    with pytest.raises(ValueError, match="phi"):
        sla_triton(q, q, q, mask, phi="tanh")
    # Rows with different numbers of non-marginal blocks break the constant-count LUT.
    classes = torch.tensor([[CRITICAL, NEGLIGIBLE], [MARGINAL, CRITICAL]], dtype=torch.int8)
    uneven = BlockMask(
        classes=classes.view(1, 1, 2, 2),
        critical=torch.tensor([[0], [1]], dtype=torch.int32).view(1, 1, 2, 1),
        block_q=16,
        block_kv=16,
    )
    with pytest.raises(ValueError, match="non-marginal"):
        sla_triton(q, q, q, uneven)


def test_fp16_linear_states_beyond_the_fp16_range():
    """sum_t phi(k_t) v_t reaches ~1e5 here: the linear branch must not round it to fp16.

    With |mean v| >> std v, dphi(q) = (g H^T - delta_l Z) / den cancels: delta_l must come
    from the fp32 O_l, not the stored fp16 one. (The sparse branch's gradients lose
    digits the same way in every FlashAttention-style fp16 backward, so only the linear
    branch's gradients are compared.)
    """
    gen = torch.Generator().manual_seed(4)
    q, k = (torch.randn(1, 1, 100, 16, generator=gen) for _ in range(2))
    v = 1000.0 + torch.randn(1, 1, 100, 16, generator=gen)
    q, k, v = (t.to(DEVICE, torch.float16) for t in (q, k, v))
    mask = classify_blocks(q, k, block_q=16, block_kv=16, k_h=0.3, k_l=0.0)
    grads = [torch.randn(1, 1, 100, 16, generator=gen).to(DEVICE, torch.float16) for _ in range(2)]
    linear_only = (False, True)
    (ref_s, ref_l), ref_grads = _reference(q, k, v, mask, grads, "elu", "all", linear_only)
    (o_s, o_l), got_grads = _triton(q, k, v, mask, grads, "elu", "all", linear_only)
    for got, ref in ((o_s, ref_s), (o_l, ref_l)):
        torch.testing.assert_close(got.double(), ref, rtol=2e-3, atol=0.0)
    for name, got, ref in zip(("dq", "dk", "dv"), got_grads, ref_grads, strict=True):
        _assert_close(name, got, ref, torch.float16)
