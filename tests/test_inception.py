"""The FID Inception-v3: equal to torch-fidelity's network, and its weights files checked.

The equivalence tests build torch-fidelity's FeatureExtractorInceptionV3 (the network
behind torchmetrics' FID and IS) with random weights, save its own state dict as a .pth,
and run that file through `convert` and `load_inception`: the same path the official
weights take.

torch-fidelity must not be installed into the venv: torchmetrics would then import it,
and its package __init__ imports torchvision, which is absent. `make setup` unpacks it
beside the venv instead (pip install --no-deps --target $VENV/reference/torch-fidelity),
and the tests import the two modules they need from there (or from $REPRO_TORCH_FIDELITY:
that folder or a .whl) without running its __init__. They skip when it is absent.
"""

import importlib
import importlib.util
import os
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from repro.core.errors import ReproInputError
from repro.core.inception import (
    KIND,
    NUM_CLASSES,
    NUM_FEATURES,
    InceptionV3,
    convert,
    fetch,
    load_inception,
    main,
    resize_bilinear_tf1,
    save_inception,
    to_uint8_rgb,
)
from repro.core.io import read_metadata, save_tensors, sha256_file

RTOL = 1e-4  # relative to the largest magnitude of each output


def random_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """Random InceptionV3 weights, batch-norm statistics and fc bias included.

    Non-trivial BN tensors (running_var away from 1 in particular) make eps and the
    order of the BN arithmetic matter, so the comparison would see them.
    """
    g = torch.Generator().manual_seed(seed)
    model = InceptionV3()
    model.init_weights(generator=g)
    state = model.state_dict()
    for key, value in state.items():
        if key.endswith(("bn.weight", "bn.running_var")):
            state[key] = torch.rand(value.shape, generator=g) + 0.5
        elif key.endswith(("bn.bias", "bn.running_mean")):
            state[key] = 0.2 * torch.randn(value.shape, generator=g)
        elif key == "fc.bias":
            state[key] = torch.randn(value.shape, generator=g)
    return state


def random_uint8(n: int, height: int, width: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, height, width), generator=g, dtype=torch.uint8)


def _torch_fidelity_location() -> str | None:
    """The folder holding torch_fidelity/ (or the .whl), if there is one."""
    found = os.environ.get("REPRO_TORCH_FIDELITY")
    candidates = [found] if found else [os.path.join(sys.prefix, "reference", "torch-fidelity")]
    for candidate in candidates:
        if candidate.endswith(".whl") and os.path.isfile(candidate):
            return candidate  # zipimport reads packages inside the wheel
        if os.path.isdir(os.path.join(candidate, "torch_fidelity")):
            return candidate
    spec = importlib.util.find_spec("torch_fidelity")  # installed: locates, runs nothing
    if spec is not None and spec.submodule_search_locations:
        return os.path.dirname(list(spec.submodule_search_locations)[0])
    return None


@pytest.fixture(scope="module")
def fidelity():
    """torch-fidelity's inceptionv3 and interpolation modules, without its __init__."""
    location = _torch_fidelity_location()
    if location is None:
        pytest.skip(
            "torch-fidelity 0.4.0 not found: the equivalence tests need its reference network "
            "(pip install --no-deps --target $VENV/reference/torch-fidelity "
            "torch-fidelity==0.4.0, or set REPRO_TORCH_FIDELITY)"
        )
    before = {k: v for k, v in sys.modules.items() if k.split(".")[0] == "torch_fidelity"}
    for key in before:
        del sys.modules[key]
    package = types.ModuleType("torch_fidelity")  # an empty package: no __init__ runs
    package.__path__ = [os.path.join(location, "torch_fidelity")]
    sys.modules["torch_fidelity"] = package
    try:
        yield types.SimpleNamespace(
            inception=importlib.import_module("torch_fidelity.feature_extractor_inceptionv3"),
            interpolate=importlib.import_module("torch_fidelity.interpolate_compat_tensorflow"),
        )
    finally:
        for key in [k for k in sys.modules if k.split(".")[0] == "torch_fidelity"]:
            del sys.modules[key]
        sys.modules.update(before)


