"""DataDream's generation stage: N images per class, class-major, seeded; unadapted or
from a LoRA file (cls: each class from its own LoRA); bad LoRA files refused."""

import json
import os

import pytest
import torch
from test_datadream_generator import LORA, PROMPT, save_tiny_t2i

from repro.core.data import load_image_dataset
from repro.core.errors import ReproInputError
from repro.core.io import save_tensors
from repro.datadream import generate
from repro.datadream.generator import GeneratorLora, lora_settings, save_lora

NAMES = ["zero", "one", "two"]
GENERATE = {"guidance": 2.0, "steps": 3, "batch_size": 3}


@pytest.fixture(autouse=True)
def no_mlflow(monkeypatch):
    monkeypatch.setenv("REPRO_MLFLOW", "0")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A saved tiny t2i and LoRA files: cls (one random LoRA per class), dset, and a
    fresh (B = 0) one."""
    from repro.foundation.t2i import load_t2i

    root = tmp_path_factory.mktemp("datadream_generate")
    os.environ["REPRO_MLFLOW"] = "0"
    foundation = save_tiny_t2i(root / "t2i")
    lora = GeneratorLora(load_t2i(foundation), lora_settings(LORA), seed=0)
    fresh = lora.state()

    def random_state(seed):
        g = torch.Generator().manual_seed(seed)
        return {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in fresh.items()}

    common = dict(classes=NAMES, settings=lora.settings, extra_meta={"shots": 4})
    states = {name: random_state(i) for i, name in enumerate(NAMES)}
    save_lora(root / "cls.safetensors", states, variant="cls", **common)
    save_lora(root / "dset.safetensors", {"all": random_state(9)}, variant="dset", **common)
    save_lora(root / "fresh.safetensors", {"all": fresh}, variant="dset", **common)
    return root, foundation, states


def params(foundation, **over):
    """The generate rule's --params: the generate section, n_per_class, seed, prompt,
    class names, foundation."""
    return {
        **GENERATE,
        "n_per_class": 4,
        "seed": 0,
        "prompt": PROMPT,
        "classnames": NAMES,
        "foundation": {"t2i": foundation},
        **over,
    }


def run_generate(workdir, out, lora=None, **over):
    root, foundation, _ = workdir
    argv = [
        "--out",
        str(out / "synthetic.safetensors"),
        "--metrics",
        str(out / "synthetic_metrics.json"),
        "--params",
        json.dumps(params(foundation, **over)),
    ]
    if lora is not None:
        argv += ["--lora", str(root / lora) if isinstance(lora, str) else str(lora)]
    generate.main(argv)
    data = load_image_dataset(out / "synthetic.safetensors", kind=generate.KIND)
    return data, json.loads((out / "synthetic_metrics.json").read_text())


def test_unadapted_set_is_class_major_captioned_and_seeded(workdir, tmp_path):
    data, metrics = run_generate(workdir, tmp_path)
    assert data.images.shape == (12, 1, 8, 8)
    assert data.images.min() >= -1 and data.images.max() <= 1
    assert data.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert data.captions == [PROMPT.format(classname=c) for c in NAMES for _ in range(4)]
    assert {k: data.meta[k] for k in ("generator", "shots", "seed", "n_per_class")} == {
        "generator": "unadapted",
        "shots": 0,
        "seed": 0,
        "n_per_class": 4,
    }
    assert data.meta["guidance"] == 2.0 and data.meta["steps"] == 3
    assert metrics["num_images"] == 12 and metrics["seconds_per_image"] > 0
    # Same seed: the same set (the noise does not depend on the batch size; the float
    # arithmetic of another batch shape may, in the last bits); another seed: another set.
    again, _ = run_generate(workdir, tmp_path / "again", batch_size=4)
    torch.testing.assert_close(again.images, data.images, rtol=0, atol=1e-5)
    other, _ = run_generate(workdir, tmp_path / "other", seed=1)
    assert not torch.equal(other.images, data.images)
    # Every image of a class is its own draw.
    assert (data.images[0] - data.images[1]).abs().max() > 0


def test_a_lora_with_b_zero_generates_the_unadapted_set_exactly(workdir, tmp_path):
    unadapted, _ = run_generate(workdir, tmp_path / "u")
    fresh, _ = run_generate(workdir, tmp_path / "f", lora="fresh.safetensors", shots=4)
    assert torch.equal(fresh.images, unadapted.images)
    assert fresh.meta["generator"] == "dset" and fresh.meta["shots"] == 4


def test_cls_draws_each_class_from_its_own_lora(workdir, tmp_path):
    from repro.foundation.t2i import generate as t2i_generate
    from repro.foundation.t2i import load_t2i

    root, foundation, states = workdir
    data, _ = run_generate(workdir, tmp_path, lora="cls.safetensors", shots=4)
    assert data.meta["generator"] == "cls"
    unadapted, _ = run_generate(workdir, tmp_path / "u")
    lora = GeneratorLora(load_t2i(foundation), lora_settings(LORA), seed=0)
    for label, name in enumerate(NAMES):
        lora.load_state(states[name], name)
        want = t2i_generate(
            lora.t2i,
            [PROMPT.format(classname=name)] * 4,
            guidance=GENERATE["guidance"],
            steps=GENERATE["steps"],
            generator=generate.class_generator(0, label),
            batch_size=GENERATE["batch_size"],
            progress=False,
        )
        got = data.images[data.labels == label]
        assert torch.equal(got, want), name
        assert (got - unadapted.images[unadapted.labels == label]).abs().max() > 0.05


def test_bad_lora_files_are_refused_before_generating(workdir, tmp_path):
    root, _, _ = workdir
    out = tmp_path / "out"
    foreign = tmp_path / "foreign.safetensors"
    save_tensors(foreign, {"images": torch.zeros(1)}, kind="datadream_fewshot")
    with pytest.raises(ReproInputError, match=rf"{foreign}.*datadream_lora"):
        run_generate(workdir, out, lora=foreign)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes((root / "cls.safetensors").read_bytes()[:1000])
    with pytest.raises(ReproInputError, match=str(cut)):
        run_generate(workdir, out, lora=cut)
    with pytest.raises(ReproInputError, match=r"cls\.safetensors.*datadream\.classnames"):
        run_generate(workdir, out, lora="cls.safetensors", classnames=["zero", "one", "nine"])
    with pytest.raises(ReproInputError, match=r"cls\.safetensors.*params\.generator"):
        run_generate(workdir, out, lora="cls.safetensors", generator="dset")
    with pytest.raises(ReproInputError, match=r"datadream\.n_per_class"):
        run_generate(workdir, out, n_per_class=0)
    with pytest.raises(ReproInputError, match=r"datadream\.prompt"):
        run_generate(workdir, out, prompt="a glyph")
    assert not out.exists() or not list(out.iterdir())
