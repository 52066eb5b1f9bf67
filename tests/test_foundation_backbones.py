"""The ProbeX trees' base models: conv weights read as matrices the way a probe reads
them, which weights are layers, attention written by hand equal to torch's, every
module vmap-able over stacked copies, and the pre-training stage through its CLI
(file rebuilt from itself alone, resume, bad input)."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap

from repro.core.data import write_image_dataset
from repro.core.errors import ReproInputError
from repro.core.io import read_json
from repro.foundation import backbones
from repro.foundation.backbones import (
    Attention,
    build_backbone,
    eligible_layers,
    layer_matrix,
    load_backbone,
)

CONFIG = {"width": 8, "depth": 2, "heads": 2, "patch": 2, "mlp_ratio": 2}


@pytest.fixture(autouse=True)
def no_mlflow(monkeypatch):
    monkeypatch.setenv("REPRO_MLFLOW", "0")


def test_layer_matrix_flattens_a_conv_as_out_by_in_kh_kw():
    weight = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2)
    matrix = layer_matrix(weight)
    assert matrix.shape == (2, 12)
    # Column index = channel * (kh*kw) + row * kw + col: column 5 is channel 1, (0, 1).
    assert matrix[1, 5] == weight[1, 1, 0, 1] == 12 + 4 + 1
    assert matrix[0].tolist() == list(range(12))
    linear = torch.randn(4, 3)
    assert torch.equal(layer_matrix(linear), linear)
    with pytest.raises(ValueError):
        layer_matrix(torch.zeros(3))


def test_eligible_layers_are_module_weights_without_the_head():
    vit = eligible_layers(build_backbone("vit", **CONFIG).state_dict())
    assert vit["blocks.1.attn.proj"] == (8, 8)
    assert vit["blocks.0.attn.qkv"] == (24, 8)
    assert vit["blocks.0.fc1"] == (16, 8)
    assert vit["patch_embed"] == (8, 4)  # 1 channel x 2 x 2 patch
    # Not the head, not LayerNorm scales (1-D), not the position embedding (no .weight).
    assert not any(n.startswith(("head", "norm", "pos_embed", "cls_token")) for n in vit)
    assert len(vit) == 1 + 4 * 2
    cnn = eligible_layers(build_backbone("cnn", **CONFIG).state_dict())
    assert cnn == {
        "stem": (8, 9),
        "blocks.0.conv": (8, 72),
        "blocks.0.pointwise": (8, 8),
        "blocks.1.conv": (8, 72),
        "blocks.1.pointwise": (8, 8),
    }
    assert list(cnn) == sorted(cnn)


def test_attention_by_hand_equals_torch_scaled_dot_product():
    torch.manual_seed(0)
    attn = Attention(8, 2)
    x = torch.randn(3, 5, 8)
    q, k, v = attn.qkv(x).split(8, dim=-1)
    heads = [t.view(3, 5, 2, 4).transpose(1, 2) for t in (q, k, v)]
    mixed = F.scaled_dot_product_attention(*heads).transpose(1, 2).reshape(3, 5, 8)
    torch.testing.assert_close(attn(x), attn.proj(mixed), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["vit", "cnn"])
def test_vmap_over_stacked_copies_equals_each_model(arch):
    torch.manual_seed(0)
    models = [build_backbone(arch, **CONFIG) for _ in range(3)]
    params, buffers = stack_module_state(models)
    skeleton = copy.deepcopy(models[0]).to("meta")
    images = torch.randn(3, 4, 1, 8, 8)

    def one(p, b, x):
        return functional_call(skeleton, (p, b), (x,))

    stacked = vmap(one)(params, buffers, images)
    assert stacked.shape == (3, 4, 10)
    for i, model in enumerate(models):
        torch.testing.assert_close(stacked[i], model(images[i]), rtol=1e-5, atol=1e-6)


def test_build_backbone_refuses_bad_config_naming_the_key():
    with pytest.raises(ReproInputError, match=r"probex\.backbone\.heads"):
        build_backbone("vit", **{**CONFIG, "heads": 3})
    with pytest.raises(ReproInputError, match=r"probex\.trees\.arch"):
        build_backbone("resnet", **CONFIG)
    with pytest.raises(ReproInputError, match=r"probex\.backbone.*\['depth'\]"):
        build_backbone("vit", **{k: v for k, v in CONFIG.items() if k != "depth"})
    with pytest.raises(ReproInputError, match=r"probex\.backbone\.width"):
        build_backbone("cnn", **{**CONFIG, "width": 0})


# ----------------------------------------------------------------------------- the stage


@pytest.fixture
def corpus(tmp_path):
    """A glyph corpus of 60 images: class c's images are bright in column c (learnable)."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(60) % 10
    images = torch.rand(60, 1, 8, 8, generator=gen) * 0.2 - 1
    images[torch.arange(60), 0, :, labels % 8] += 1.5 * (labels < 8)[:, None]
    path = tmp_path / "corpus.safetensors"
    captions = [f"a glyph of the digit {c}" for c in labels.tolist()]
    write_image_dataset(
        path, images, labels, "glyphs", {"chars": "0123456789", "num_classes": 10}, captions
    )
    digits = tmp_path / "val.safetensors"
    write_image_dataset(digits, images[:20], labels[:20], "digits", {"num_classes": 10})
    return path, digits


