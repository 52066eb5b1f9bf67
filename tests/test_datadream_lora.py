"""DataDream's generator LoRA stage, run as the rule runs it: DataDream_cls (one LoRA per
class, on that class's shots only) and DataDream_dset, the loss on the shots going
down, resume after a kill, and bad input refused before any training."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_datadream_generator import LORA, PROMPT, save_tiny_t2i

from repro.core.data import load_digit_splits, write_image_dataset
from repro.core.errors import ReproInputError
from repro.datadream import fewshot, lora
from repro.datadream.generator import GeneratorLora, load_lora, lora_settings

NAMES = ["zero", "one", "two"]
SHOTS = 4
TRAIN = dict(
    epochs=30,  # cls: 4 shots per class, 1 step per epoch; dset: 12 shots, 2 steps per epoch
    batch_size=8,
    lr=5e-3,
    weight_decay=0.01,
    warmup_fraction=0.1,
    grad_clip=1.0,
    checkpoint_every=10,
)


@pytest.fixture(autouse=True)
def no_mlflow(monkeypatch):
    monkeypatch.setenv("REPRO_MLFLOW", "0")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A saved tiny t2i and a 4-shot set of three real digit classes."""
    root = tmp_path_factory.mktemp("datadream_lora")
    os.environ["REPRO_MLFLOW"] = "0"
    foundation = save_tiny_t2i(root / "t2i")
    images, labels = load_digit_splits(0, 0.2, 0.2)["train"]
    keep = labels < len(NAMES)
    write_image_dataset(
        root / "train.safetensors", images[keep], labels[keep], "digits", {"num_classes": 3}
    )
    fewshot.main(
        [
            "--train",
            str(root / "train.safetensors"),
            "--out",
            str(root / "fewshot.safetensors"),
            "--params",
            json.dumps({"shots": SHOTS, "seed": 0, "classnames": NAMES}),
        ]
    )
    return root, foundation


def params(model, **over):
    """The lora rule's --params: the lora section, seed, shots, prompt, names, foundation."""
    return {
        **LORA,
        **TRAIN,
        "variants": ["cls", "dset"],
        "seed": 0,
        "shots": SHOTS,
        "prompt": PROMPT,
        "classnames": NAMES,
        "foundation": {"t2i": model},
        **over,
    }


def args(workdir, out, variant, checkpoints, fewshot_file=None, **over):
    root, foundation = workdir
    return [
        "--fewshot",
        str(fewshot_file or root / "fewshot.safetensors"),
        "--variant",
        variant,
        "--out",
        str(out / f"{variant}.safetensors"),
        "--metrics",
        str(out / f"{variant}.json"),
        "--checkpoint-dir",
        str(checkpoints),
        "--params",
        json.dumps(params(foundation, **over)),
    ]


def run_lora(workdir, out, variant, checkpoints=None, **over):
    lora.main(args(workdir, out, variant, checkpoints or out / "ckpt", **over))
    return json.loads((out / f"{variant}.json").read_text())


def test_dset_trains_one_lora_on_all_shots_and_lowers_their_loss(workdir, tmp_path):
    metrics = run_lora(workdir, tmp_path, "dset")
    groups, meta = load_lora(tmp_path / "dset.safetensors")
    assert list(groups) == ["all"] and meta["variant"] == "dset" and meta["classes"] == NAMES
    assert meta["lora"] == lora_settings(LORA) and meta["shots"] == SHOTS
    assert metrics["num_loras"] == 1 and metrics["groups"]["all"]["shots"] == 3 * SHOTS
    # The paired loss on the shots (same noise and timesteps before and after) goes down.
    assert metrics["shot_loss_after"] < 0.95 * metrics["shot_loss_before"]
    assert all(".lora_A." in k or ".lora_B." in k for k in groups["all"])
    assert sum(v.numel() for v in groups["all"].values()) == metrics["trainable_params"]
    assert metrics["lora_layers"]["unet"]["to_q"] == 8
    assert metrics["lora_layers"]["text_encoder"]["out_proj"] == 2
    # Epochs of the 12 shots at batch 8: two steps each (the last batch is partial).
    assert metrics["steps"] == 2 * TRAIN["epochs"] and metrics["seconds_per_step"] > 0
    assert metrics["groups"]["all"]["steps"] == 2 * TRAIN["epochs"]


def test_cls_trains_each_class_on_its_own_shots_from_the_same_init(workdir, tmp_path):
    from repro.datadream.fewshot import load_fewshot
    from repro.foundation.t2i import load_t2i

    root, foundation = workdir
    metrics = run_lora(workdir, tmp_path, "cls")
    groups, meta = load_lora(tmp_path / "cls.safetensors")
    assert list(groups) == NAMES and meta["variant"] == "cls" and metrics["num_loras"] == 3
    # One step per epoch of a class's 4 shots: 3 classes x 30 steps in all.
    assert metrics["steps"] == 3 * TRAIN["epochs"]
    for name in NAMES:
        g = metrics["groups"][name]
        assert g["shots"] == SHOTS and g["shot_loss_after"] < g["shot_loss_before"]
    # Class "one"'s LoRA, retrained here alone on class one's shots with its prompt from
    # the seeded init and its own draw stream, is bit-identical to the stage's.
    shots = load_fewshot(root / "fewshot.safetensors")
    t2i = load_t2i(foundation)
    adapter = GeneratorLora(t2i, lora_settings(LORA), seed=0)
    adapter.load_state(groups["zero"], "zero")  # what the stage's model held before class one
    adapter.reset()
    images = shots.images[shots.labels == 1]
    lora.train_lora(
        adapter,
        images,
        ["a glyph of the digit one"] * SHOTS,
        {**params(foundation), "steps": TRAIN["epochs"]},
        None,
        stream=1 * lora.GROUP_STREAM_STRIDE,
    )
    for key, value in adapter.state().items():
        assert torch.equal(value, groups["one"][key]), key
    assert not torch.equal(
        groups["zero"][next(iter(groups["zero"]))], groups["one"][next(iter(groups["one"]))]
    )


