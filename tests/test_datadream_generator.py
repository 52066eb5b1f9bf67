"""DataDream's generator LoRA: the paper's targets attach (counted), only LoRA weights
train, scale 0 is the unadapted model exactly, files round-trip and bad ones are refused.

The tiny text-to-image model built here (build_tiny_t2i / save_tiny_t2i) is what the
other DataDream generator tests use too.
"""

import pytest
import torch
from torch import nn

from repro.core.data import DIGIT_NAMES
from repro.core.errors import ReproInputError
from repro.core.io import save_tensors
from repro.datadream import generator as gen_mod
from repro.datadream.generator import (
    GeneratorLora,
    load_lora,
    lora_layers,
    lora_settings,
    save_lora,
)

PROMPT = "a glyph of the digit {classname}"
# A UNet2DConditionModel of 0.2M parameters (two cross-attention blocks and the mid
# block's) and a CLIPTextModel of 27k on 8x8x1 pixels: the tiny t2i's classes, smaller.
TINY_T2I = {
    "seed": 0,
    "vocab_size": 600,
    "unet": {
        "sample_size": 8,
        "in_channels": 1,
        "out_channels": 1,
        "block_out_channels": [16, 32],
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "layers_per_block": 1,
        "attention_head_dim": 4,
        "norm_num_groups": 8,
    },
    "text_encoder": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 16,
    },
}
# The config's lora section (datadream.lora) at test size: the paper's targets.
LORA = {
    "rank": 4,
    "alpha": 4,
    "init": "gaussian",
    "unet_targets": ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj"],
    "text_targets": ["q_proj", "k_proj", "v_proj", "out_proj"],
}


def build_tiny_t2i(seed: int = 0):
    """The tiny t2i (repro.foundation.t2i.build_t2i), its tokenizer knowing every digit's
    prompt."""
    from repro.foundation.t2i import build_t2i

    captions = [PROMPT.format(classname=c) for c in DIGIT_NAMES] + [""]
    params = {**TINY_T2I, "seed": seed}
    return build_t2i(params, captions)


def save_tiny_t2i(out_dir, seed: int = 0) -> dict:
    """A tiny t2i saved as the pipeline saves it; returns its store.model_params dict."""
    from repro.foundation.t2i import save_t2i

    save_t2i(build_tiny_t2i(seed), out_dir)
    return {"name": "t2i", "pretrained": str(out_dir), "subfolder": None, "local_files_only": True}


@pytest.fixture
def t2i():
    torch.manual_seed(0)
    return build_tiny_t2i()


def generate(t2i, prompts, seed=0):
    from repro.foundation.t2i import generate as t2i_generate

    return t2i_generate(
        t2i,
        prompts,
        guidance=2.0,
        steps=2,
        generator=torch.Generator().manual_seed(seed),
        batch_size=4,
        progress=False,
    )


def attention_modules(unet):
    from diffusers.models.attention_processor import Attention

    return [m for m in unet.modules() if isinstance(m, Attention)]


def text_attention(text_encoder):
    from transformers.models.clip.modeling_clip import CLIPAttention

    return [m for m in text_encoder.modules() if isinstance(m, CLIPAttention)]


def random_state(lora, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in lora.state().items()}


# ----------------------------------------------------------------------------- attach


def test_the_paper_targets_attach_to_every_attention_projection(t2i):
    n_attn = len(attention_modules(t2i.unet))
    layers = t2i.text_encoder.config.num_hidden_layers
    assert len(text_attention(t2i.text_encoder)) == layers == 2
    assert n_attn == 8  # 2 (down) + 2 (mid) + 4 (up: two layers of the last block)
    lora = GeneratorLora(t2i, lora_settings(LORA), seed=0)
    assert lora.counts() == {
        "unet": {
            "to_q": n_attn,
            "to_k": n_attn,
            "to_v": n_attn,
            "to_out.0": n_attn,
            "add_k_proj": 0,  # no block of this UNet has added key/value projections
            "add_v_proj": 0,
        },
        "text_encoder": {"q_proj": layers, "k_proj": layers, "v_proj": layers, "out_proj": layers},
    }
    # The LoRA layers sit exactly where the targets name: in every Attention and CLIP layer.
    for attn in attention_modules(t2i.unet):
        for proj in (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0]):
            assert proj in lora_layers(t2i.unet).values()
    for a in text_attention(t2i.text_encoder):
        for proj in (a.q_proj, a.k_proj, a.v_proj, a.out_proj):
            assert proj in lora_layers(t2i.text_encoder).values()
    assert len(lora_layers(t2i.unet)) == 4 * n_attn
    assert len(lora_layers(t2i.text_encoder)) == 4 * layers


