"""The SLA processor inside tiny WanTransformer3DModel and DiTTransformer2DModel."""

from functools import partial

import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.models.transformers.transformer_wan import WanAttnProcessor
from safetensors.torch import load_model, save_model

from repro.core.errors import ReproInputError
from repro.kernels.attention_flops import AttentionFlopsCounter, dense_attention_flops
from repro.sla.model import SparseLinearAttention
from repro.sla.processor import (
    SLAAttnProcessor,
    SLAWanAttnProcessor,
    install_sla,
    load_sla_weights,
    sla_modules,
    sla_state_keys,
    uninstall_sla,
)

SPARSE = {"variant": "paper", "k_h": 0.25, "k_l": 0.25, "block_q": 16, "block_kv": 16}
FULL_CASES = [
    {"variant": "full", "block_q": 16, "block_kv": 16},
    {"variant": "paper", "k_h": 1.0, "k_l": 0.0, "block_q": 16, "block_kv": 16},
]


def tiny_wan(seed=0):
    torch.manual_seed(seed)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=16,
        ffn_dim=32,
        num_layers=2,
        rope_max_seq_len=32,
    )
    return model.eval()


def wan_inputs(frames=2, size=16, seed=0):
    """(1, 4, frames, size, size) latents: frames * (size / 2)^2 tokens (128 by default)."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(1, 4, frames, size, size, generator=gen),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, 5, 16, generator=gen),
    }


@pytest.fixture
def sla_dit(tiny_dit):
    """The shared tiny DiT (conftest) with 64 tokens of 2 heads x 16: 4 blocks of 16 per row."""
    return partial(tiny_dit, attention_head_dim=16, patch_size=1, num_embeds_ada_norm=4)


def dit_inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(2, 1, 8, 8, generator=gen),
        "timestep": torch.tensor([10, 600]),
        "class_labels": torch.tensor([0, 3]),
    }


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample


def randomise_sla(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for sla in sla_modules(model).values():
            for p in sla.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


@pytest.mark.parametrize("kwargs", FULL_CASES)
def test_wan_at_full_density_equals_stock(kwargs):
    model, inputs = tiny_wan(), wan_inputs(frames=2, size=8)  # 32 tokens, a partial block
    inputs["hidden_states"] = inputs["hidden_states"][..., :6, :]  # 24 tokens: 16 + 8
    stock = run(model, inputs)
    installed = install_sla(model, **kwargs)
    assert sorted(installed) == ["blocks.0.attn1", "blocks.1.attn1"]
    for block in model.blocks:
        assert isinstance(block.attn1.processor, SLAWanAttnProcessor)
        assert isinstance(block.attn2.processor, WanAttnProcessor)  # cross-attention untouched
        assert not hasattr(block.attn2, "sla")
    torch.testing.assert_close(run(model, inputs), stock, atol=1e-5, rtol=1e-5)
    model.fuse_qkv_projections()  # the processor follows Wan's fused to_qkv path too
    assert model.blocks[0].attn1.fused_projections
    torch.testing.assert_close(run(model, inputs), stock, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs", FULL_CASES)
def test_dit_at_full_density_equals_stock(sla_dit, kwargs):
    model, inputs = sla_dit(), dit_inputs()
    stock = run(model, inputs)
    installed = install_sla(model, **kwargs)
    assert sorted(installed) == ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]
    assert all(isinstance(b.attn1.processor, SLAAttnProcessor) for b in model.transformer_blocks)
    torch.testing.assert_close(run(model, inputs), stock, atol=1e-5, rtol=1e-5)


def test_sparse_sla_changes_the_output_and_uninstall_restores_stock():
    model, inputs = tiny_wan(), wan_inputs()
    stock = run(model, inputs)
    install_sla(model, **SPARSE)
    randomise_sla(model)
    assert (run(model, inputs) - stock).abs().max() > 1e-3
    assert set(sla_state_keys(model)) == {
        f"blocks.{i}.attn1.sla.proj.{p}" for i in (0, 1) for p in ("weight", "bias")
    }
    removed = uninstall_sla(model)
    assert sorted(removed) == ["blocks.0.attn1", "blocks.1.attn1"]
    assert all(isinstance(b.attn1.processor, WanAttnProcessor) for b in model.blocks)
    assert not any(".sla." in key for key in model.state_dict())
    torch.testing.assert_close(run(model, inputs), stock, atol=0, rtol=0)


def test_a_few_training_steps_lower_the_loss():
    """Denoising-like MSE on 128 tokens at 8 blocks per row: 2 critical, 4 marginal, 2 skipped."""
    model = tiny_wan().train()
    install_sla(model, **SPARSE)
    gen = torch.Generator().manual_seed(0)
    clean = torch.randn(4, 4, 2, 16, 16, generator=gen)
    noise = torch.randn(clean.shape, generator=gen)
    timestep = torch.tensor([100, 300, 600, 900])
    alpha = (1 - timestep / 1000).view(-1, 1, 1, 1, 1)
    noisy = alpha.sqrt() * clean + (1 - alpha).sqrt() * noise
    context = torch.randn(4, 5, 16, generator=gen)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        pred = model(noisy, timestep, context).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    proj = sla_modules(model)["blocks.0.attn1"].proj
    assert proj.weight.abs().sum() > 0  # SLA's own parameter was trained too
    fractions = sla_modules(model)["blocks.0.attn1"].last_mask.fractions()
    assert fractions == {"critical": 0.25, "marginal": 0.5, "negligible": 0.25}


def test_save_pretrained_then_load_sla_weights_round_trips(tmp_path):
    model, inputs = tiny_wan(), wan_inputs()
    install_sla(model, **SPARSE)
    randomise_sla(model)
    expected = run(model, inputs)
    model.save_pretrained(tmp_path / "ckpt", safe_serialization=True)

    reloaded = WanTransformer3DModel.from_pretrained(tmp_path / "ckpt").eval()
    install_sla(reloaded, **SPARSE)
    keys = load_sla_weights(reloaded, tmp_path / "ckpt")
    assert keys == sorted(sla_state_keys(model))
    torch.testing.assert_close(run(reloaded, inputs), expected, atol=0, rtol=0)


def test_safetensors_model_file_round_trips(sla_dit, tmp_path):
    model, inputs = sla_dit(), dit_inputs()
    install_sla(model, **SPARSE)
    randomise_sla(model)
    expected = run(model, inputs)
    save_model(model, str(tmp_path / "dit.safetensors"))

    fresh = sla_dit(seed=5)
    install_sla(fresh, **SPARSE)
    assert (run(fresh, inputs) - expected).abs().max() > 1e-3
    missing, unexpected = load_model(fresh, str(tmp_path / "dit.safetensors"))
    assert not missing and not unexpected
    torch.testing.assert_close(run(fresh, inputs), expected, atol=0, rtol=0)


def test_load_sla_weights_names_the_file_on_mismatch(tmp_path):
    stock = tiny_wan()
    save_model(stock, str(tmp_path / "stock.safetensors"))
    model = tiny_wan()
    install_sla(model, **SPARSE)
    with pytest.raises(ReproInputError, match="stock.safetensors.*missing"):
        load_sla_weights(model, tmp_path / "stock.safetensors")
    with pytest.raises(ReproInputError, match="nothing.safetensors"):
        load_sla_weights(model, tmp_path / "nothing.safetensors")

    save_model(model, str(tmp_path / "paper.safetensors"))
    sparse_only = tiny_wan()
    install_sla(sparse_only, **{**SPARSE, "variant": "sparse_only"})  # no Proj to load into
    with pytest.raises(ReproInputError, match="paper.safetensors.*unexpected"):
        load_sla_weights(sparse_only, tmp_path / "paper.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ReproInputError, match="junk.safetensors"):
        load_sla_weights(model, tmp_path / "junk.safetensors")


def test_flops_counter_sums_over_the_models_sla_modules():
    model, inputs = tiny_wan(), wan_inputs()  # 128 tokens, 2 heads x 16
    install_sla(model, **SPARSE)
    with AttentionFlopsCounter() as counter:
        run(model, inputs)
    assert counter.calls == 2  # one per self-attention layer
    assert counter.flops.dense == 2 * dense_attention_flops(1, 2, 128, 128, 16)
    assert counter.flops.block_sparsity == pytest.approx(0.75)
    assert 0 < counter.flops.total < counter.flops.dense


def test_bad_install_leaves_the_model_untouched(sla_dit):
    model = sla_dit()
    with pytest.raises(ValueError, match="k_h \\+ k_l"):
        install_sla(model, k_h=0.7, k_l=0.7)
    with pytest.raises(ValueError, match="block_q=24"):
        install_sla(model, block_q=24)
    assert all(isinstance(b.attn1.processor, AttnProcessor2_0) for b in model.transformer_blocks)
    assert not sla_modules(model)
    install_sla(model, **SPARSE)
    with pytest.raises(ValueError, match="already installed"):
        install_sla(model, **SPARSE)
    with pytest.raises(ValueError, match="no self-attention"):
        install_sla(torch.nn.Linear(4, 4))


def test_head_dim_the_kernel_does_not_support():
    torch.manual_seed(0)
    model = WanTransformer3DModel(
        num_attention_heads=2, attention_head_dim=12, in_channels=4, text_dim=16, freq_dim=16,
        ffn_dim=16, num_layers=1,
    )  # fmt: skip
    with pytest.raises(ValueError, match="head_dim=12"):
        install_sla(model)


def test_processor_refuses_cross_attention_and_masks():
    model = tiny_wan()
    install_sla(model, **SPARSE)
    attn = model.blocks[0].attn1
    x = torch.randn(1, 32, 32)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        attn(x, encoder_hidden_states=x)
    with pytest.raises(ValueError, match="attention_mask"):
        attn(x, attention_mask=torch.ones(1, 32, 32, dtype=torch.bool))
    bare = SLAWanAttnProcessor()
    with pytest.raises(ValueError, match="install_sla"):
        bare(model.blocks[0].attn2, x)
    assert isinstance(attn.sla, SparseLinearAttention)
