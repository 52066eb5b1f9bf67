"""ProbeX's zero-shot classification of models: cosine logits as the official code computes
them, held-out classes never trained on, a zoo whose weights encode the class text
embedding linearly classified zero-shot well above chance (and shuffled labels at
chance), the stage through its CLI with a tiny CLIP, and bad input named."""

import json

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from repro.core.data import DIGIT_NAMES
from repro.core.errors import ReproInputError
from repro.probex import zeroshot
from repro.probex.zoo import assign_splits, load_zoo, write_manifest, write_zoo_model

NAMES = list(DIGIT_NAMES)
LAYER = "blocks.0.attn.to_q"
SHAPE = (6, 5)
TEXT_DIM = 16
SETTINGS = {
    "heldout_classes": 3,
    "layer": LAYER,
    "prompt": "a glyph of the digit {classname}",
    "rank_u": 4,
    "rank_v": 4,
    "rank_t": 16,
    "epochs": 60,
    "lr": 0.01,
    "batch_size": 64,
}


@pytest.fixture(autouse=True)
def no_mlflow(monkeypatch):
    monkeypatch.setenv("REPRO_MLFLOW", "0")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def text_embeddings(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(len(NAMES), TEXT_DIM, generator=gen), dim=-1)


def linear_zoo(root, text, per_class=16, noise=0.05, shuffle=False, labels_per_model=1):
    """A zoo whose model of class c has weight reshape(M t_c) + noise: the class's text
    embedding, linearly encoded (M fixed), plus a nuisance. `shuffle`: labels drawn at
    random instead, so the weights say nothing about them."""
    gen = torch.Generator().manual_seed(1)
    M = torch.randn(SHAPE[0] * SHAPE[1], TEXT_DIM, generator=gen)
    classes = torch.arange(len(NAMES)).repeat_interleave(per_class)
    labels = classes[torch.randperm(len(classes), generator=gen)] if shuffle else classes
    splits = assign_splits(len(classes), 0.2, 0.2, seed=0)
    models = []
    for i, (c, label) in enumerate(zip(classes.tolist(), labels.tolist(), strict=True)):
        weight = (M @ text[c]).view(SHAPE) + noise * torch.randn(SHAPE, generator=gen)
        file = f"models/{i:04d}.safetensors"
        tags = [label] if labels_per_model == 1 else [label, (label + 1) % len(NAMES)]
        write_zoo_model(root / file, {f"{LAYER}.weight": weight}, tags, {"tree": "t"})
        models.append({"file": file, "labels": tags, "split": splits[i]})
    write_manifest(
        root / "manifest.json",
        tree="t2i_lora",
        arch="lora",
        base=None,
        classnames=NAMES,
        layers={LAYER: SHAPE},
        models=models,
    )
    return load_zoo(root / "manifest.json")


def settings(**over):
    return zeroshot.zeroshot_settings({"zeroshot": {**SETTINGS, **over}}, len(NAMES))


def test_logits_are_cosines_of_the_two_projections():
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Flatten(1), nn.Linear(30, 8))
    probe = zeroshot.TextAlignedProbe(encoder, 8, TEXT_DIM)
    x, text = torch.randn(5, *SHAPE), torch.randn(4, TEXT_DIM)
    w = encoder(x)
    t = probe.text(text)
    by_hand = torch.stack(
        [
            torch.stack([torch.dot(w[i], t[k]) / (w[i].norm() * t[k].norm()) for k in range(4)])
            for i in range(5)
        ]
    )
    logits = probe(x, text)
    torch.testing.assert_close(logits, by_hand)
    assert logits.abs().max() <= 1.0 + 1e-6  # raw cosines: the official code's logits
    fixed = zeroshot.TextAlignedProbe(encoder, 8, TEXT_DIM, temperature=0.1)
    fixed.text.load_state_dict(probe.text.state_dict())
    torch.testing.assert_close(fixed(x, text), 10 * by_hand)
    learned = zeroshot.TextAlignedProbe(encoder, 8, TEXT_DIM, temperature="learned")
    assert learned.log_scale.requires_grad


