"""AGD model: building/loading the base DiT, the offset adapters, and their checkpoints."""

from functools import partial

import pytest
import torch
from diffusers import DiTTransformer2DModel
from safetensors.torch import load_file, save_file

from repro.agd.model import AdaptedDiT, AGDAdapters, GuidanceEmbedding, load_adapters, save_adapters
from repro.core.diffusion import (
    ClassifierFreeGuidance,
    DistilledGuidance,
    DiTDenoiser,
    eps_of,
    make_scheduler,
    sample,
)
from repro.core.errors import ReproInputError
from repro.core.io import save_tensors
from repro.core.modelio import (
    build_dit,
    load_dit,
    model_kind,
    null_label,
    save_dit,
    save_model,
    set_label_dropout,
)

NUM_CLASSES = 4
D = 16  # 2 heads x 8


@pytest.fixture
def tiny_base(tiny_dit):
    """The shared tiny DiT (conftest) with this module's NUM_CLASSES classes."""
    return partial(tiny_dit, num_embeds_ada_norm=NUM_CLASSES)


@pytest.fixture
def tiny_config(tiny_dit_config):
    """Its config as build_dit params."""
    return {**tiny_dit_config, "num_embeds_ada_norm": NUM_CLASSES}


def tiny_adapters(hidden_dim=D, num_blocks=2, seed=0):
    return AGDAdapters(hidden_dim, num_blocks, adapter_dim=8, num_classes=NUM_CLASSES, seed=seed)


