"""The CLIP foundation model: built tiny, trained contrastively, saved and loaded in the
hub's CLIP layout; the paper-scale path (3 channels, its own image normalisation, the
hub cache) on a tiny CLIPModel saved here, with every socket refused.
"""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from repro.core.config import load_yaml, merge
from repro.core.data import DIGIT_NAMES, render_glyphs, write_image_dataset
from repro.core.errors import ReproInputError
from repro.core.modelio import KIND_FILE, save_model
from repro.foundation import clip as clip_module
from repro.foundation import store
from repro.foundation.clip import (
    build_clip,
    class_prompts,
    contrastive_loss,
    load_clip,
    save_clip,
    zero_shot_predict,
)
from repro.foundation.corpus import generic_caption

ROOT = Path(__file__).resolve().parents[1]
HUB_ID, COMMIT = "org/tiny-clip", "0123456789abcdef0123456789abcdef01234567"
CHARS = "0123456789"

TOWER = {
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
}
PARAMS = {
    "pretrained": None,
    "subfolder": None,
    "vocab_size": 600,
    "projection_dim": 16,
    "vision": {**TOWER, "image_size": 8, "patch_size": 2, "num_channels": 1},
    "text": {**TOWER, "max_position_embeddings": 16},
    "generic_fraction": 0.3,
    "steps": 6,
    "batch_size": 16,
    "lr": 0.002,
    "weight_decay": 0.0,
    "warmup_fraction": 0.1,
    "grad_clip": 1.0,
    "checkpoint_every": 3,
    "seed": 0,
    "heldout": 20,
}


@pytest.fixture(autouse=True)
def no_mlflow(monkeypatch):
    monkeypatch.setenv("REPRO_MLFLOW", "0")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and on a shared, busy machine
    two spinning threads can slow a test down tenfold (measured here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(self, *args, **kwargs):
        raise OSError("network access in a test that must read local files only")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture(scope="module")
def glyphs():
    return render_glyphs(80, seed=0, chars=CHARS)


@pytest.fixture(scope="module")
def captions(glyphs):
    return glyphs.captions + [generic_caption(ch) for ch in CHARS]


@pytest.fixture
def clip(captions):
    return build_clip(PARAMS, captions)


@pytest.fixture(scope="module")
def files(tmp_path_factory, glyphs):
    root = tmp_path_factory.mktemp("clip-data")
    meta = {"chars": CHARS, "num_classes": len(CHARS)}
    write_image_dataset(
        root / "corpus.safetensors", glyphs.images, glyphs.labels, "glyphs", meta, glyphs.captions
    )
    digits = render_glyphs(30, seed=5, chars=CHARS)  # stands in for the real digits' val split
    write_image_dataset(root / "val.safetensors", digits.images, digits.labels, "digits")
    return root


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def params_of(path):
    return {"name": "clip", "pretrained": str(path), "subfolder": None, "local_files_only": True}


# ----------------------------------------------------------------------------- the model


def test_the_tiny_clip_sees_17_tokens_and_embeds_on_the_sphere(clip):
    vision = clip.model.config.vision_config
    assert (vision.image_size // vision.patch_size) ** 2 + 1 == 17
    assert clip.model.config.text_config.eos_token_id == clip.tokenizer.eos_token_id
    images = torch.rand(3, 1, 8, 8) * 2 - 1
    image = clip.encode_images(images)
    text = clip.encode_text(["a glyph of the digit one", "", "a bold serif glyph of the digit two"])
    assert image.shape == (3, 16) and text.shape == (3, 16)
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(3))
    assert image.requires_grad and text.requires_grad
    # CLIP's initial temperature: exp(log(1 / 0.07)).
    assert math.isclose(float(clip.logit_scale), 1 / 0.07, rel_tol=1e-4)


def test_pixel_values_resize_repeat_and_normalise(clip):
    clip.image_mean, clip.image_std = (0.25,), (0.5,)
    images = torch.tensor([-1.0, 0.0, 1.0]).view(1, 1, 1, 3).expand(1, 1, 8, 3)
    images = torch.cat([images, images, images[..., :2]], dim=-1)  # 8x8
    values = clip.pixel_values(images)
    # [-1, 1] -> [0, 1] -> (x - 0.25) / 0.5
    torch.testing.assert_close(values[0, 0, 0, :3], torch.tensor([-0.5, 0.5, 1.5]))
    big = clip.pixel_values(torch.ones(2, 1, 32, 32))
    assert big.shape == (2, 1, 8, 8) and torch.allclose(big, torch.full_like(big, 1.5))


def test_contrastive_loss_with_the_class_aware_target(clip):
    """The loss by hand: a row's target is uniform over the columns with its caption."""
    images = torch.rand(4, 1, 8, 8) * 2 - 1
    captions = ["a glyph of the digit one", "a glyph of the digit two"] * 2
    with torch.no_grad():
        loss = contrastive_loss(clip, images, captions)
        logits = clip.logit_scale * clip.encode_images(images) @ clip.encode_text(captions).T
    same = torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1]]) / 2
    by_hand = 0.5 * (
        -(same * logits.log_softmax(1)).sum(1).mean()
        - (same * logits.T.log_softmax(1)).sum(1).mean()
    )
    torch.testing.assert_close(loss, by_hand)
    # Distinct captions: CLIP's own loss (one-hot on the diagonal).
    distinct = [f"a glyph of the digit {n}" for n in DIGIT_NAMES[:4]]
    with torch.no_grad():
        loss = contrastive_loss(clip, images, distinct)
        logits = clip.logit_scale * clip.encode_images(images) @ clip.encode_text(distinct).T
    labels = torch.arange(4)
    clip_loss = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    torch.testing.assert_close(loss, clip_loss)


