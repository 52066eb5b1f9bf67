"""FID and Inception Score: exact against a numpy/scipy reference, and sane in the limits."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from repro.core.classifier import DigitClassifier, save_classifier
from repro.core.errors import ReproInputError
from repro.core.metrics import ImageScorer, build_scorer, frechet_distance, inception_score


def numpy_fid(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook Frechet distance of two feature sets (Heusel et al. 2017)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


# A fixed random feature map: images [N, 1, 8, 8] -> 16 smooth features.
_PROJ = torch.randn(64, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def features(x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x.reshape(len(x), -1).double() @ _PROJ / 4)


def images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, 8, 8, generator=g) * 2 - 1).clamp(-1, 1)


@pytest.fixture(scope="module")
def reference():
    return images(1000, seed=0)


def test_fid_of_a_set_with_itself_is_zero(reference):
    scorer = ImageScorer(features, None, reference)
    result = scorer.score(reference)
    assert abs(result["fid"]) < 1e-6
    assert math.isnan(result["inception_score"])


def test_fid_matches_numpy_scipy_reference(reference):
    scorer = ImageScorer(features, None, reference, batch_size=128)
    other = images(700, seed=1) * 0.8 + 0.1
    got = scorer.score(other)["fid"]
    want = numpy_fid(features(reference).numpy(), features(other).numpy())
    assert want > 0.01
    assert got == pytest.approx(want, rel=1e-3)
    # Scoring again (a second fake set) does not leak the first one's statistics.
    third = images(500, seed=2)
    want3 = numpy_fid(features(reference).numpy(), features(third).numpy())
    assert scorer.score(third)["fid"] == pytest.approx(want3, rel=1e-3)
    assert scorer.score(other)["fid"] == pytest.approx(want, rel=1e-3)


def test_frechet_distance_function_matches_reference():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(400, 6)), rng.normal(0.3, 1.5, size=(300, 6))
    got = frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert got == pytest.approx(numpy_fid(a, b), rel=1e-6)


def test_fid_grows_with_noise(reference):
    scorer = ImageScorer(features, None, reference)
    fresh = images(1000, seed=3)
    g = torch.Generator().manual_seed(4)
    fids = [
        scorer.score((fresh + sigma * torch.randn(fresh.shape, generator=g)).clamp(-1, 1))["fid"]
        for sigma in (0.0, 0.3, 1.0, 3.0)
    ]
    assert fids[0] < 0.1  # two samples of one distribution: only the finite-sample bias
    assert all(a < b for a, b in zip(fids, fids[1:], strict=False)), fids
    assert fids[-1] > 3 * fids[0]


def test_inception_score_limits():
    labels = torch.arange(1000) % 10
    confident = 50.0 * torch.nn.functional.one_hot(labels, 10).double()
    assert inception_score(confident) == pytest.approx(10.0, rel=1e-4)
    assert inception_score(confident, splits=10) == pytest.approx(10.0, rel=1e-4)
    constant = torch.randn(1, 10).repeat(1000, 1)
    assert inception_score(constant) == pytest.approx(1.0, abs=1e-9)
    # Confident but on 3 of the 10 classes only: IS = 3.
    three = 50.0 * torch.nn.functional.one_hot(torch.arange(999) % 3, 10).double()
    assert inception_score(three) == pytest.approx(3.0, rel=1e-4)


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # dead ReLU units: singular cov
def test_build_scorer_digit_classifier(tmp_path, reference):
    model = DigitClassifier(width=4, feature_dim=12).eval()
    path = tmp_path / "clf.safetensors"
    save_classifier(path, model)
    scorer = build_scorer({"feature_net": "digit_classifier", "classifier": str(path)}, reference)
    result = scorer.score(images(300, seed=5))
    with torch.no_grad():
        want_fid = numpy_fid(
            model.features(reference).double().numpy(),
            model.features(images(300, seed=5)).double().numpy(),
        )
        want_is = inception_score(model(images(300, seed=5)))
    assert result["fid"] == pytest.approx(want_fid, rel=1e-3, abs=1e-6)
    assert result["inception_score"] == pytest.approx(want_is, rel=1e-6)
    assert 1.0 <= result["inception_score"] <= 10.0


def test_build_scorer_errors_name_the_key(tmp_path, reference):
    with pytest.raises(ReproInputError, match="feature_net") as err:
        build_scorer({"feature_net": "vgg"}, reference)
    assert "digit_classifier" in str(err.value) and "inception" in str(err.value)
    with pytest.raises(ReproInputError, match="params.classifier"):
        build_scorer({"feature_net": "digit_classifier"}, reference)
    with pytest.raises(ReproInputError, match=str(tmp_path / "nope.safetensors")):
        build_scorer(
            {"feature_net": "digit_classifier", "classifier": str(tmp_path / "nope.safetensors")},
            reference,
        )


def test_inception_without_local_weights_is_a_clear_error(reference, tmp_path):
    # The paper-scale net never downloads: no weights file, or an unusable one, is an error
    # naming the config key (and the file), and saying how to make the file.
    with pytest.raises(ReproInputError, match="params.inception_weights: missing.*convert"):
        build_scorer({"feature_net": "inception"}, reference[:4])
    absent = tmp_path / "none.safetensors"
    with pytest.raises(ReproInputError, match=f"params.inception_weights.*{absent}.*convert"):
        build_scorer({"feature_net": "inception", "inception_weights": str(absent)}, reference[:4])
    pth = tmp_path / "weights.pth"  # the official file, not converted yet
    torch.save({"fc.weight": torch.zeros(2, 2)}, pth)
    with pytest.raises(ReproInputError, match=f"params.inception_weights.*{pth}.*convert"):
        build_scorer({"feature_net": "inception", "inception_weights": str(pth)}, reference[:4])


def test_build_scorer_inception_scores_end_to_end(tmp_path):
    from repro.core.inception import InceptionV3, load_inception, save_inception, to_uint8_rgb

    torch.manual_seed(0)
    path = tmp_path / "inception.safetensors"
    save_inception(path, InceptionV3().state_dict())  # random weights, the real file format
    ref, fake = images(4, seed=10), images(3, seed=11) * 0.5
    params = {"feature_net": "inception", "inception_weights": str(path), "batch_size": 2}
    scorer = build_scorer(params, ref)
    result = scorer.score(fake)

    net = load_inception(path)
    with torch.no_grad():
        ref_feats, _ = net(to_uint8_rgb(ref))
        feats, logits = net(to_uint8_rgb(fake))
    # With fewer images than dimensions, Tr (S1 S2)^1/2 is the nuclear norm of A1 A2^T
    # (A = centred features): an independent, cheap check of the 2048-d FID.
    a1 = ref_feats.double() - ref_feats.double().mean(0)
    a2 = feats.double() - feats.double().mean(0)
    n1, n2 = len(a1), len(a2)
    want_fid = float(
        (ref_feats.double().mean(0) - feats.double().mean(0)).square().sum()
        + a1.square().sum() / (n1 - 1)
        + a2.square().sum() / (n2 - 1)
        - 2 * torch.linalg.matrix_norm(a1 @ a2.T, ord="nuc") / ((n1 - 1) * (n2 - 1)) ** 0.5
    )
    assert want_fid > 1e-3
    assert result["fid"] == pytest.approx(want_fid, rel=1e-3)
    want_is = inception_score(logits)  # near 1 with random weights: compare IS - 1
    assert want_is - 1 > 1e-5
    assert result["inception_score"] - 1 == pytest.approx(want_is - 1, rel=1e-3)
    assert result["num_images"] == 3


def test_frechet_features_is_zero_on_itself_and_names_the_metric_on_bad_input():
    from repro.core.errors import ReproInputError
    from repro.core.metrics import frechet_features

    g = torch.Generator().manual_seed(1)
    a = torch.randn(50, 3, generator=g)
    # Shifting every feature by 1 moves the means by sqrt(3): FD = 3, covariances equal.
    assert frechet_features(a, a + 1.0) == pytest.approx(3.0, rel=1e-6)
    assert frechet_features(a, a) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ReproInputError, match="frame_fid: needs at least 2"):
        frechet_features(a[:1], a, "frame_fid")