def inputs(batch=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, 8, 8, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    labels = torch.randint(0, NUM_CLASSES + 1, (batch,), generator=gen)  # the null class too
    w = 1 + 4 * torch.rand(batch, generator=gen)
    return x, t, labels, w


def base_eps(base, x, t, labels):
    with torch.no_grad():
        return base(x, timestep=t, class_labels=labels).sample


def take_adapter_step(model, x, t, labels, w, lr=1e-2):
    """One Adam step on the trainable parameters towards a random target."""
    opt = torch.optim.Adam(model.trainable_parameters(), lr=lr)
    target = torch.randn_like(x)
    loss = ((model(x, t, labels, w) - target) ** 2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()


def trained_adapters(base, seed=0):
    """Adapters with non-zero offsets (one step away from the zero init)."""
    adapters = tiny_adapters(seed=seed)
    model = AdaptedDiT(base, adapters)
    take_adapter_step(model, *inputs())
    model.detach()
    return adapters


# ----------------------------------------------------------------------------- base DiT


def test_build_dit_from_architecture_keys(tiny_base, tiny_config):
    base = build_dit({**tiny_config, "seed": 0})
    assert isinstance(base, DiTTransformer2DModel) and not base.training
    assert base.out_channels == 1 and base.inner_dim == D and len(base.transformer_blocks) == 2
    assert null_label(base) == NUM_CLASSES
    # diffusers keeps a null row in every block's label table.
    table = base.transformer_blocks[0].norm1.emb.class_embedder.embedding_table
    assert table.num_embeddings == NUM_CLASSES + 1
    # The seed fixes the init; other seeds give other weights.
    same, other = build_dit({**tiny_config, "seed": 0}), build_dit({**tiny_config, "seed": 1})
    x, t, labels, _ = inputs()
    assert torch.equal(base_eps(base, x, t, labels), base_eps(same, x, t, labels))
    assert not torch.allclose(base_eps(base, x, t, labels), base_eps(other, x, t, labels))
    # The tests' shared tiny DiT is the one build_dit makes from the same seed.
    assert torch.equal(base_eps(base, x, t, labels), base_eps(tiny_base(seed=0), x, t, labels))

    with pytest.raises(ReproInputError, match="params.num_layers"):
        build_dit({k: v for k, v in tiny_config.items() if k != "num_layers"})
    with pytest.raises(ReproInputError, match="params.patch_size"):
        build_dit({**tiny_config, "patch_size": 3})


def test_set_label_dropout(tiny_base):
    base = tiny_base()
    base.train()
    x, t, _, _ = inputs(batch=64)
    labels = torch.zeros(64, dtype=torch.long)
    set_label_dropout(base, 1.0)  # every label dropped: train mode equals the null class
    torch.testing.assert_close(
        base_eps(base, x, t, labels), base_eps(base, x, t, torch.full_like(labels, NUM_CLASSES))
    )
    set_label_dropout(base, 0.0)  # no dropout: train mode equals eval mode
    train_out = base_eps(base, x, t, labels)
    torch.testing.assert_close(train_out, base_eps(base.eval(), x, t, labels))


def test_save_and_load_dit(tiny_base, tmp_path):
    base = tiny_base()
    out = tmp_path / "ckpt" / "dit"
    save_dit(base, out)
    save_dit(tiny_base(seed=1), out)  # overwriting an existing checkpoint works
    save_dit(base, out)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "repro_model.json",
    ]
    assert [p.name for p in out.parent.iterdir()] == ["dit"]  # no temp dirs left behind
    assert model_kind(out) == "dit"
    loaded = load_dit(out)
    x, t, labels, _ = inputs()
    assert torch.equal(base_eps(loaded, x, t, labels), base_eps(base, x, t, labels))

    # A model directory of another kind is refused, naming the directory and both kinds.
    foreign = tmp_path / "foreign"
    save_model(base, foreign, kind="wan_t2v")
    with pytest.raises(ReproInputError, match=r"foreign.*'wan_t2v'.*'dit'"):
        load_dit(foreign)

    with pytest.raises(ReproInputError, match="nowhere"):
        load_dit(tmp_path / "nowhere")
    weights = out / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    del state["proj_out_2.bias"]
    save_file(state, weights)
    with pytest.raises(ReproInputError, match="dit.*proj_out_2.bias"):
        load_dit(out)
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(ReproInputError, match="dit"):
        load_dit(out)
    (out / "config.json").write_text("{not json")
    with pytest.raises(ReproInputError, match="dit"):
        load_dit(out)


def test_build_dit_pretrained_paper_scale_path(tiny_base, tmp_path):
    # DiT-XL/2 style: learned sigma (2C outputs) in the "transformer" subfolder of a pipeline dir.
    saved = tiny_base(seed=3, out_channels=2)
    saved.save_pretrained(tmp_path / "hub" / "transformer", safe_serialization=True)
    params = {
        "pretrained": str(tmp_path / "hub"),
        "subfolder": "transformer",
        "local_files_only": True,
    }
    base = build_dit(params)
    assert base.out_channels == 2 and not base.training
    x, t, labels, w = inputs()
    assert torch.equal(base_eps(base, x, t, labels), base_eps(saved, x, t, labels))

    # Denoisers return eps and the learned variance (eps_of takes eps); the adapters attach
    # to it as to any DiT (zero-initialised: the same output).
    out = DiTDenoiser(base)(x, t, labels)
    assert out.shape == (4, 2, 8, 8) and eps_of(out, x).shape == (4, 1, 8, 8)
    with torch.no_grad():
        adapted = AdaptedDiT(base, tiny_adapters())(x, t, labels, w)
    torch.testing.assert_close(adapted, out, rtol=0, atol=0)

    with pytest.raises(ReproInputError, match="params.pretrained"):
        build_dit({**params, "subfolder": "unet"})


# ----------------------------------------------------------------------------- adapters


def test_guidance_embedding():
    emb = GuidanceEmbedding(8, seed=0)
    assert emb.frequencies.shape == (8,) and emb.phases.shape == (8,)
    assert (emb.phases >= 0).all() and (emb.phases < 1).all()
    w = torch.tensor([1.0, 1.5, 4.0])
    out = emb(w)
    assert out.shape == (3, 8)
    assert not torch.allclose(out[0], out[1])
    torch.testing.assert_close(out.mean(-1), torch.zeros(3), atol=1e-5, rtol=0)  # final LayerNorm
    assert torch.equal(GuidanceEmbedding(8, seed=0).frequencies, emb.frequencies)
    assert not torch.equal(GuidanceEmbedding(8, seed=1).frequencies, emb.frequencies)
    assert GuidanceEmbedding(8, num_fourier=5).frequencies.shape == (5,)


def test_adapters_shapes_config_and_seed():
    adapters = tiny_adapters()
    x, t, labels, w = inputs()
    c = adapters.condition(w, t, labels)
    assert c.shape == (4, 8)
    assert adapters.offset(1, c).shape == (4, D)
    assert torch.equal(adapters.offset(0, c), torch.zeros(4, D))  # zero-initialised
    assert adapters.config == {
        "hidden_dim": D,
        "num_blocks": 2,
        "adapter_dim": 8,
        "num_classes": NUM_CLASSES,
        "num_fourier": 8,
        "w_scale": 1.0,
        "seed": 0,
        "timestep_features": 256,
        "kind": "offset",
    }
    assert AGDAdapters(**adapters.config).config == adapters.config
    # The whole init comes from the seed, not from the global RNG.
    torch.manual_seed(123)
    again = tiny_adapters()
    for (name, a), b in zip(
        adapters.state_dict().items(), again.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    assert not torch.equal(tiny_adapters(seed=1).class_embed.weight, adapters.class_embed.weight)


def test_adapted_dit_at_init_equals_base(tiny_base):
    base = tiny_base()
    x, t, labels, w = inputs()
    expected = base_eps(base, x, t, labels)
    model = AdaptedDiT(base, tiny_adapters())
    with torch.no_grad():
        assert torch.equal(model(x, t, labels, w), expected)
        assert torch.equal(model(x, t, labels, None), expected)
    assert all(not p.requires_grad for p in base.parameters())


def test_adapter_step_trains_adapters_only(tiny_base):
    base = tiny_base()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = AdaptedDiT(base, tiny_adapters())
    model.train()
    assert model.adapters.training and not base.training  # no label dropout in the base
    x, t, labels, w = inputs()
    take_adapter_step(model, x, t, labels, w)
    assert all(p.grad is None for p in base.parameters())
    for key, value in base.state_dict().items():
        assert torch.equal(value, before[key]), key
    with torch.no_grad():
        out = model(x, t, labels, w)
        assert not torch.allclose(out, base_eps(base, x, t, labels))
        # w is an input: another scale gives another output; w=None is the base alone.
        assert not torch.allclose(out, model(x, t, labels, w + 1))
        assert torch.equal(model(x, t, labels, None), base_eps(base, x, t, labels))
        # A float scale means the same scale for every sample.
        torch.testing.assert_close(
            model(x, t, labels, 2.0), model(x, t, labels, torch.full((4,), 2.0))
        )
        # Deterministic even in train mode (the base's label dropout stays off).
        assert torch.equal(out, model(x, t, labels, w))


def test_offset_goes_before_the_gate(tiny_base):
    """The offset is added to attn1's output, which the adaLN-zero gate then multiplies."""
    base = tiny_base()
    with torch.no_grad():  # a zero gate: attention (and the offset with it) has no effect
        for block in base.transformer_blocks:
            block.norm1.linear.weight[2 * D : 3 * D] = 0
            block.norm1.linear.bias[2 * D : 3 * D] = 0
    adapters = tiny_adapters()
    with torch.no_grad():
        for mlp in adapters.offsets:
            mlp[-1].bias.fill_(5.0)
    x, t, labels, w = inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            AdaptedDiT(base, adapters)(x, t, labels, w), base_eps(base, x, t, labels)
        )


def test_parameter_counts_and_fraction(tiny_base):
    base = tiny_base(num_layers=4, num_attention_heads=4, attention_head_dim=16)
    adapters = AGDAdapters(64, 4, adapter_dim=16, num_classes=NUM_CLASSES)
    model = AdaptedDiT(base, adapters)
    counts = model.parameter_counts()
    h = 16
    per_block = (h * h + h) + 2 * h + (h * 64 + 64)
    guidance = (h * 4 * h + 4 * h) + 2 * 4 * h + (4 * h * h + h) + 2 * h
    expected = 4 * per_block + guidance + (256 * h + h) + (NUM_CLASSES + 1) * h
    assert counts["trainable"] == counts["adapter"] == expected
    assert counts["base"] == sum(p.numel() for p in base.parameters())
    assert 0 < counts["fraction"] < 0.15
    model.detach()
    # The Meng et al. baseline trains everything.
    full = AdaptedDiT(base, adapters, train_base=True).parameter_counts()
    assert full["trainable"] == full["base"] + full["adapter"]


def test_detach_removes_hooks(tiny_base):
    base = tiny_base()
    x, t, labels, w = inputs()
    expected = base_eps(base, x, t, labels)
    model = AdaptedDiT(base, tiny_adapters())
    take_adapter_step(model, x, t, labels, w)
    with pytest.raises(ValueError, match="already has adapters"):
        AdaptedDiT(base, tiny_adapters())
    assert model.detach() is base
    assert all(not block.attn1._forward_hooks for block in base.transformer_blocks)
    assert all(p.requires_grad for p in base.parameters())  # as it was before
    assert torch.equal(base_eps(base, x, t, labels), expected)
    with pytest.raises(RuntimeError, match="detached"):
        model(x, t, labels, w)
    AdaptedDiT(base, tiny_adapters())  # the base can take adapters again


def test_save_load_adapters_round_trip(tiny_base, tmp_path):
    base = tiny_base()
    adapters = trained_adapters(base)
    path = tmp_path / "adapters.safetensors"
    save_adapters(path, adapters, extra_meta={"step": 7})
    loaded = load_adapters(path)
    assert loaded.config == adapters.config and loaded.source == str(path)
    assert torch.equal(loaded.guidance_embed.frequencies, adapters.guidance_embed.frequencies)
    # Only adapter weights are in the file (the Fourier buffers included), no base weights.
    keys = set(load_file(path))
    assert keys == set(adapters.state_dict())
    assert "guidance_embed.phases" in keys and not any("transformer_blocks" in k for k in keys)

    x, t, labels, w = inputs()
    with torch.no_grad():
        original = AdaptedDiT(base, adapters)
        a = original(x, t, labels, w)
        original.detach()
        b = AdaptedDiT(base, loaded)(x, t, labels, w)
    assert torch.equal(a, b)
    assert not torch.allclose(a, base_eps(base, x, t, labels))


def test_adapters_load_onto_another_checkpoint(tiny_base, tmp_path):
    adapters = trained_adapters(tiny_base(seed=0))
    path = tmp_path / "adapters.safetensors"
    save_adapters(path, adapters)

    other = tiny_base(seed=5)  # a different checkpoint of the same architecture
    x, t, labels, w = inputs()
    plain = base_eps(other, x, t, labels)
    with torch.no_grad():
        out = AdaptedDiT(other, load_adapters(path))(x, t, labels, w)
    assert out.shape == plain.shape and not torch.allclose(out, plain)


def test_mismatched_adapters_name_the_file(tiny_base, tmp_path):
    path = tmp_path / "wide.safetensors"
    save_adapters(path, tiny_adapters(hidden_dim=32))
    with pytest.raises(ReproInputError, match="wide.safetensors.*hidden_dim"):
        AdaptedDiT(tiny_base(), load_adapters(path))
    deep = tmp_path / "deep.safetensors"
    save_adapters(deep, tiny_adapters(num_blocks=3))
    with pytest.raises(ReproInputError, match="deep.safetensors.*num_blocks"):
        AdaptedDiT(tiny_base(), load_adapters(deep))


def test_load_adapters_rejects_bad_files(tmp_path):
    with pytest.raises(ReproInputError, match="missing.safetensors"):
        load_adapters(tmp_path / "missing.safetensors")

    good = tmp_path / "good.safetensors"
    save_adapters(good, tiny_adapters())
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:300])
    with pytest.raises(ReproInputError, match="truncated.safetensors"):
        load_adapters(truncated)

    foreign = tmp_path / "foreign.safetensors"
    save_tensors(foreign, {"x": torch.zeros(2)}, kind="dit_weights")
    with pytest.raises(ReproInputError, match="foreign.safetensors.*agd_adapters"):
        load_adapters(foreign)

    # Right kind, but the weights do not fit the recorded config.
    state = tiny_adapters().state_dict()
    del state["offsets.1.3.weight"]
    broken = tmp_path / "broken.safetensors"
    save_tensors(broken, state, kind="agd_adapters", metadata={"config": tiny_adapters().config})
    with pytest.raises(ReproInputError, match="broken.safetensors"):
        load_adapters(broken)