def test_class_prompts_and_zero_shot(clip):
    assert class_prompts("a glyph of the digit {classname}", ["one", "two"]) == [
        "a glyph of the digit one",
        "a glyph of the digit two",
    ]
    with pytest.raises(ReproInputError, match=r"template 'a \{kind\} of \{classname\}'"):
        class_prompts("a {kind} of {classname}", ["one"])
    images = torch.rand(5, 1, 8, 8) * 2 - 1
    prompts = class_prompts("a glyph of the digit {classname}", list(DIGIT_NAMES))
    with torch.no_grad():
        want = (clip.encode_images(images) @ clip.encode_text(prompts).T).argmax(1)
    assert torch.equal(zero_shot_predict(clip, images, prompts, batch_size=2), want)


# ----------------------------------------------------------------------------- save, load


def test_save_load_round_trip(clip, tmp_path, no_network):
    out = tmp_path / "models/foundation/clip"
    save_clip(clip, out)
    assert json.loads((out / KIND_FILE).read_text())["kind"] == "foundation.clip"
    for name in ("config.json", "model.safetensors", "vocab.json", "merges.txt"):
        assert (out / name).is_file(), name
    processor = json.loads((out / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == [0.5] and processor["crop_size"] == {"height": 8, "width": 8}
    cfg = merge(load_yaml(ROOT / "config.yaml"), {"foundation": {"clip": {"pretrained": None}}})
    loaded = load_clip({**store.model_params(cfg, "clip"), "pretrained": str(out)})
    assert same_weights(loaded.model, clip.model) and not loaded.model.training
    assert loaded.image_mean == (0.5,) and loaded.image_std == (0.5,)
    images = torch.rand(3, 1, 8, 8) * 2 - 1
    prompts = ["a glyph of the digit five", "an italic serif glyph of the digit six"]
    with torch.no_grad():
        assert torch.equal(loaded.encode_images(images), clip.encode_images(images))
        assert torch.equal(loaded.encode_text(prompts), clip.encode_text(prompts))


def test_a_hub_clip_loads_from_the_cache_alone(captions, tmp_path, no_network):
    """openai/clip-vit-base-patch16's layout in miniature: 3 channels, ImageNet-like
    normalisation, 16x16 inputs; only config.json, model.safetensors, vocab.json,
    merges.txt, tokenizer_config.json and preprocessor_config.json, no kind tag."""
    params = {
        **PARAMS,
        "vision": {**PARAMS["vision"], "image_size": 16, "patch_size": 4, "num_channels": 3},
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
    }
    hub_clip = build_clip(params, captions)
    cache = tmp_path / "hub-cache"
    repo = cache / ("models--" + HUB_ID.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    hub_clip.save_pretrained(snapshot)
    (snapshot / "tokenizer.json").unlink()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    cfg = merge(
        load_yaml(ROOT / "config.yaml"),
        {
            "foundation": {"clip": {"pretrained": HUB_ID}},
            "hub": {"cache_dir": str(cache), "offline": True},
        },
    )
    loaded = load_clip(store.model_params(cfg, "clip"))
    assert same_weights(loaded.model, hub_clip.model)
    assert loaded.image_std == tuple(params["image_std"])
    grey = torch.rand(2, 1, 8, 8) * 2 - 1
    values = loaded.pixel_values(grey)
    assert values.shape == (2, 3, 16, 16)
    # Every channel is the same grey image, normalised with its own mean and std.
    x = (F.interpolate(grey, size=(16, 16), mode="bicubic", align_corners=False) + 1) / 2
    for c in range(3):
        want = (x.clamp(0, 1) - params["image_mean"][c]) / params["image_std"][c]
        torch.testing.assert_close(values[:, c : c + 1], want)
    prompts = class_prompts("a glyph of the digit {classname}", list(DIGIT_NAMES))
    assert zero_shot_predict(loaded, grey, prompts).shape == (2,)
    # Not in the cache: an error naming the config key, still no network.
    cfg["foundation"]["clip"]["pretrained"] = "org/missing"
    with pytest.raises(ReproInputError, match=r"foundation.clip: org/missing"):
        load_clip(store.model_params(cfg, "clip"))


def test_bad_directories_are_named(clip, tmp_path, tiny_dit):
    save_model(tiny_dit(seed=0), tmp_path / "dit", kind="dit")
    with pytest.raises(ReproInputError, match=r"foundation.clip: .*dit: holds a 'dit' model"):
        load_clip(params_of(tmp_path / "dit"))
    save_clip(clip, tmp_path / "clip")
    (tmp_path / "clip" / "preprocessor_config.json").unlink()
    with pytest.raises(ReproInputError, match=r"foundation.clip: .*clip: no preprocessor_config"):
        load_clip(params_of(tmp_path / "clip"))
    (tmp_path / "clip" / "model.safetensors").unlink()
    with pytest.raises(ReproInputError, match=rf"foundation.clip: {tmp_path}/clip"):
        load_clip(params_of(tmp_path / "clip"))
    with pytest.raises(ReproInputError, match=r"foundation.clip.image_mean / image_std"):
        build_clip({**PARAMS, "image_mean": [0.5, 0.5]}, ["a glyph"])


# ----------------------------------------------------------------------------- the stage


def stage_args(files, out, params):
    return [
        "--corpus",
        str(files / "corpus.safetensors"),
        "--digits",
        str(files / "val.safetensors"),
        "--out",
        str(out / "clip"),
        "--metrics",
        str(out / "clip.json"),
        "--checkpoint-dir",
        str(out / "ckpt"),
        "--params",
        json.dumps(params),
    ]


def test_the_stage_resumes_an_interrupted_run_to_the_same_model(files, tmp_path, monkeypatch):
    clip_module.main(stage_args(files, tmp_path / "ref", PARAMS))
    reference = json.loads((tmp_path / "ref" / "clip.json").read_text())
    assert reference["steps"] == 6 and reference["train_images"] == 60
    for key in ("zero_shot_heldout_accuracy", "zero_shot_digits_accuracy"):
        assert 0 <= reference[key] <= 1, key

    real, calls = clip_module.contrastive_loss, []

    def dies_at_step_5(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(clip_module, "contrastive_loss", dies_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        clip_module.main(stage_args(files, tmp_path / "run", PARAMS))
    assert not (tmp_path / "run" / "clip").exists()
    monkeypatch.setattr(clip_module, "contrastive_loss", real)
    clip_module.main(stage_args(files, tmp_path / "run", PARAMS))
    resumed = json.loads((tmp_path / "run" / "clip.json").read_text())
    assert resumed["resumed_from"] == 3
    assert resumed["final_loss"] == reference["final_loss"]
    assert resumed["zero_shot_digits_accuracy"] == reference["zero_shot_digits_accuracy"]
    a = load_clip(params_of(tmp_path / "ref" / "clip"))
    b = load_clip(params_of(tmp_path / "run" / "clip"))
    assert same_weights(a.model, b.model)


def test_the_stage_refuses_a_foreign_digits_file_with_one_line(files, tmp_path):
    """The digits file is checked before training: ONE line naming it, status 2."""
    args = stage_args(files, tmp_path, PARAMS)
    args[args.index("--digits") + 1] = str(files / "corpus.safetensors")  # a glyphs file
    proc = subprocess.run(
        [sys.executable, "-m", "repro.foundation.clip", *args],
        env={**os.environ, "REPRO_MLFLOW": "0"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "corpus.safetensors: expected a 'digits' file" in lines[0]
    assert not (tmp_path / "clip").exists() and not (tmp_path / "ckpt").exists()