def test_added_kv_projections_attach_where_the_blocks_have_them():
    from diffusers import UNet2DConditionModel

    t2i = build_tiny_t2i()
    # SimpleCrossAttn blocks (unCLIP-style): their attention has add_k_proj / add_v_proj.
    config = {
        **TINY_T2I["unet"],
        "block_out_channels": (16, 32),
        "down_block_types": ("SimpleCrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "SimpleCrossAttnUpBlock2D"),
        "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
    }
    t2i.unet = UNet2DConditionModel(**config, cross_attention_dim=32)
    n_attn = len(attention_modules(t2i.unet))
    assert n_attn == 4
    counts = GeneratorLora(t2i, lora_settings(LORA), seed=0).counts()["unet"]
    assert counts == {t: n_attn for t in LORA["unet_targets"]}


def test_only_lora_weights_train_and_their_count_is_r_times_in_plus_out(t2i):
    base = {k: v.clone() for k, v in t2i.unet.state_dict().items()}
    base_text = {k: v.clone() for k, v in t2i.text_encoder.state_dict().items()}
    lora = GeneratorLora(t2i, lora_settings(LORA), seed=0)
    trainable = [
        (n, p)
        for m in (t2i.unet, t2i.text_encoder)
        for n, p in m.named_parameters()
        if p.requires_grad
    ]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n, _ in trainable)
    # By hand: r (in + out) per adapted Linear.
    expected = 0
    for attn in attention_modules(t2i.unet):
        for proj in (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0]):
            lin = proj.get_base_layer()
            expected += LORA["rank"] * (lin.in_features + lin.out_features)
    for a in text_attention(t2i.text_encoder):
        for proj in (a.q_proj, a.k_proj, a.v_proj, a.out_proj):
            lin = proj.get_base_layer()
            expected += LORA["rank"] * (lin.in_features + lin.out_features)
    assert lora.num_parameters == sum(p.numel() for _, p in trainable) == expected

    # A few optimizer steps move the LoRA and nothing else.
    from repro.foundation.t2i import denoising_loss

    opt = torch.optim.AdamW(lora.parameters(), lr=1e-2, weight_decay=0.1)
    images = torch.rand(4, 1, 8, 8) * 2 - 1
    for step in range(3):
        loss = denoising_loss(
            t2i, images, ["a glyph of the digit one"] * 4, torch.Generator().manual_seed(step)
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = {k: v for k, v in lora.state().items() if ".lora_B." in k}
    assert any(v.abs().max() > 0 for v in after.values())
    for model, before in ((t2i.unet, base), (t2i.text_encoder, base_text)):
        for name, value in model.state_dict().items():
            if "lora_" in name:
                continue
            key = name.replace(".base_layer.", ".")
            assert torch.equal(value, before[key]), name


def test_gaussian_init_is_seeded_and_changes_nothing(t2i):
    prompts = ["a glyph of the digit two"] * 2
    reference = generate(t2i, prompts)
    lora = GeneratorLora(t2i, lora_settings(LORA), seed=3)
    init = lora.state()
    a = torch.cat([v.flatten() for k, v in init.items() if ".lora_A." in k])
    assert all(v.abs().max() == 0 for k, v in init.items() if ".lora_B." in k)
    # A ~ N(0, 1/r): thousands of draws pin the std within a few percent.
    assert a.numel() > 3000 and abs(a.std().item() - 1 / LORA["rank"]) < 0.01
    assert torch.equal(generate(t2i, prompts), reference)  # B = 0: the model is unchanged
    lora.load_state(random_state(lora), "random")
    lora.reset()
    assert all(torch.equal(v, init[k]) for k, v in lora.state().items())
    lora.seed = 4  # another seed, another A
    lora.reset()
    assert all(torch.equal(v, init[k]) == (".lora_B." in k) for k, v in lora.state().items())


def test_scale_zero_generates_exactly_what_the_unadapted_model_does(t2i):
    prompts = ["a glyph of the digit seven", "a glyph of the digit one"] * 2
    unadapted = generate(t2i, prompts, seed=5)
    lora = GeneratorLora(t2i, lora_settings(LORA), seed=0)
    lora.load_state(random_state(lora), "random")
    with lora.scaled(0.0):
        assert torch.equal(generate(t2i, prompts, seed=5), unadapted)
    adapted = generate(t2i, prompts, seed=5)  # scale back to 1: the LoRA acts
    assert (adapted - unadapted).abs().max() > 0.05
    with lora.scaled(1.0):
        assert torch.equal(generate(t2i, prompts, seed=5), adapted)


def test_a_target_that_matches_no_module_names_the_key_and_attaches_nothing(t2i):
    with pytest.raises(ReproInputError, match=r"datadream\.lora\.unet_targets.*to_qq"):
        GeneratorLora(t2i, lora_settings({**LORA, "unet_targets": ["to_qq", "to_k"]}), seed=0)
    with pytest.raises(ReproInputError, match=r"datadream\.lora\.text_targets.*query"):
        GeneratorLora(t2i, lora_settings({**LORA, "text_targets": ["query"]}), seed=0)
    # The added-KV projections alone match nothing in this UNet: that is an error too.
    with pytest.raises(ReproInputError, match=r"datadream\.lora\.unet_targets"):
        GeneratorLora(t2i, lora_settings({**LORA, "unet_targets": ["add_k_proj"]}), seed=0)
    assert not lora_layers(t2i.unet) and not lora_layers(t2i.text_encoder)
    assert all(p.requires_grad for p in t2i.unet.parameters())


@pytest.mark.parametrize(
    "key,value",
    [
        ("rank", 0),
        ("alpha", -1),
        ("init", "kaiming"),
        ("unet_targets", []),
        ("text_targets", "q_proj"),
    ],
)
def test_bad_lora_settings_name_the_key(key, value):
    with pytest.raises(ReproInputError, match=rf"datadream\.lora\.{key}"):
        lora_settings({**LORA, key: value})


# ----------------------------------------------------------------------------- files


def test_lora_file_round_trips_and_bad_files_are_refused(t2i, tmp_path):
    lora = GeneratorLora(t2i, lora_settings(LORA), seed=0)
    states = {"zero": random_state(lora, 1), "one": random_state(lora, 2)}
    path = tmp_path / "cls.safetensors"
    save_lora(path, states, variant="cls", classes=["zero", "one"], settings=lora.settings)
    groups, meta = load_lora(path)
    assert meta["variant"] == "cls" and meta["classes"] == ["zero", "one"]
    assert meta["lora"] == lora_settings(LORA)
    for group, state in states.items():
        assert groups[group].keys() == state.keys()
        assert all(torch.equal(groups[group][k], v) for k, v in state.items())
    lora.load_state(groups["one"], str(path))
    assert all(torch.equal(v, states["one"][k]) for k, v in lora.state().items())

    foreign = tmp_path / "digits.safetensors"
    save_tensors(foreign, {"images": torch.zeros(2, 1, 8, 8)}, kind="digits")
    with pytest.raises(ReproInputError, match=rf"{foreign}.*datadream_lora"):
        load_lora(foreign)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ReproInputError, match=str(truncated)):
        load_lora(truncated)
    # Weights of another rank do not fit the attached layers: refused, naming the file.
    small = GeneratorLora(build_tiny_t2i(), lora_settings({**LORA, "rank": 2}), seed=0)
    other = tmp_path / "rank2.safetensors"
    save_lora(
        other, {"all": small.state()}, variant="dset", classes=["zero"], settings=small.settings
    )
    with pytest.raises(ReproInputError, match=rf"{other}.*shape"):
        lora.load_state(load_lora(other)[0]["all"], str(other))
    # A state missing layers (text encoder LoRA absent) is refused too.
    partial = {k: v for k, v in states["zero"].items() if k.startswith("unet.")}
    with pytest.raises(ReproInputError, match="partial.*missing"):
        lora.load_state(partial, "partial")


def test_lora_parameters_module_shares_the_weights(t2i):
    lora = GeneratorLora(t2i, lora_settings(LORA), seed=0)
    module = lora.module()
    assert isinstance(module, nn.Module)
    assert sum(p.numel() for p in module.parameters()) == lora.num_parameters
    state = random_state(lora)
    # What a checkpoint restores through the module lands in the model's LoRA layers.
    module.load_state_dict({f"lora.{k.replace('.', '/')}": v for k, v in state.items()})
    assert all(torch.equal(v, state[k]) for k, v in lora.state().items())
    assert gen_mod.KIND == "datadream_lora"