def test_adapters_learn_the_cfg_target(tiny_base):
    """A few steps on adapters alone reduce the error to the CFG eps (the AGD objective)."""
    base = tiny_base()
    null = null_label(base)
    x, t, _, w = inputs(batch=32, seed=1)
    labels = torch.randint(0, NUM_CLASSES, (32,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        target = ClassifierFreeGuidance(w, null)(DiTDenoiser(base), x, t, labels)
    model = AdaptedDiT(base, AGDAdapters(D, 2, 16, NUM_CLASSES))
    opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        loss = ((model(x, t, labels, w) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # Per-sample offsets cannot express all of CFG on a random base (~0.55x here), but
    # they must close a good part of the gap.
    assert losses[-1] < 0.7 * losses[0]


def test_distilled_sampling_costs_one_nfe_per_step(tiny_base):
    model = AdaptedDiT(tiny_base(), tiny_adapters())
    result = sample(
        model,
        make_scheduler("ddim"),
        labels=torch.tensor([0, 1, 2]),
        shape=(1, 8, 8),
        steps=5,
        guidance=DistilledGuidance(torch.tensor([1.0, 2.0, 4.0])),
        generator=torch.Generator().manual_seed(0),
    )
    assert result.nfe_per_image == 5 and result.images.shape == (3, 1, 8, 8)
    assert torch.isfinite(result.images).all()


def test_guidance_embedding_is_smooth_in_w_at_the_default_scale():
    """Nearby guidance scales must get nearby features, or the MLP cannot interpolate."""
    from repro.agd.model import GuidanceEmbedding

    def fourier(scale):
        emb = GuidanceEmbedding(64, w_scale=scale, seed=0)
        w = torch.tensor([3.0, 3.05])
        feats = torch.cos(2 * torch.pi * (emb.frequencies * (w * scale)[:, None] + emb.phases))
        return torch.nn.functional.cosine_similarity(feats[0], feats[1], dim=0)

    assert fourier(1.0) > 0.95
    assert fourier(1000.0) < 0.5


def test_cross_attention_adapters_start_at_the_base_and_depend_on_the_image(tiny_base, tmp_path):
    """The paper's cross-attention adapter: zero-init, token-dependent, saved alone."""
    from repro.agd.model import load_adapters, save_adapters

    base = tiny_base()
    adapters = AGDAdapters(D, 2, 8, NUM_CLASSES, kind="cross_attention", seed=0)
    model = AdaptedDiT(base, adapters)
    x, t, labels, w = inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, labels, w), base_eps(base, x, t, labels))
        for p in adapters.cross.parameters():  # move away from the zero init
            p.normal_(std=0.5)
        adapted = model(x, t, labels, w)
    assert not torch.allclose(adapted, base_eps(base, x, t, labels))

    c = adapters.condition(w, t, labels)
    assert c.shape == (4, 3, 8)
    tokens = torch.randn(4, 16, D)
    delta = adapters.delta(0, c, tokens)
    assert delta.shape == (4, 16, D)
    # Unlike an offset, the correction differs from token to token and image to image.
    assert not torch.allclose(delta[:, 0], delta[:, 1])
    assert not torch.allclose(delta, adapters.delta(0, c, torch.randn(4, 16, D)))

    path = tmp_path / "cross.safetensors"
    save_adapters(path, adapters)
    model.detach()
    with torch.no_grad():
        reloaded = AdaptedDiT(base, load_adapters(path))(x, t, labels, w)
    torch.testing.assert_close(reloaded, adapted)
    with pytest.raises(ReproInputError, match="adapter_type"):
        AGDAdapters(D, 2, 8, NUM_CLASSES, kind="lora")
