"""repro.datadream.model: the CLIP LoRA classifier (peft on q_proj / v_proj of both towers)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from repro.core.errors import ReproInputError
from repro.datadream.evaluate import Selection
from repro.datadream.model import ClipClassifier, LoraWeights, attach_lora

CLASSNAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
PROMPT = "a glyph of the digit {classname}"
LAYERS = {"vision": 2, "text": 2}
# A tiny CLIP of repro.foundation.clip: 8x8x1 images in 2x2 patches, two 2-layer towers.
CLIP_PARAMS = {
    "vision": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": LAYERS["vision"],
        "num_attention_heads": 2,
        "image_size": 8,
        "patch_size": 2,
        "num_channels": 1,
    },
    "text": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": LAYERS["text"],
        "num_attention_heads": 2,
        "max_position_embeddings": 12,
    },
    "vocab_size": 600,
    "projection_dim": 16,
    "seed": 0,
}
LORA = {"rank": 4, "alpha": 8, "dropout": 0.1, "targets": ["q_proj", "v_proj"]}


def prompts() -> list[str]:
    from repro.foundation.clip import class_prompts

    return class_prompts(PROMPT, CLASSNAMES)


def save_tiny_clip(out_dir) -> dict:
    """Build, save and describe a tiny CLIP: returns the params load_clip takes (what
    store.model_params gives a stage for a built foundation model)."""
    from repro.foundation.clip import build_clip, save_clip

    save_clip(build_clip(CLIP_PARAMS, prompts()), out_dir)
    return {"name": "clip", "pretrained": str(out_dir), "subfolder": None, "local_files_only": True}


@pytest.fixture(scope="module")
def clip_params(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


def load(clip_params):
    from repro.foundation.clip import load_clip

    return load_clip(clip_params)


def images(n=6, seed=0):
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_lora_sits_on_q_and_v_of_every_block_of_both_towers(clip_params):
    clip = load(clip_params)
    classifier = ClipClassifier(clip, prompts(), LORA, seed=0)
    wrapped = classifier.lora_modules
    expected = [
        f"{tower}_model.encoder.layers.{i}.self_attn.{proj}"
        for tower in ("vision", "text")
        for i in range(LAYERS[tower])
        for proj in ("q_proj", "v_proj")
    ]
    assert sorted(wrapped) == sorted(expected)  # 2 x (2 + 2) = 8 modules, no others
    # Only the LoRAs train: A (r x 32) and B (32 x r) per wrapped module.
    trainable = classifier.lora_parameters()
    assert all("lora_A" in n or "lora_B" in n for n in trainable)
    assert classifier.trainable_params == len(expected) * 2 * 4 * 32
    assert not clip.model.logit_scale.requires_grad
    frozen = [n for n, p in clip.model.named_parameters() if not p.requires_grad]
    assert "text_projection.weight" in frozen and "visual_projection.weight" in frozen


def test_untrained_lora_is_zero_shot_clip_with_clips_own_logits(clip_params):
    """Before training (B = 0) the classifier's logits are CLIPModel's own
    logits_per_image: logit_scale.exp() x cosine, computed by transformers."""
    reference = load(clip_params)
    classifier = ClipClassifier(load(clip_params), prompts(), LORA, seed=0).eval()
    x = images()
    tokens = reference.tokenize(prompts())
    with torch.no_grad():
        expected = reference.model(
            pixel_values=reference.pixel_values(x), **tokens
        ).logits_per_image
        got = classifier(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    zero_shot = ClipClassifier(load(clip_params), prompts())  # no LoRA at all
    assert zero_shot.trainable_params == 0 and zero_shot.lora_modules == []
    torch.testing.assert_close(zero_shot.eval()(x), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(classifier.predict(x), expected.argmax(1))


def test_a_training_step_moves_only_the_loras_and_changes_the_logits(clip_params):
    classifier = ClipClassifier(load(clip_params), prompts(), LORA, seed=0)
    before = {k: v.clone() for k, v in classifier.model.state_dict().items()}
    x, y = images(16), torch.arange(16) % 10
    with torch.no_grad():
        logits_before = classifier.eval()(x)
    classifier.train()
    opt = torch.optim.AdamW(list(classifier.lora_parameters().values()), lr=1e-2)
    for _ in range(3):
        loss = F.cross_entropy(classifier(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = classifier.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed)
    assert any("text_model" in k for k in changed) and any("vision_model" in k for k in changed)
    with torch.no_grad():
        assert not torch.allclose(classifier.eval()(x), logits_before)


def test_lora_init_is_seeded(clip_params):
    a = ClipClassifier(load(clip_params), prompts(), LORA, seed=3).lora_parameters()
    b = ClipClassifier(load(clip_params), prompts(), LORA, seed=3).lora_parameters()
    c = ClipClassifier(load(clip_params), prompts(), LORA, seed=4).lora_parameters()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if "lora_A" in k)


@pytest.mark.parametrize(
    "change, key",
    [
        ({"targets": ["qkv"]}, "datadream.classifier.targets"),
        ({"targets": ["q_proj", "nope"]}, "datadream.classifier.targets"),
        ({"rank": 0}, "datadream.classifier.rank"),
        ({"dropout": 1.0}, "datadream.classifier.dropout"),
        ({"alpha": -1}, "datadream.classifier.alpha"),
    ],
)
def test_bad_lora_settings_name_the_key(clip_params, change, key):
    with pytest.raises(ReproInputError, match=key):
        attach_lora(load(clip_params).model, {**LORA, **change}, seed=0)


def test_selection_keeps_the_earliest_best_epoch_and_restores_it():
    p = torch.nn.Parameter(torch.zeros(3))
    selection = Selection({"w": p}, epochs=4)
    for epoch, (value, acc) in enumerate([(1.0, 0.5), (2.0, 0.7), (3.0, 0.7), (4.0, 0.6)], 1):
        with torch.no_grad():
            p.fill_(value)
        selection.record(epoch, acc)
    assert int(selection.best_epoch) == 2  # epoch 3 ties epoch 2: the earlier stays
    assert selection.val_acc.tolist() == [0.5, 0.7, 0.7, 0.6]
    selection.restore()
    assert p.tolist() == [2.0, 2.0, 2.0]
    # Its state (what a checkpoint saves) carries history, choice and weights.
    fresh_p = torch.nn.Parameter(torch.zeros(3))
    fresh = Selection({"w": fresh_p}, epochs=4)
    fresh.load_state_dict(selection.state_dict())
    fresh.restore()
    assert fresh_p.tolist() == [2.0, 2.0, 2.0] and int(fresh.best_epoch) == 2
    with pytest.raises(RuntimeError):
        Selection({"w": p}, epochs=2).restore()


def test_lora_weights_module_shares_the_parameters():
    p = torch.nn.Parameter(torch.zeros(2))
    module = LoraWeights({"a.b.lora_A": p})
    module.load_state_dict({"weights.a__b__lora_A": torch.ones(2)})
    assert p.tolist() == [1.0, 1.0]