@pytest.fixture(scope="module")
def reference_and_ours(fidelity, tmp_path_factory):
    """torch-fidelity's net with random weights, and ours loaded from its converted .pth."""
    state = random_state_dict(seed=0)
    with pytest.MonkeyPatch.context() as mp:  # its constructor's only weights source
        mp.setattr(fidelity.inception, "load_state_dict_from_url", lambda *a, **k: dict(state))
        reference = fidelity.inception.FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048", "logits_unbiased"]
        )
    tmp = tmp_path_factory.mktemp("inception")
    torch.save(reference.state_dict(), tmp / "fidelity.pth")  # its key names, counters too
    convert(tmp / "fidelity.pth", tmp / "ours.safetensors")
    return reference, load_inception(tmp / "ours.safetensors")


def assert_close(ours: torch.Tensor, reference: torch.Tensor) -> None:
    scale = reference.abs().max()
    assert (ours - reference).abs().max() <= RTOL * scale, (ours - reference).abs().max()


@pytest.mark.parametrize(
    "height, width",
    [(8, 8), (37, 53), (331, 300)],
    ids=["upsample", "non-square", "downsample"],
)
def test_features_and_logits_equal_torch_fidelity(reference_and_ours, height, width):
    reference, ours = reference_and_ours
    images = random_uint8(2, height, width, seed=height)
    with torch.no_grad():
        want_features, want_logits = reference(images)
        features, logits = ours(images)
    assert features.shape == (2, NUM_FEATURES) and logits.shape == (2, NUM_CLASSES)
    assert_close(features, want_features)
    assert_close(logits, want_logits)
    # The outputs tell images apart far beyond the tolerance: the comparison has teeth.
    spread = (want_features[0] - want_features[1]).abs().max()
    assert spread > 100 * RTOL * want_features.abs().max()


def test_logits_are_unbiased():
    """IS uses fc without its bias, as torch-fidelity's and the original IS code do."""
    model = InceptionV3()
    model.load_state_dict(random_state_dict(seed=4))
    features = torch.randn(2, NUM_FEATURES, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.logits(features), features @ model.fc.weight.T)
        assert (model.logits(features) - model.fc(features)).abs().max() > 0.1


@pytest.mark.parametrize("size", [(1, 1), (8, 8), (37, 53), (299, 299), (512, 300)])
def test_resize_is_tensorflow1_bilinear_as_in_torch_fidelity(fidelity, size):
    x = random_uint8(2, *size, seed=1).float()
    want = fidelity.interpolate.interpolate_bilinear_2d_like_tensorflow1x(
        x, size=(299, 299), align_corners=False
    )
    assert torch.equal(resize_bilinear_tf1(x, 299), want)


def test_resize_is_not_torch_interpolate():
    """Why the TF1 resize is written out: F.interpolate samples at half-pixel centres."""
    x = random_uint8(1, 37, 53, seed=2).float()
    ours = resize_bilinear_tf1(x, 299)
    torch_ = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    assert (ours - torch_).abs().max() > 10
    constant = torch.full((1, 1, 5, 7), 3.0)
    assert torch.equal(resize_bilinear_tf1(constant, 299), torch.full((1, 1, 299, 299), 3.0))


def test_shapes_and_grayscale_images():
    torch.manual_seed(0)
    model = InceptionV3().eval()
    grey = torch.rand(2, 1, 16, 12, generator=torch.Generator().manual_seed(3)) * 2 - 1
    rgb = to_uint8_rgb(grey)
    assert rgb.dtype == torch.uint8 and rgb.shape == (2, 3, 16, 12)
    assert torch.equal(rgb[:, 0], rgb[:, 1]) and torch.equal(rgb[:, 0], rgb[:, 2])
    with torch.no_grad():
        features, logits = model(rgb)
        grey_features = model.features(rgb[:, :1])  # uint8 grey goes in as well
    assert features.shape == (2, NUM_FEATURES) and features.dtype == torch.float32
    assert logits.shape == (2, NUM_CLASSES)
    torch.testing.assert_close(grey_features, features, rtol=0, atol=0)
    assert torch.isfinite(logits).all() and features.std() > 0


def test_to_uint8_rgb_quantises_like_saved_samples():
    x = torch.tensor([-1.5, -1.0, -0.999, 0.0, 0.5, 1.0, 2.0]).view(1, 1, 1, 7)
    got = to_uint8_rgb(x)[0, 0, 0].tolist()
    # floor(127.5 x + 128) clamped to [0, 255], as DiT / ADM write their samples.
    assert got == [0, 0, 0, 128, 191, 255, 255]
    with pytest.raises(ValueError, match="NaN"):
        to_uint8_rgb(torch.full((1, 3, 4, 4), float("nan")))
    with pytest.raises(ValueError, match="images"):
        to_uint8_rgb(torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match="uint8"):
        InceptionV3().features(torch.zeros(1, 3, 4, 4))


