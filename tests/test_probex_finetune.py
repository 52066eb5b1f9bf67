"""A tree's zoo trained all at once: the batched (vmapped) fine-tunes equal the same
models trained one by one with torch.optim.Adam on the same batches; each model sees
only its own classes; a killed run resumes to the same weights; the stage through its
CLI writes a zoo that repro.probex.zoo reads; bad config is refused naming the key."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from repro.core.data import write_image_dataset
from repro.core.errors import ReproInputError
from repro.core.io import read_json, read_metadata
from repro.foundation.backbones import build_backbone, save_backbone
from repro.probex import finetune
from repro.probex.finetune import (
    Batches,
    FinetuneConfig,
    draw_configs,
    initial_models,
    lr_factor,
    own_class_accuracy,
    train_stacked,
)
from repro.probex.zoo import load_base_state, load_layer, load_states, load_zoo

CONFIG = {"width": 8, "depth": 1, "heads": 2, "patch": 2, "mlp_ratio": 2}
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture(autouse=True)
def no_mlflow(monkeypatch):
    monkeypatch.setenv("REPRO_MLFLOW", "0")


def params(**zoo):
    return {
        "tree": "vit_a",
        "seed": 0,
        "subset_size": 3,
        "num_classes": 10,
        "classnames": NAMES,
        "layer": "blocks.0.attn.proj",
        "zoo": {
            "models_per_tree": 6,
            "split": {"val": 0.2, "test": 0.2},
            "lr": [0.001, 0.01],
            "epochs": [1, 3],
            "schedules": ["constant", "cosine"],
            "batch_size": 4,
            **zoo,
        },
    }


def digits(n=80, seed=0):
    """n images, 8 per class; class c is bright in column c % 8 (learnable)."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    images = torch.rand(n, 1, 8, 8, generator=gen) - 1
    images[torch.arange(n), 0, :, labels % 8] += 1.0
    return images, labels


def test_draw_configs_is_seeded_and_within_the_ranges():
    configs = draw_configs(params(models_per_tree=40))
    assert configs == draw_configs(params(models_per_tree=40))
    assert all(len(c.labels) == 3 and c.labels == sorted(set(c.labels)) for c in configs)
    assert all(0.001 <= c.lr <= 0.01 and 1 <= c.epochs <= 3 for c in configs)
    assert {c.schedule for c in configs} == {"constant", "cosine"}
    assert {c.epochs for c in configs} == {1, 2, 3}
    assert [c.split for c in configs].count("test") == 8
    # One head init for the whole tree by default; per model on request; the base's.
    assert len({c.head_seed for c in configs}) == 1
    per_model = draw_configs(params(models_per_tree=40, head="per_model"))
    assert len({c.head_seed for c in per_model}) == 40
    base_head = draw_configs(params(head="base"))
    assert {c.head_seed for c in base_head} == {None}
    torch.manual_seed(0)
    base = build_backbone("vit", **CONFIG)
    kept = initial_models(base, base_head[:1])[0].head
    fresh = initial_models(base, configs[:2])
    assert torch.equal(kept.weight, base.head.weight)
    assert torch.equal(fresh[0].head.weight, fresh[1].head.weight)
    assert not torch.equal(fresh[0].head.weight, base.head.weight)
    assert torch.equal(fresh[0].blocks[0].fc1.weight, base.blocks[0].fc1.weight)
    other = draw_configs({**params(models_per_tree=40), "seed": 1})
    assert [c.labels for c in other] != [c.labels for c in configs]


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("schedules", ["step"], r"probex\.zoo\.schedules"),
        ("lr", [0.01, 0.001], r"probex\.zoo\.lr"),
        ("epochs", [1.5, 2], r"probex\.zoo\.epochs"),
        ("head", "random", r"probex\.zoo\.head"),
        ("models_per_tree", 1, r"probex\.zoo\.models_per_tree"),
        ("split", {"val": 0.5, "test": 0.5}, r"probex\.zoo\.split"),
    ],
)
def test_bad_zoo_config_is_refused_naming_the_key(key, value, match):
    with pytest.raises(ReproInputError, match=match):
        draw_configs(params(**{key: value}))


def test_lr_factor_by_hand():
    assert lr_factor("constant", 7, 10) == 1.0
    assert lr_factor("cosine", 0, 10) == 1.0
    assert lr_factor("cosine", 5, 10) == pytest.approx(0.5)
    assert lr_factor("cosine", 10, 10) == pytest.approx(0.0)
    assert lr_factor("linear", 3, 4) == pytest.approx(0.25)


