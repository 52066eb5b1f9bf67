"""SparseLinearAttention: variants against a direct composition of the reference, bad input."""

import pytest
import torch
import torch.nn.functional as F

import repro.sla.model as sla_model
from repro.kernels.attention_flops import AttentionFlopsCounter, sla_attention_flops
from repro.kernels.sla_reference import CRITICAL, NEGLIGIBLE, classify_blocks, sla_reference
from repro.sla.model import SparseLinearAttention

BLOCK = 16
# What each variant must hand the kernel: (k_h, k_l, linear), for k_h = k_l = 0.25.
KERNEL_ARGS = {
    "paper": (0.25, 0.25, "marginal"),
    "main": (0.25, 0.0, "all"),
    "sparse_only": (0.25, 0.0, "none"),
    "linear_only": (0.0, 0.0, "all"),
}


def qkv(length=72, head_dim=16, len_k=None, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    len_k = len_k or length
    shapes = [(2, 3, length, head_dim), (2, 3, len_k, head_dim), (2, 3, len_k, head_dim)]
    return [torch.randn(s, generator=gen).to(dtype) for s in shapes]


def randomise_proj(module, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


@pytest.mark.parametrize("phi", ["softmax", "elu", "relu"])
@pytest.mark.parametrize("variant", list(KERNEL_ARGS))
def test_variant_equals_reference_composition(variant, phi):
    q, k, v = qkv(length=72, len_k=88)  # partial last blocks on both sides
    module = SparseLinearAttention(
        16, variant=variant, k_h=0.25, k_l=0.25, block_q=BLOCK, block_kv=BLOCK, phi=phi
    )
    randomise_proj(module)
    out = module(q, k, v)

    k_h, k_l, linear = KERNEL_ARGS[variant]
    mask = classify_blocks(q, k, block_q=BLOCK, block_kv=BLOCK, k_h=k_h, k_l=k_l)
    o_s, o_l = sla_reference(q, k, v, mask, phi=phi, linear=linear)
    expected = (
        o_s if linear == "none" else o_s + F.linear(o_l, module.proj.weight, module.proj.bias)
    )
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(module.last_mask.classes, mask.classes, atol=0, rtol=0)


def test_variant_classes():
    q, k, v = qkv(length=128)
    for variant, has_critical, has_negligible in (
        ("paper", True, True),
        ("main", True, False),
        ("linear_only", False, False),
    ):
        module = SparseLinearAttention(
            16, variant=variant, k_h=0.25, k_l=0.25, block_q=BLOCK, block_kv=BLOCK
        )
        module(q, k, v)
        classes = module.last_mask.classes
        assert bool((classes == CRITICAL).any()) == has_critical, variant
        assert bool((classes == NEGLIGIBLE).any()) == has_negligible, variant
    assert SparseLinearAttention(16, variant="sparse_only").proj is None
    assert not list(SparseLinearAttention(16, variant="full").parameters())


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize(
    "kwargs", [{"variant": "full"}, {"variant": "paper", "k_h": 1.0, "k_l": 0.0}]
)
def test_full_attention_equals_sdpa(kwargs, backend):
    q, k, v = qkv(length=40, len_k=56)
    module = SparseLinearAttention(16, block_q=BLOCK, block_kv=BLOCK, backend=backend, **kwargs)
    torch.testing.assert_close(
        module(q, k, v), F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5
    )


def test_zero_init_proj_gives_the_sparse_branch():
    q, k, v = qkv()
    module = SparseLinearAttention(16, k_h=0.25, k_l=0.25, block_q=BLOCK, block_kv=BLOCK)
    assert module.proj.weight.abs().sum() == 0 and module.proj.bias.abs().sum() == 0
    mask = classify_blocks(q, k, block_q=BLOCK, block_kv=BLOCK, k_h=0.25, k_l=0.25)
    o_s, o_l = sla_reference(q, k, v, mask)
    assert o_l.abs().max() > 0  # the linear branch is there, Proj silences it
    torch.testing.assert_close(module(q, k, v), o_s, atol=1e-5, rtol=1e-5)


def test_gradients_reach_proj_and_inputs_and_dtype_is_kept():
    q, k, v = (t.requires_grad_() for t in qkv())
    module = SparseLinearAttention(16, k_h=0.25, k_l=0.25, block_q=BLOCK, block_kv=BLOCK)
    module(q, k, v).square().sum().backward()
    assert module.proj.weight.grad.abs().sum() > 0
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (q, k, v))
    assert module.last_mask.classes.grad_fn is None
    bf16 = [t.detach().bfloat16() for t in (q, k, v)]
    assert module(*bf16).dtype == torch.bfloat16


def test_forward_reports_flops_to_an_active_counter():
    q, k, v = qkv(length=72)
    module = SparseLinearAttention(16, k_h=0.25, k_l=0.25, block_q=BLOCK, block_kv=BLOCK)
    module(q, k, v)  # no counter: nothing to report to
    with AttentionFlopsCounter() as counter:
        module(q, k, v)
        module(q, k, v)
    one = sla_attention_flops(
        module.last_mask.classes,
        block_q=BLOCK,
        block_kv=BLOCK,
        len_q=72,
        len_k=72,
        head_dim=16,
        linear="marginal",
    )
    assert counter.calls == 2 and counter.flops.total == 2 * one.total
    assert 0 < counter.flops.sparsity < 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"variant": "sparse"}, "variant="),
        ({"phi": "hedgehog"}, "phi="),
        ({"k_h": 0.6, "k_l": 0.5}, "k_h \\+ k_l"),
        ({"k_h": 1.5}, "k_h="),
        ({"k_l": -0.1}, "k_l="),
        ({"block_q": 24}, "block_q=24"),
        ({"block_kv": 8}, "block_kv=8"),
        ({"backend": "cuda"}, "backend="),
    ],
)
def test_bad_configuration_names_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparseLinearAttention(16, **kwargs)


@pytest.mark.parametrize("head_dim", [12, 256])
def test_unsupported_head_dim(head_dim):
    with pytest.raises(ValueError, match="head_dim"):
        SparseLinearAttention(head_dim)


@pytest.fixture
def no_kernel(monkeypatch):
    """Fail the test if a kernel is reached: bad shapes must be refused before."""

    def launched(*args, **kwargs):
        raise AssertionError("a kernel ran on bad input")

    monkeypatch.setattr(sla_model, "sla_attention", launched)
    monkeypatch.setattr(sla_model.F, "scaled_dot_product_attention", launched)


@pytest.mark.parametrize("variant", ["paper", "full"])
@pytest.mark.parametrize(
    "shapes, match",
    [
        (((1, 2, 32, 16), (1, 2, 32, 32), (1, 2, 32, 32)), "head_dim"),
        (((1, 2, 32, 16), (1, 2, 32, 16), (1, 2, 48, 16)), "same length"),
        (((1, 2, 32, 16), (1, 3, 32, 16), (1, 3, 32, 16)), "batch, heads"),
        (((2, 32, 16), (2, 32, 16), (2, 32, 16)), "shape"),
        (((1, 2, 32, 12), (1, 2, 32, 12), (1, 2, 32, 12)), "head_dim 12"),
        (((1, 2, 32, 32), (1, 2, 32, 32), (1, 2, 32, 32)), "head_dim=16"),
    ],
)
def test_bad_shapes_fail_before_any_kernel(no_kernel, variant, shapes, match):
    module = SparseLinearAttention(16, variant=variant, block_q=BLOCK, block_kv=BLOCK)
    tensors = [torch.randn(s) for s in shapes]
    with pytest.raises(ValueError, match=match):
        module(*tensors)