def test_a_finished_run_resumes_without_training_again(workdir, tmp_path):
    """The same job rerun (same outputs, as Snakemake reruns it) resumes its own run."""
    first = run_lora(workdir, tmp_path / "a", "cls", checkpoints=tmp_path / "ckpt")
    a, _ = load_lora(tmp_path / "a" / "cls.safetensors")
    (tmp_path / "a" / "cls.safetensors").unlink()  # Snakemake removes outputs before a rerun
    again = run_lora(workdir, tmp_path / "a", "cls", checkpoints=tmp_path / "ckpt")
    assert first["resumed_from"] == 0 and again["resumed_from"] == TRAIN["epochs"]
    b, _ = load_lora(tmp_path / "a" / "cls.safetensors")
    for name in NAMES:
        assert all(torch.equal(v, b[name][k]) for k, v in a[name].items())
    assert again["final_loss"] == first["final_loss"]


@pytest.mark.parametrize(
    "over,match",
    [
        ({"unet_targets": ["to_q", "proj_qkv"]}, r"datadream\.lora\.unet_targets.*proj_qkv"),
        ({"text_targets": ["q_proj", "query"]}, r"datadream\.lora\.text_targets.*query"),
        ({"classnames": ["zero", "one", "seven"]}, r"fewshot\.safetensors.*datadream\.classnames"),
        ({"prompt": "a glyph of the digit"}, r"datadream\.prompt"),
        ({"prompt": "{classname} " * 20}, r"datadream\.prompt.*tokens"),
        ({"shots": 16}, r"fewshot\.safetensors.*datadream\.shots"),
        ({"rank": 0}, r"datadream\.lora\.rank"),
    ],
)
def test_bad_config_fails_before_training_and_writes_nothing(workdir, tmp_path, over, match):
    with pytest.raises(ReproInputError, match=match):
        run_lora(workdir, tmp_path, "cls", **over)
    assert not list(tmp_path.iterdir())  # no LoRA, no metrics, no checkpoint


def test_bad_files_name_the_file(workdir, tmp_path):
    import shutil

    root, foundation = workdir
    with pytest.raises(ReproInputError, match=r"train\.safetensors.*datadream_fewshot"):
        lora.main(args(workdir, tmp_path, "cls", tmp_path / "ckpt", root / "train.safetensors"))
    broken = tmp_path / "t2i"
    shutil.copytree(foundation["pretrained"], broken)
    weights = next((broken / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:500])
    with pytest.raises(ReproInputError, match=rf"foundation\.t2i.*{broken}"):
        run_lora(
            workdir, tmp_path, "cls", foundation={"t2i": {**foundation, "pretrained": str(broken)}}
        )
    with pytest.raises(ReproInputError, match="--variant"):
        lora.main(args(workdir, tmp_path, "all", tmp_path / "ckpt"))
    assert not list(tmp_path.glob("*.json")) and not (tmp_path / "ckpt").exists()


@pytest.mark.slow
def test_killed_cls_run_resumes_to_the_same_loras(workdir, tmp_path):
    """SIGKILL a real `python -m repro.datadream.lora` in its second class, rerun, compare."""
    over = {"epochs": 40, "checkpoint_every": 5}  # 40 steps per class (4 shots, batch 8)
    run_lora(workdir, tmp_path, "cls", checkpoints=tmp_path / "ckpt_ref", **over)
    reference, _ = load_lora(tmp_path / "cls.safetensors")

    out = tmp_path / "killed"
    out.mkdir()
    checkpoints = out / "ckpt"
    cmd = [
        sys.executable,
        "-m",
        "repro.datadream.lora",
        *args(workdir, out, "cls", checkpoints, **over),
    ]
    env = {**os.environ, "REPRO_MLFLOW": "0"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(checkpoints.glob("*/cls/group_0001/latest")):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(checkpoints.glob("*/cls/group_0001/latest")), "no checkpoint before the deadline"
    assert not (out / "cls.json").exists(), "the run finished before it could be killed"

    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=300)
    resumed = json.loads((out / "cls.json").read_text())
    assert resumed["groups"]["zero"]["resumed_from"] == over["epochs"]  # done before the kill
    assert 0 < resumed["groups"]["one"]["resumed_from"] < over["epochs"]
    weights, _ = load_lora(out / "cls.safetensors")
    for name in NAMES:
        for key, value in reference[name].items():
            assert torch.equal(weights[name][key], value), (name, key)
