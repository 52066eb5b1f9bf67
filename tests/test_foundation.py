"""Foundation models: one config key per model; built at tiny scale, loaded from the hub at
paper scale, by the same loader.

The model is a tiny diffusers DiTTransformer2DModel saved here: as the pipeline builds
it (save_foundation), as a local directory with a subfolder, and in huggingface_hub's
cache layout (what hub_fetch leaves behind), loaded with every socket refused.
"""

import socket
from pathlib import Path

import pytest
import torch
from diffusers import DiTTransformer2DModel

from repro.core.config import load_yaml, merge, validate_config
from repro.core.errors import ReproInputError
from repro.core.modelio import save_model
from repro.foundation import store

ROOT = Path(__file__).resolve().parents[1]
HUB_ID, COMMIT = "org/tiny-t2i", "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def model(tiny_dit):
    return tiny_dit(seed=0, num_layers=1)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(self, *args, **kwargs):
        raise OSError("network access in a test that must read local files only")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def config(t2i, hub=None):
    """The tiny config with foundation.t2i replaced by `t2i` (the other entries kept)."""
    cfg = merge(load_yaml(ROOT / "config.yaml"), {"hub": hub or {}})
    cfg["foundation"] = {**cfg["foundation"], "t2i": t2i}
    validate_config(cfg)  # every case here is a valid config
    return cfg


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ----------------------------------------------------------------------------- the rule side


def test_input_is_the_built_directory_when_pretrained_is_null():
    cfg = config({"pretrained": None})
    assert store.is_built(cfg, "t2i")
    assert store.model_input(cfg, "t2i") == ["models/foundation/t2i"]
    assert store.model_params(cfg, "t2i") == {
        "name": "t2i",
        "pretrained": "models/foundation/t2i",
        "subfolder": None,
        "local_files_only": True,
    }


def test_input_is_the_hub_manifest_when_pretrained_is_a_hub_id():
    cfg = config(
        {"pretrained": HUB_ID, "subfolder": "transformer"},
        hub={"cache_dir": "/shared/hub", "offline": True},
    )
    assert not store.is_built(cfg, "t2i")
    assert store.model_input(cfg, "t2i") == ["models/hub/manifest.json"]
    assert store.model_params(cfg, "t2i") == {
        "name": "t2i",
        "pretrained": HUB_ID,
        "subfolder": "transformer",
        "cache_dir": "/shared/hub",
        "local_files_only": True,
    }


def test_input_is_the_directory_when_pretrained_is_a_local_path(tmp_path):
    cfg = config({"pretrained": str(tmp_path)})
    assert store.model_input(cfg, "t2i") == [str(tmp_path)]
    assert store.model_params(cfg, "t2i")["local_files_only"] is True


def test_an_unknown_model_is_named():
    with pytest.raises(ReproInputError, match=r"foundation.wan: no such foundation model"):
        store.model_input(config({"pretrained": None}), "wan")


# ----------------------------------------------------------------------------- the stage side


def test_a_built_model_loads_from_its_directory(model, tmp_path, no_network):
    out = tmp_path / "models/foundation/t2i"
    store.save_foundation(model, "t2i", out)
    params = {**store.model_params(config({"pretrained": None}), "t2i"), "pretrained": str(out)}
    loaded = store.load_foundation(DiTTransformer2DModel, params)
    assert same_weights(loaded, model) and not loaded.training


def test_a_local_directory_with_a_subfolder_loads(model, tmp_path, no_network):
    """A pipeline-like directory (paper scale, a local path): the component is its subfolder."""
    model.save_pretrained(tmp_path / "sd" / "transformer", safe_serialization=True)
    params = store.model_params(config({"pretrained": str(tmp_path / "sd")}), "t2i")
    loaded = store.load_foundation(DiTTransformer2DModel, params, component="transformer")
    assert same_weights(loaded, model)
    with pytest.raises(ReproInputError, match=r"foundation.t2i: .*sd \(subfolder unet\)"):
        store.load_foundation(DiTTransformer2DModel, params, component="unet")


def test_a_hub_checkpoint_loads_from_the_cache_alone(model, tmp_path, no_network):
    """huggingface_hub's cache layout, as hub_fetch leaves it; subfolder from the config."""
    cache = tmp_path / "hub-cache"
    repo = cache / ("models--" + HUB_ID.replace("/", "--"))
    model.save_pretrained(repo / "snapshots" / COMMIT / "transformer", safe_serialization=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    cfg = config(
        {"pretrained": HUB_ID, "subfolder": "transformer"},
        hub={"cache_dir": str(cache), "offline": True},
    )
    loaded = store.load_foundation(DiTTransformer2DModel, store.model_params(cfg, "t2i"))
    assert same_weights(loaded, model)
    # Not in the cache: an error naming the config key, and still no network.
    cfg = config(
        {"pretrained": "org/missing", "subfolder": "transformer"},
        hub={"cache_dir": str(cache), "offline": True},
    )
    with pytest.raises(ReproInputError, match=r"foundation.t2i: org/missing"):
        store.load_foundation(DiTTransformer2DModel, store.model_params(cfg, "t2i"))


def test_a_directory_built_for_another_model_is_refused(model, tmp_path):
    save_model(model, tmp_path / "dit", kind="dit")
    params = {"name": "t2i", "pretrained": str(tmp_path / "dit"), "local_files_only": True}
    with pytest.raises(ReproInputError, match=r"foundation.t2i: .*holds a 'dit' model"):
        store.load_foundation(DiTTransformer2DModel, params)