def test_each_model_draws_drop_last_epochs_of_its_own_classes():
    _, labels = digits()
    configs = [
        FinetuneConfig(0, [1, 2, 3], 0.01, 2, "constant", "train", 5, None),
        FinetuneConfig(1, [0, 9], 0.01, 1, "constant", "train", 6, None),
    ]
    batches = Batches(labels, configs, batch_size=5)
    assert batches.steps_per_epoch == [24 // 5, 16 // 5] and batches.total_steps == [8, 3]
    for model, config in enumerate(configs):
        for epoch in range(config.epochs):
            spe = batches.steps_per_epoch[model]
            seen = torch.cat([batches.indices(model, epoch * spe + s) for s in range(spe)])
            assert len(set(seen.tolist())) == len(seen) == spe * 5  # no image twice an epoch
            assert set(labels[seen].tolist()) <= set(config.labels)
    first, second = batches.indices(0, 0), batches.indices(0, 4)  # epochs 0 and 1
    assert not torch.equal(first, second)
    with pytest.raises(ReproInputError, match=r"probex\.zoo\.batch_size"):
        Batches(labels, configs, batch_size=17)


def train_one_by_one(base, configs, images, labels, batch_size, num_classes):
    """The reference: each model alone, torch.optim.Adam, its lr set every step."""
    batches = Batches(labels, configs, batch_size)
    trained = []
    for i, (model, config) in enumerate(zip(initial_models(base, configs), configs, strict=True)):
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
        total = batches.total_steps[i]
        others = [c for c in range(num_classes) if c not in config.labels]
        for step in range(total):
            if config.schedule == "cosine":
                factor = 0.5 * (1 + math.cos(math.pi * step / total))
            else:
                factor = 1.0
            optimizer.param_groups[0]["lr"] = config.lr * factor
            idx = batches.indices(i, step)
            logits = model(images[idx])
            logits[:, others] = float("-inf")
            loss = F.cross_entropy(logits, labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        trained.append(model.state_dict())
    return trained


@pytest.mark.parametrize("arch", ["vit", "cnn"])
def test_batched_training_equals_one_by_one(arch):
    torch.manual_seed(0)
    base = build_backbone(arch, **CONFIG)
    images, labels = digits()
    configs = [
        FinetuneConfig(0, [0, 1, 2], 0.01, 2, "cosine", "train", 11, 99),
        FinetuneConfig(1, [3, 5, 7], 0.003, 1, "constant", "val", 12, 99),  # stops early
        FinetuneConfig(2, [2, 4, 9], 0.02, 3, "cosine", "test", 13, 98),
    ]
    weights, summary = train_stacked(base, configs, images, labels, batch_size=6, num_classes=10)
    assert summary["steps"] == max(summary["model_steps"]) == 3 * (24 // 6)
    reference = train_one_by_one(base, configs, images, labels, 6, 10)
    for i, state in enumerate(reference):
        for key, value in state.items():
            got = weights[key][i]
            if key.endswith("attn.qkv.bias"):
                # The keys' bias adds a constant to every score of a query: softmax ignores
                # it, its gradient is rounding noise (~1e-10) that Adam scales up to lr-
                # sized steps of arbitrary sign. Compared: the queries' and values' bias.
                width = CONFIG["width"]
                got, value = (
                    torch.cat([got[:width], got[2 * width :]]),
                    torch.cat([value[:width], value[2 * width :]]),
                )
            torch.testing.assert_close(got, value, rtol=1e-4, atol=2e-5, msg=key)
    # The model with the shortest run was moved, then left alone.
    assert not torch.equal(weights["head.weight"][1], initial_models(base, configs)[1].head.weight)


def test_own_class_accuracy_by_hand():
    torch.manual_seed(0)
    base = build_backbone("vit", **CONFIG)
    images, labels = digits(30)
    configs = [
        FinetuneConfig(0, [0, 1, 2], 0.01, 1, "constant", "train", 1, 7),
        FinetuneConfig(1, [5, 6], 0.01, 1, "constant", "train", 2, 8),
    ]
    models = initial_models(base, configs)
    weights = {k: torch.stack([m.state_dict()[k] for m in models]) for k in base.state_dict()}
    accuracy = own_class_accuracy(base, weights, configs, images, labels, 10)
    for model, config, value in zip(models, configs, accuracy, strict=True):
        own = torch.isin(labels, torch.tensor(config.labels))
        logits = model(images[own])[:, config.labels]
        predicted = torch.tensor(config.labels)[logits.argmax(-1)]
        assert value == pytest.approx((predicted == labels[own]).float().mean().item())


def test_a_killed_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    torch.manual_seed(0)
    base = build_backbone("vit", **CONFIG)
    images, labels = digits()
    configs = draw_configs(params(models_per_tree=3))
    kwargs = dict(batch_size=6, num_classes=10, checkpoint_every=3)
    whole, _ = train_stacked(base, configs, images, labels, **kwargs)

    real = finetune.lr_factor

    def killed_at_step_5(schedule, step, total):
        if step == 5:
            raise KeyboardInterrupt
        return real(schedule, step, total)

    monkeypatch.setattr(finetune, "lr_factor", killed_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train_stacked(base, configs, images, labels, checkpoint_dir=tmp_path, **kwargs)
    monkeypatch.setattr(finetune, "lr_factor", real)
    resumed, summary = train_stacked(
        base, configs, images, labels, checkpoint_dir=tmp_path, **kwargs
    )
    assert summary["resumed_from"] == 3
    for key, value in whole.items():
        assert torch.equal(resumed[key], value), key


# ----------------------------------------------------------------------------- the stage


@pytest.fixture
def inputs(tmp_path):
    torch.manual_seed(0)
    base = tmp_path / "base.safetensors"
    save_backbone(build_backbone("vit", **CONFIG), base, "vit", CONFIG)
    paths = {}
    for split, seed in (("train", 0), ("val", 1)):
        images, labels = digits(80 if split == "train" else 40, seed)
        paths[split] = tmp_path / f"{split}.safetensors"
        write_image_dataset(paths[split], images, labels, "digits", {"num_classes": 10})
    return base, paths["train"], paths["val"]


def run_stage(tmp_path, inputs, **overrides):
    base, train, val = inputs
    out, metrics = tmp_path / "zoo", tmp_path / "zoo.json"
    finetune.main(
        [
            "--base",
            str(base),
            "--train",
            str(train),
            "--val",
            str(val),
            "--out",
            str(out),
            "--metrics",
            str(metrics),
            "--checkpoint-dir",
            str(tmp_path / "ck"),
            "--params",
            json.dumps({**params(), **overrides}),
        ]
    )
    return out, read_json(metrics)


def test_stage_writes_a_zoo_the_loaders_read(tmp_path, inputs):
    out, metrics = run_stage(tmp_path, inputs)
    zoo = load_zoo(out / "manifest.json")
    assert metrics["models"] == len(zoo.models) == 6
    assert (metrics["models_train"], metrics["models_val"], metrics["models_test"]) == (4, 1, 1)
    assert (
        zoo.base.resolve() == inputs[0].resolve() and zoo.arch == "vit" and zoo.classnames == NAMES
    )
    configs = draw_configs(params())
    assert [m["labels"] for m in zoo.models] == [c.labels for c in configs]
    assert [m["split"] for m in zoo.models] == [c.split for c in configs]
    X, Y, splits = load_layer(zoo, "blocks.0.attn.proj")
    assert X.shape == (6, 8, 8) and Y.sum(1).tolist() == [3.0] * 6
    assert all(0 <= m["val_accuracy"] <= 1 for m in zoo.models)
    assert metrics["val_accuracy_min"] == min(m["val_accuracy"] for m in zoo.models)
    # The file's metadata carries Model-J's key; every model moved away from the base.
    meta = read_metadata(zoo.path(zoo.models[0]))
    assert meta["dataset_chosen_targets"] == configs[0].labels and meta["tree"] == "vit_a"
    base = load_base_state(zoo)
    for state in load_states(zoo):
        assert set(state) == set(base)
        assert not torch.equal(
            state["blocks.0.attn.proj.weight"], base["blocks.0.attn.proj.weight"]
        )
    # A rerun finds the finished run's checkpoint and trains no step again.
    _, again = run_stage(tmp_path, inputs)
    assert again["resumed_from"] == again["steps"] == metrics["steps"]
    assert load_layer(load_zoo(out / "manifest.json"), "blocks.0.attn.proj")[0].equal(X)


def test_stage_refuses_a_layer_the_base_lacks_and_a_wrong_class_count(tmp_path, inputs):
    with pytest.raises(ReproInputError, match=r"probex\.trees\.layer: 'blocks\.3\.attn\.proj'"):
        run_stage(tmp_path, inputs, layer="blocks.3.attn.proj")
    with pytest.raises(ReproInputError, match=r"probex\.classnames"):
        run_stage(tmp_path, inputs, classnames=NAMES[:4])
    assert not (tmp_path / "zoo").exists()
