"""SLA's image experiment (repro.sla.image, rules sla_image_*): the base DiT, a variant's
fine-tune, its evaluation (FID, attention FLOPs counted by hand) and the table, through
each subcommand's CLI on tiny random 16 x 16 'glyphs'; bad input."""

import json

import pandas as pd
import pytest
import torch

from repro.core.classifier import DigitClassifier, save_classifier
from repro.core.data import write_image_dataset
from repro.core.errors import ReproInputError
from repro.core.io import read_json
from repro.sla import image
from repro.sla import workflow as sla_workflow
from repro.sla.processor import sla_modules

MODEL = {
    "sample_size": 16,
    "patch_size": 1,
    "in_channels": 1,
    "num_layers": 2,
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "num_embeds_ada_norm": 3,
    "seed": 0,
}
TRAIN = {
    "steps": 2,
    "batch_size": 4,
    "lr": 0.01,
    "weight_decay": 0.0,
    "warmup_fraction": 0.0,
    "label_dropout": 0.1,
    "seed": 0,
    "checkpoint_every": 1,
}
PARAMS = {
    "model": MODEL,
    "sampler": {"kind": "ddim", "num_train_timesteps": 1000, "beta_schedule": "linear"},
    "base": TRAIN,
    "finetune": TRAIN,
    "eval": {"per_class": 2, "steps": 2, "guidance": 2.0, "seed": 9},
}
SLA_95 = {"variant": "paper", "k_h": 0.05, "k_l": 0.1, "phi": "softmax", "block_q": 16,
          "block_kv": 16}  # fmt: skip


# No MLflow runs; one torch thread (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("quiet_and_one_thread")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("sla_image")
    gen = torch.Generator().manual_seed(0)
    for split, n in (("train", 12), ("test", 9)):
        images = torch.rand(n, 1, 16, 16, generator=gen) * 2 - 1
        labels = torch.arange(n) % 3
        write_image_dataset(
            root / f"{split}.safetensors", images, labels, "glyphs", {"num_classes": 3}
        )
    save_classifier(root / "classifier.safetensors", DigitClassifier(3, image_size=16))
    return root


def cli(command, *args, params=PARAMS, rule="sla_image"):
    image.main([command, *map(str, args), "--params", json.dumps(params), "--rule", rule,
                "--scale", "smoke"])  # fmt: skip


def test_base_finetune_eval_and_table_through_their_clis(work, tmp_path):
    train = work / "train.safetensors"
    cli("base", "--train", train, "--out", tmp_path / "base", "--metrics", tmp_path / "base.json",
        "--checkpoint-dir", tmp_path / "ckpt")  # fmt: skip
    assert len(read_json(tmp_path / "base.json")["loss_history"]) == TRAIN["steps"]

    finetune = {**PARAMS, "variant": "sla_95", "seed": 1, "settings": SLA_95}
    cli("finetune", "--base", tmp_path / "base", "--train", train, "--out", tmp_path / "ft",
        "--metrics", tmp_path / "ft.json", "--checkpoint-dir", tmp_path / "ckpt",
        params=finetune)  # fmt: skip
    metrics = read_json(tmp_path / "ft.json")
    # 256 tokens in blocks of 16: 16 key blocks, ceil(0.05 * 16) = 1 critical, 1 negligible.
    assert (metrics["key_blocks"], metrics["critical_blocks"]) == (16, 1)
    model, sla = image.load_finetuned_dit(tmp_path / "ft")
    assert sla["name"] == "sla_95" and len(sla_modules(model)) == MODEL["num_layers"]

    cli("eval", "--model", tmp_path / "ft", "--finetune-metrics", tmp_path / "ft.json",
        "--classifier", work / "classifier.safetensors", "--test", work / "test.safetensors",
        "--out", tmp_path / "row.json")  # fmt: skip
    row = read_json(tmp_path / "row.json")
    # By hand, per image: 2 DDIM steps x 2 blocks x 2 CFG halves x 4 H L^2 D.
    dense = 2 * 2 * 2 * 4 * 2 * 256**2 * 16
    assert row["dense_attention_flops"] == dense
    assert row["block_sparsity"] == pytest.approx(15 / 16)
    assert row["flops_reduction"] == pytest.approx(dense / row["attention_flops"])
    assert row["sparsity"] == pytest.approx(0.95) and row["seed"] == 1 and row["fid"] >= 0

    full_row = {**row, "variant": "full", "attention": "full", "seed": 0}
    (tmp_path / "full.json").write_text(json.dumps(full_row))
    cli("table", "--rows", tmp_path / "row.json", tmp_path / "full.json", "--out",
        tmp_path / "t.csv", params={"order": ["full", "sla_95"]})  # fmt: skip
    table = pd.read_csv(tmp_path / "t.csv")
    assert list(table.columns) == image.IMAGE_COLUMNS
    assert list(table.variant) == ["full", "sla_95"]


def test_the_table_refuses_duplicates_and_missing_columns():
    row = {c: 0 for c in image.IMAGE_COLUMNS} | {"variant": "a", "attention": "full"}
    with pytest.raises(ReproInputError, match="two rows for 'a' seed 0"):
        image.build_image_table([row, dict(row)])
    with pytest.raises(ReproInputError, match=r"'a' seed 0: missing \['fid'\]"):
        image.build_image_table([{k: v for k, v in row.items() if k != "fid"}])
    ordered = image.build_image_table(
        [row | {"variant": "z"}, row | {"variant": "b", "seed": 2}, row | {"variant": "b"}],
        order=["b"],
    )
    assert list(zip(ordered.variant, ordered.seed, strict=True)) == [("b", 0), ("b", 2), ("z", 0)]


def test_a_model_without_sla_json_is_refused(tmp_path):
    with pytest.raises(ReproInputError, match="sla.json: missing"):
        image.load_finetuned_dit(tmp_path)


def test_the_image_config_checks_name_their_key():
    import yaml

    from repro.core.config import merge

    base = yaml.safe_load(open("config.yaml"))
    assert sla_workflow.image_checks(base) == []
    bad = merge(base, {"sla": {"image": {"model": {"sample_size": 8}}}})
    assert any("sla.image.model.sample_size: 8" in e for e in sla_workflow.image_checks(bad))
    none = merge(base, {"sla": {"image": {"variants": [{"name": "s", "attention": "paper",
                                                         "k_h": 0.0}]}}})  # fmt: skip
    assert any("sla.image.variants[0] (s): k_h = 0.0 leaves no critical block of the 16" in e
               for e in sla_workflow.image_checks(none))  # fmt: skip