def test_the_probex_encoder_is_probex_without_its_head():
    s = settings()
    encoder = zeroshot.build_encoder("probex", SHAPE, s)
    x = torch.randn(3, *SHAPE)
    torch.testing.assert_close(encoder(x), encoder.encode(x))
    assert encoder(x).shape == (3, s.rank_t)
    dense = zeroshot.build_encoder("dense", SHAPE, s)
    assert dense(x).shape == (3, s.rank_t)
    assert sum(p.numel() for p in dense.parameters()) == (30 + 1) * s.rank_t


def test_heldout_classes_never_reach_training_and_chance_is_one_over_k(tmp_path, monkeypatch):
    text = text_embeddings()
    zoo = linear_zoo(tmp_path, text)
    seen_inputs = []
    original = zeroshot.fit_aligned

    def spy(model, X_train, y_train, X_val, y_val, text_seen, **kwargs):
        seen_inputs.append((X_train, X_val, text_seen))
        return original(model, X_train, y_train, X_val, y_val, text_seen, **kwargs)

    monkeypatch.setattr(zeroshot, "fit_aligned", spy)
    details = {}
    table = zeroshot.run_zeroshot(zoo, text, settings(epochs=3), seed=4, details=details)
    part = details["partition"]
    labels = zeroshot.single_labels(zoo)
    assert part.heldout == zeroshot.draw_heldout(10, 3, 4) and len(part.heldout) == 3
    for split in ("train", "val", "test"):
        assert not set(labels[part.rows[split]].tolist()) & set(part.heldout)
    assert set(labels[part.rows["zeroshot"]].tolist()) == set(part.heldout)
    assert len(part.rows["zeroshot"]) == 3 * 16  # every model of the held-out classes
    # What training saw: only seen-class models, only seen-class texts.
    X_held = torch.stack([zoo_weight(zoo, i) for i in part.rows["zeroshot"].tolist()])
    for X_train, X_val, text_seen in seen_inputs:
        assert len(text_seen) == 7
        for seen in torch.cat([X_train, X_val]):
            ratio = seen / X_held  # standardised by one number: held-out rows are proportional
            assert not any(torch.allclose(r, r.flatten()[0].expand_as(r)) for r in ratio)
        for k in part.heldout:
            assert not any(torch.equal(t, text[k]) for t in text_seen)
    assert list(table.columns) == zeroshot.ROW_COLUMNS
    assert (table["chance"] == 1 / 3).all() and list(table["method"]) == ["probex", "dense"]
    assert (table["n_zeroshot"] == 48).all()
    assert table["heldout"].iloc[0] == "+".join(NAMES[c] for c in part.heldout)


def zoo_weight(zoo, row):
    from repro.probex.zoo import load_state

    return load_state(zoo, zoo.models[row])[f"{LAYER}.weight"]


def test_weights_encoding_the_text_linearly_are_classified_zero_shot(tmp_path):
    text = text_embeddings()
    zoo = linear_zoo(tmp_path, text)
    table = zeroshot.run_zeroshot(zoo, text, settings(), seed=0)
    # The Dense encoder is linear, as the zoo's encoding is: it transfers to unseen
    # classes exactly; ProbeX's ReLU does not, fitted on 7 classes (measured: 2/3).
    for method, floor in (("probex", 0.6), ("dense", 0.9)):
        row = table[table["method"] == method].iloc[0]
        assert row["seen_test_accuracy"] > 0.8, row.to_dict()
        assert row["zeroshot_accuracy"] > floor, row.to_dict()  # chance 1/3


