"""ProbeX's LoRA zoo (the SD_200 analogue): LoRAs of a tiny text-to-image model saved here,
trained all at once, equal to the same LoRA trained alone with peft; the stage through
its CLI writes a zoo that repro.probex.zoo reads, B @ A stored is the product of the
trained factors, a killed run resumes to the same zoo, and bad input names its key."""

import json
import math

import pytest
import torch

from repro.core.data import render_glyphs, write_image_dataset
from repro.core.errors import ReproInputError
from repro.core.io import load_tensors
from repro.foundation.corpus import generic_caption, load_corpus
from repro.probex import lora_zoo
from repro.probex.zoo import load_layer, load_zoo

CHARS = "012"
NAMES = ["zero", "one", "two"]
# A UNet2DConditionModel of 0.2M parameters and a CLIPTextModel of 27k on 8x8x1 pixels:
# the tiny t2i's classes, smaller.
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
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
ZOO = {
    "per_class": 3,
    "images_per_lora": 4,
    "rank": 2,
    "alpha": 4,
    "targets": TARGETS,
    "lr": [0.002, 0.02],
    "steps": [3, 5],
    "batch_size": 2,
    "caption": "generic",
    "split": {"val": 0.2, "test": 0.2},
    "seed": 0,
    "checkpoint_every": 2,
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


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A glyph corpus of three digits and a tiny t2i saved as the pipeline saves them."""
    from repro.foundation.t2i import build_t2i, save_t2i

    root = tmp_path_factory.mktemp("lora_zoo")
    glyphs = render_glyphs(60, seed=0, chars=CHARS)
    corpus = root / "corpus.safetensors"
    meta = {"chars": CHARS, "num_classes": len(CHARS)}
    write_image_dataset(corpus, glyphs.images, glyphs.labels, "glyphs", meta, glyphs.captions)
    captions = glyphs.captions + [generic_caption(ch) for ch in CHARS] + [""]
    save_t2i(build_t2i(TINY_T2I, captions), root / "t2i")
    foundation = {
        "name": "t2i",
        "pretrained": str(root / "t2i"),
        "subfolder": None,
        "local_files_only": True,
    }
    return root, corpus, foundation


def params(foundation, **over):
    return {
        "num_classes": len(NAMES),
        "classnames": NAMES,
        "foundation": {"t2i": foundation},
        "lora_zoo": {**ZOO, **over},
    }


def run_stage(workdir, out, checkpoints=None, **over):
    root, corpus, foundation = workdir
    lora_zoo.main(
        [
            "--corpus",
            str(corpus),
            "--out",
            str(out / "zoo"),
            "--metrics",
            str(out / "zoo.json"),
            "--checkpoint-dir",
            str(checkpoints or out / "ckpt"),
            "--params",
            json.dumps(params(foundation, **over)),
        ]
    )
    return json.loads((out / "zoo.json").read_text())


def test_the_stage_writes_a_zoo_that_the_probe_loaders_read(workdir, tmp_path):
    metrics = run_stage(workdir, tmp_path)
    zoo = load_zoo(tmp_path / "zoo" / "manifest.json")
    assert zoo.tree == "t2i_lora" and zoo.arch == "lora" and zoo.classnames == NAMES
    n = ZOO["per_class"] * len(NAMES)
    assert len(zoo.models) == n == metrics["loras"]
    assert sorted(m["labels"][0] for m in zoo.models) == sorted(list(range(3)) * 3)
    assert set(zoo.splits) == {"train", "val", "test"}
    # Every adapted module: 8 to_q/to_k/to_v/to_out.0 of 4 attention blocks (x2 attn).
    assert len(zoo.layers) == 4 * 2 * len(TARGETS) == metrics["layers"]
    layer = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    assert zoo.layers[layer] == (16, 32)  # out = 16 channels, in = the text width 32
    X, Y, splits = load_layer(zoo, layer)
    assert X.shape == (n, 16, 32) and Y.sum(1).eq(1).all() and splits == zoo.splits
    assert X.abs().sum() > 0  # trained: B moved away from 0
    # Nuisance in range; images of the LoRA's own class.
    corpus = load_corpus(workdir[1], 1)
    all_labels = torch.cat([corpus.labels, corpus.heldout_labels])
    for model in zoo.models:
        assert ZOO["lr"][0] <= model["lr"] <= ZOO["lr"][1]
        assert ZOO["steps"][0] <= model["steps"] <= ZOO["steps"][1]
        assert len(set(model["images"])) == ZOO["images_per_lora"]
        assert set(all_labels[model["images"]].tolist()) == set(model["labels"])
        assert math.isfinite(model["loss_before"]) and math.isfinite(model["loss_after"])


def test_the_stored_weight_is_the_scaled_product_of_the_stored_factors(workdir, tmp_path):
    run_stage(workdir, tmp_path)
    zoo = load_zoo(tmp_path / "zoo" / "manifest.json")
    scale = ZOO["alpha"] / ZOO["rank"]
    tensors, meta = load_tensors(zoo.path(zoo.models[0]), kind="probex_zoo_model")
    assert meta["dataset_chosen_targets"] == zoo.models[0]["labels"]
    for layer, (out, inp) in zoo.layers.items():
        a, b = tensors[f"{layer}.lora_A"], tensors[f"{layer}.lora_B"]
        assert a.shape == (ZOO["rank"], inp) and b.shape == (out, ZOO["rank"])
        torch.testing.assert_close(tensors[f"{layer}.weight"], scale * b @ a)


def trainer_for(t2i, settings, corpus):
    lora = lora_zoo.GroupedLora(t2i.unet, settings.targets, settings.rank, settings.scale)
    t2i.unet.requires_grad_(False)
    x0 = t2i.to_model_space(corpus.images)
    hidden = lora_zoo.caption_states(t2i, corpus.chars, settings.caption)
    return lora, lora_zoo.LoraTrainer(t2i, lora, x0, hidden, settings.batch_size)


def test_batched_training_equals_each_lora_trained_alone_with_peft(workdir):
    """Three LoRAs trained at once (one forward, grouped hooks, stacked Adam) end where
    each ends when trained alone by peft's LoRA layers and torch's Adam on the same
    batches: the grouped update is x A^T B^T * alpha / r per block, nothing leaks."""
    from peft import LoraConfig, inject_adapter_in_model

    from repro.foundation.t2i import load_t2i

    root, corpus_file, foundation = workdir
    corpus = load_corpus(corpus_file, 1)
    settings = lora_zoo.zoo_settings(params(foundation, steps=[2, 4], lr=[0.01, 0.03]))
    specs = lora_zoo.draw_loras(settings, corpus.labels, 3)[::3]  # one LoRA per class
    assert len({s.steps for s in specs}) > 1  # one leaves the batch before the others
    t2i = load_t2i(foundation)
    lora, trainer = trainer_for(t2i, settings, corpus)
    init = lora_zoo.initial_factors(specs, lora.factor_shapes(), settings.rank, init_seed=None)
    batched, summary = lora_zoo.train_loras(trainer, specs, init)
    lora.remove()
    assert summary["steps"] == max(s.steps for s in specs)

    for row, spec in enumerate(specs):
        alone = load_t2i(foundation)
        alone.unet.requires_grad_(False)
        config = LoraConfig(
            r=settings.rank,
            lora_alpha=settings.alpha,
            target_modules=TARGETS,
            lora_dropout=0.0,
            init_lora_weights="gaussian",
        )
        inject_adapter_in_model(config, alone.unet, adapter_name="z")
        factors = {}
        for name in lora.modules:
            module = alone.unet.get_submodule(name)
            a, b = module.lora_A["z"].weight, module.lora_B["z"].weight
            with torch.no_grad():
                a.copy_(init[f"{name}.lora_A"][row])
                b.copy_(init[f"{name}.lora_B"][row])
            factors[f"{name}.lora_A"], factors[f"{name}.lora_B"] = a, b
        optimizer = torch.optim.Adam(list(factors.values()), lr=spec.lr)
        plain = lora_zoo.LoraTrainer(
            alone, lora_zoo.GroupedLora(alone.unet, [], 1, 1.0), trainer.x0, trainer.hidden, 2
        )
        for step in range(spec.steps):
            loss = plain.losses([spec], None, step)[0]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        for key, value in factors.items():
            # Adam divides by sqrt(v): entries of a near-zero gradient carry float noise
            # up to ~lr-sized relative steps, so the tolerance is a small part of lr.
            moved = (value.detach() - init[key][row]).abs().max()
            assert moved > 0.5 * spec.lr  # trained (A and B both move)
            torch.testing.assert_close(
                batched[key][row], value.detach(), rtol=1e-3, atol=0.02 * spec.lr
            )


def test_one_lora_per_forward_gives_the_same_zoo_as_all_at_once(workdir):
    from repro.foundation.t2i import load_t2i

    corpus = load_corpus(workdir[1], 1)
    settings = lora_zoo.zoo_settings(params(workdir[2]))
    specs = lora_zoo.draw_loras(settings, corpus.labels, 3)
    t2i = load_t2i(workdir[2])
    lora, trainer = trainer_for(t2i, settings, corpus)
    init = lora_zoo.initial_factors(specs, lora.factor_shapes(), settings.rank, init_seed=0)
    together, _ = lora_zoo.train_loras(trainer, specs, init)
    apart, _ = lora_zoo.train_loras(trainer, specs, init, chunk=1)
    for key in together:
        torch.testing.assert_close(together[key], apart[key], rtol=1e-3, atol=1e-4)
    # A shared init: every LoRA starts from the same A, B = 0.
    first = next(k for k in init if k.endswith(".lora_A"))
    assert torch.equal(init[first][0], init[first][-1])


def test_a_killed_run_resumes_to_the_same_zoo(workdir, tmp_path, monkeypatch):
    whole = run_stage(workdir, tmp_path / "whole")
    calls = {"n": 0}
    original = lora_zoo.StackedAdam.step

    def dying_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # after the checkpoint of step 2
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(lora_zoo.StackedAdam, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        run_stage(workdir, tmp_path / "resumed", checkpoints=tmp_path / "ckpt")
    monkeypatch.setattr(lora_zoo.StackedAdam, "step", original)
    resumed = run_stage(workdir, tmp_path / "resumed", checkpoints=tmp_path / "ckpt")
    assert resumed["resumed_from"] == 2 and whole["resumed_from"] == 0
    a = load_zoo(tmp_path / "whole" / "zoo" / "manifest.json")
    b = load_zoo(tmp_path / "resumed" / "zoo" / "manifest.json")
    layer = sorted(a.layers)[0]
    torch.testing.assert_close(load_layer(a, layer)[0], load_layer(b, layer)[0])


@pytest.mark.parametrize(
    "over, key",
    [
        ({"targets": ["to_q", "nope"]}, "probex.lora_zoo.targets"),
        ({"caption": "long"}, "probex.lora_zoo.caption"),
        ({"lr": [0.01, 0.001]}, "probex.lora_zoo.lr"),
        ({"steps": [0, 3]}, "probex.lora_zoo.steps"),
        ({"images_per_lora": 10_000}, "probex.lora_zoo.images_per_lora"),
        ({"split": {"val": 0.5}}, "probex.lora_zoo.split"),
        ({"init": "zeros"}, "probex.lora_zoo.init"),
    ],
)
def test_bad_settings_name_their_key(workdir, tmp_path, over, key):
    with pytest.raises(ReproInputError, match=key):
        run_stage(workdir, tmp_path, **over)


def test_a_missing_corpus_and_too_few_classnames_are_named(workdir, tmp_path):
    root, corpus, foundation = workdir
    args = ["--out", str(tmp_path / "z"), "--metrics", str(tmp_path / "m.json")]
    args += ["--checkpoint-dir", str(tmp_path / "c")]
    with pytest.raises(ReproInputError, match="missing.safetensors"):
        lora_zoo.main(
            [*args, "--corpus", str(root / "missing.safetensors")]
            + ["--params", json.dumps(params(foundation))]
        )
    bad = {**params(foundation), "classnames": NAMES[:2]}
    with pytest.raises(ReproInputError, match="probex.classnames"):
        lora_zoo.main([*args, "--corpus", str(corpus), "--params", json.dumps(bad)])