def run_stage(tmp_path, corpus, arch="vit", steps=4, **pretrain):
    path, digits = corpus
    params = {
        "arch": arch,
        "seed": 0,
        "backbone": CONFIG,
        "pretrain": {"steps": steps, "batch_size": 16, "lr": 0.003, "heldout": 20, **pretrain},
    }
    out = tmp_path / f"{arch}.safetensors"
    metrics = tmp_path / f"{arch}.json"
    backbones.main(
        [
            "--corpus",
            str(path),
            "--digits",
            str(digits),
            "--out",
            str(out),
            "--metrics",
            str(metrics),
            "--checkpoint-dir",
            str(tmp_path / "ck"),
            "--params",
            json.dumps(params),
        ]
    )
    return out, read_json(metrics)


@pytest.mark.parametrize("arch", ["vit", "cnn"])
def test_stage_writes_a_base_that_rebuilds_from_the_file_alone(tmp_path, corpus, arch):
    out, metrics = run_stage(tmp_path, corpus, arch)
    assert metrics["steps"] == 4 and metrics["arch"] == arch
    assert 0 <= metrics["heldout_accuracy"] <= 1 and 0 <= metrics["digits_accuracy"] <= 1
    model = load_backbone(out)
    assert type(model).__name__ == {"vit": "TinyViT", "cnn": "TinyCNN"}[arch]
    assert metrics["parameters"] == sum(p.numel() for p in model.parameters())
    # The same seed builds the same init: training moved it.
    torch.manual_seed(0)
    init = build_backbone(arch, **CONFIG)
    moved = [
        not torch.equal(a, b) for a, b in zip(init.parameters(), model.parameters(), strict=True)
    ]
    assert any(moved)


def test_stage_resumes_from_its_checkpoint(tmp_path, corpus):
    out, first = run_stage(tmp_path, corpus, steps=4, checkpoint_every=2)
    weights = load_backbone(out).state_dict()
    out, again = run_stage(tmp_path, corpus, steps=4, checkpoint_every=2)
    assert again["resumed_from"] == 4
    for key, value in load_backbone(out).state_dict().items():
        assert torch.equal(value, weights[key])


def test_stage_refuses_a_missing_corpus_and_a_foreign_base(tmp_path, corpus):
    with pytest.raises(ReproInputError, match="nowhere.safetensors"):
        run_stage(tmp_path, (tmp_path / "nowhere.safetensors", corpus[1]))
    with pytest.raises(ReproInputError, match=r"corpus\.safetensors.*'backbone'"):
        load_backbone(corpus[0])