def test_convert_round_trip(tmp_path):
    state = random_state_dict(seed=1)
    # A .pth as torch-fidelity's module saves it: with BatchNorm's training counters.
    pth_state = dict(state)
    for key in [k for k in state if k.endswith("bn.running_var")]:
        pth_state[key.replace("running_var", "num_batches_tracked")] = torch.tensor(0)
    torch.save(pth_state, tmp_path / "weights.pth")
    main(["convert", "--pth", str(tmp_path / "weights.pth"), "--out", str(tmp_path / "w.st")])
    model = load_inception(tmp_path / "w.st")
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    meta = read_metadata(tmp_path / "w.st")
    assert meta["repro_kind"] == KIND
    assert meta["source_sha256"] == sha256_file(tmp_path / "weights.pth")


def test_convert_refuses_foreign_and_truncated_files(tmp_path):
    state = random_state_dict(seed=2)
    foreign = tmp_path / "foreign.pth"
    torch.save({k: v for k, v in state.items() if not k.startswith("Mixed_7c")}, foreign)
    with pytest.raises(ReproInputError, match=f"{foreign}.*missing"):
        convert(foreign, tmp_path / "out.safetensors")
    misshapen = tmp_path / "misshapen.pth"
    torch.save(
        {**state, "fc.weight": torch.zeros(1000, NUM_FEATURES), "extra": torch.ones(1)}, misshapen
    )
    with pytest.raises(ReproInputError, match=f"{misshapen}.*unexpected.*wrong shapes"):
        convert(misshapen, tmp_path / "out.safetensors")
    good = tmp_path / "good.pth"
    torch.save(state, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ReproInputError, match=str(truncated)):
        convert(truncated, tmp_path / "out.safetensors")
    with pytest.raises(ReproInputError, match=str(tmp_path / "absent.pth")):
        convert(tmp_path / "absent.pth", tmp_path / "out.safetensors")
    # In-process the command raises; `python -m` ends with that one line (repro.core.stage.run).
    with pytest.raises(ReproInputError, match=str(truncated)):
        main(["convert", "--pth", str(truncated), "--out", str(tmp_path / "out.safetensors")])
    assert not (tmp_path / "out.safetensors").exists()


def test_load_inception_refuses_foreign_and_truncated_files(tmp_path):
    state = random_state_dict(seed=3)
    good = tmp_path / "good.safetensors"
    save_inception(good, state)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ReproInputError, match=str(truncated)):
        load_inception(truncated)
    foreign = tmp_path / "foreign.safetensors"
    save_tensors(foreign, state, kind="digit_classifier")
    with pytest.raises(ReproInputError, match=f"{foreign}.*{KIND}"):
        load_inception(foreign)
    misshapen = tmp_path / "misshapen.safetensors"
    save_tensors(misshapen, {**state, "fc.bias": torch.zeros(1000)}, kind=KIND)
    with pytest.raises(ReproInputError, match=f"{misshapen}.*wrong shapes.*fc.bias"):
        load_inception(misshapen)
    with pytest.raises(ReproInputError, match=str(tmp_path / "absent.safetensors")):
        load_inception(tmp_path / "absent.safetensors")


def test_fetch_downloads_checks_the_hash_and_converts(tmp_path):
    state = random_state_dict(seed=4)
    scratch = tmp_path / "scratch.pth"
    torch.save(state, scratch)
    digest = sha256_file(scratch)[:8]
    good = tmp_path / f"weights-inception-2015-12-05-{digest}.pth"
    scratch.rename(good)
    out = tmp_path / "cache" / "inception.safetensors"
    fetch(out, url=good.as_uri())
    loaded = load_inception(out).state_dict()
    for key, value in loaded.items():
        assert torch.equal(value, state[key]), key
    # A file whose content is not what its name promises is refused, and nothing is written.
    wrong = tmp_path / "weights-inception-2015-12-05-00000000.pth"
    wrong.write_bytes(good.read_bytes())
    with pytest.raises(ReproInputError, match="sha256.*does not match"):
        fetch(tmp_path / "other.safetensors", url=wrong.as_uri())
    assert not (tmp_path / "other.safetensors").exists()
    with pytest.raises(ReproInputError, match="download failed"):
        fetch(tmp_path / "other.safetensors", url=(tmp_path / "missing.pth").as_uri())