def test_shuffled_labels_give_chance(tmp_path):
    text = text_embeddings()
    zoo = linear_zoo(tmp_path, text, shuffle=True)
    accuracies = []
    for seed in (0, 1):
        table = zeroshot.run_zeroshot(zoo, text, settings(methods=["dense"]), seed=seed)
        accuracies.append(float(table["zeroshot_accuracy"].iloc[0]))
    assert sum(accuracies) / 2 < 0.5, accuracies  # chance 1/3, 48 models per seed


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from repro.foundation.clip import build_clip, class_prompts, save_clip

    root = tmp_path_factory.mktemp("clip")
    tower = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}
    params = {
        "vocab_size": 600,
        "projection_dim": TEXT_DIM,
        "vision": {
            **tower,
            "num_attention_heads": 2,
            "image_size": 8,
            "patch_size": 2,
            "num_channels": 1,
        },
        "text": {**tower, "num_attention_heads": 2, "max_position_embeddings": 16},
        "seed": 0,
    }
    save_clip(build_clip(params, class_prompts(SETTINGS["prompt"], NAMES)), root / "clip")
    return {
        "name": "clip",
        "pretrained": str(root / "clip"),
        "subfolder": None,
        "local_files_only": True,
    }


def stage_args(tmp_path, zoo_dir, clip, **over):
    params = {"seed": 0, "classnames": NAMES, "foundation": {"clip": clip}}
    params["zeroshot"] = {**SETTINGS, "epochs": 5, **over}
    return [
        "--zoo",
        str(zoo_dir / "manifest.json"),
        "--out",
        str(tmp_path / "zeroshot_s0.csv"),
        "--metrics",
        str(tmp_path / "zeroshot_s0.json"),
        "--params",
        json.dumps(params),
    ]


def test_the_stage_writes_one_row_per_method(tmp_path, tiny_clip):
    from repro.foundation.clip import class_prompts, load_clip

    text = zeroshot.text_embeddings(load_clip(tiny_clip), class_prompts(SETTINGS["prompt"], NAMES))
    assert text.shape == (10, TEXT_DIM)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(10))
    linear_zoo(tmp_path / "zoo", text)
    zeroshot.main(stage_args(tmp_path, tmp_path / "zoo", tiny_clip))
    table = pd.read_csv(tmp_path / "zeroshot_s0.csv")
    assert list(table.columns) == zeroshot.ROW_COLUMNS
    assert list(table["method"]) == ["probex", "dense"] and (table["seed"] == 0).all()
    assert (table["layer"] == LAYER).all()
    assert table["chance"].tolist() == pytest.approx([1 / 3, 1 / 3])
    metrics = json.loads((tmp_path / "zeroshot_s0.json").read_text())
    assert metrics["probex/zeroshot_accuracy"] == table["zeroshot_accuracy"].iloc[0]


@pytest.mark.parametrize(
    "over, key",
    [
        ({"layer": "blocks.9.nope"}, "probex.zeroshot.layer"),
        ({"heldout_classes": 10}, "probex.zeroshot.heldout_classes"),
        ({"heldout_classes": 9}, "probex.zeroshot.heldout_classes"),
        ({"prompt": "no field"}, "probex.zeroshot.prompt"),
        ({"temperature": -1}, "probex.zeroshot.temperature"),
        ({"methods": ["statnn"]}, "probex.zeroshot.methods"),
    ],
)
def test_bad_settings_name_their_key(tmp_path, tiny_clip, over, key):
    linear_zoo(tmp_path / "zoo", text_embeddings(), per_class=4)
    with pytest.raises(ReproInputError, match=key):
        zeroshot.main(stage_args(tmp_path, tmp_path / "zoo", tiny_clip, **over))


def test_a_multi_label_zoo_and_other_classnames_are_refused(tmp_path, tiny_clip):
    linear_zoo(tmp_path / "multi", text_embeddings(), per_class=4, labels_per_model=2)
    with pytest.raises(ReproInputError, match="one class per model"):
        zeroshot.main(stage_args(tmp_path, tmp_path / "multi", tiny_clip))
    linear_zoo(tmp_path / "zoo", text_embeddings(), per_class=4)
    args = stage_args(tmp_path, tmp_path / "zoo", tiny_clip)
    params = json.loads(args[-1])
    params["classnames"] = NAMES[::-1]
    with pytest.raises(ReproInputError, match="probex.classnames"):
        zeroshot.main([*args[:-1], json.dumps(params)])
