"""FID and Inception Score with a pluggable feature network.

One implementation serves both scales: at tiny scale the features and logits come
from the 8x8 DigitClassifier, at paper scale from the TF-FID Inception-v3
(repro.core.inception). The Frechet distance itself is torchmetrics'
FrechetInceptionDistance fed with features we compute ourselves (its `feature` is an
identity module), so the reference statistics are accumulated once and kept across
calls (`reset_real_features=False`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn

from repro.core.errors import ReproInputError

FEATURE_NETS = ("digit_classifier", "inception")


def inception_score(logits: torch.Tensor, splits: int = 1) -> float:
    """exp(E_x KL(p(y|x) || p(y))), averaged over `splits` contiguous chunks.

    1 for constant predictions, the number of classes for confident, uniformly spread ones.
    """
    logits = logits.double()
    log_p = logits.log_softmax(dim=1)
    scores = []
    for chunk in log_p.chunk(splits, dim=0):
        log_marginal = torch.logsumexp(chunk, dim=0) - math.log(chunk.shape[0])  # log p(y)
        kl = (chunk.exp() * (chunk - log_marginal)).sum(dim=1).mean()
        scores.append(kl.exp())
    return float(torch.stack(scores).mean())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2), as in torchmetrics (float64)."""
    from torchmetrics.image.fid import _compute_fid

    as64 = lambda t: torch.as_tensor(t, dtype=torch.float64)  # noqa: E731
    return float(_compute_fid(as64(mu1), as64(sigma1), as64(mu2), as64(sigma2)))


def frechet_features(
    features_a: torch.Tensor, features_b: torch.Tensor, what: str = "FID"
) -> float:
    """Fréchet distance between Gaussians fitted to two sets of features [M, D] and [K, D]
    (means and covariances in float64; clamped at 0 against round-off). `what` names
    the metric in errors."""
    if features_a.ndim != 2 or features_b.ndim != 2:
        raise ReproInputError(f"{what}: features must be [items, dim]")
    if features_a.shape[1] != features_b.shape[1]:
        raise ReproInputError(
            f"{what}: feature sizes differ ({features_a.shape[1]} vs {features_b.shape[1]})"
        )
    if len(features_a) < 2 or len(features_b) < 2:
        raise ReproInputError(f"{what}: needs at least 2 items on each side")

    def moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.double()
        return x.mean(0), torch.cov(x.T)

    return max(0.0, frechet_distance(*moments(features_a), *moments(features_b)))


class _Precomputed(nn.Identity):
    """The `feature` module handed to torchmetrics' FID: its inputs already are features."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features


class ImageScorer:
    """FID against a fixed reference set, and the Inception Score, of image batches.

    feature_fn maps images to [N, D] features, logits_fn (optional) to [N, C] class logits.
    The reference features are computed once, here.
    """

    def __init__(
        self,
        feature_fn: Callable[[torch.Tensor], torch.Tensor],
        logits_fn: Callable[[torch.Tensor], torch.Tensor] | None,
        reference_images: torch.Tensor,
        batch_size: int = 512,
    ):
        from torchmetrics.image.fid import FrechetInceptionDistance

        if len(reference_images) < 2:
            raise ReproInputError(
                f"reference_images: FID needs at least 2, got {len(reference_images)}"
            )
        self.feature_fn = feature_fn
        self.logits_fn = logits_fn
        self.batch_size = batch_size
        ref, _ = self._embed(reference_images, with_logits=False)
        self.num_reference = len(ref)
        self.fid = FrechetInceptionDistance(
            feature=_Precomputed(ref.shape[1]), reset_real_features=False
        )
        self.fid.update(ref, real=True)

    @torch.no_grad()
    def _embed(self, images: torch.Tensor, with_logits: bool):
        """Features (and logits) in float64, batch by batch; both from the same batch object."""
        feats, logits = [], []
        for i in range(0, len(images), self.batch_size):
            batch = images[i : i + self.batch_size]
            feats.append(self.feature_fn(batch).double())
            if with_logits:
                logits.append(self.logits_fn(batch).double())
        return torch.cat(feats), (torch.cat(logits) if with_logits else None)

    def score(self, images: torch.Tensor) -> dict:
        """{"fid", "inception_score" (NaN without logits_fn), "num_images"}."""
        if len(images) < 2:
            raise ReproInputError(f"images: FID needs at least 2, got {len(images)}")
        feats, logits = self._embed(images, with_logits=self.logits_fn is not None)
        self.fid.reset()  # drops the previous fake statistics, keeps the reference
        self.fid.update(feats, real=False)
        fid = float(self.fid.compute())
        is_ = inception_score(logits) if logits is not None else math.nan
        return {"fid": fid, "inception_score": is_, "num_images": len(images)}


class _InceptionV3:
    """The TF-FID Inception-v3 (repro.core.inception) on [-1, 1] images [N, 1|3, H, W].

    Images are quantised to uint8 as saved samples are, then resized inside the net with
    TensorFlow 1's bilinear resize, as the standard FID protocol does. The net runs on
    `device`; features and logits come back on the images' device. One forward pass
    serves both outputs: the last batch's are kept so that ImageScorer's feature_fn and
    logits_fn calls on the same batch run the net once.
    """

    def __init__(self, weights_path: str, device: torch.device):
        from repro.core.inception import load_inception

        self.device = device
        self.net = load_inception(weights_path).to(self.device)
        self._last: tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] | None = None

    @torch.no_grad()
    def _run(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from repro.core.inception import to_uint8_rgb

        if self._last is None or self._last[0] is not images:
            feats, logits = self.net(to_uint8_rgb(images).to(self.device))
            self._last = (images, (feats.to(images.device), logits.to(images.device)))
        return self._last[1]

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self._run(images)[0]

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self._run(images)[1]


def _on(fn: Callable[[torch.Tensor], torch.Tensor], device: torch.device):
    """`fn` run on `device`, its output returned to the input's device."""
    return lambda images: fn(images.to(device)).to(images.device)


def build_scorer(
    params: dict, reference_images: torch.Tensor, device: torch.device | None = None
) -> ImageScorer:
    """An ImageScorer for params["feature_net"] (see feature_networks) against
    `reference_images`."""
    feature_fn, logits_fn = feature_networks(params, device)
    batch_size = int(params.get("batch_size", 512))
    return ImageScorer(feature_fn, logits_fn, reference_images, batch_size)


def feature_networks(
    params: dict, device: torch.device | None = None
) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
    """(features, logits) of params["feature_net"]: "digit_classifier" (params["classifier"] =
    its safetensors file) or "inception" (params["inception_weights"] = the FID
    Inception-v3 weights as a local .safetensors file, made by
    `python -m repro.core.inception convert`; nothing is downloaded here).

    The feature network runs on `device` (default: repro.core.distributed's "auto").
    """
    from repro.core.distributed import resolve_device

    device = resolve_device("auto") if device is None else device
    net = params.get("feature_net")
    if net == "digit_classifier":
        from repro.core.classifier import load_classifier

        if "classifier" not in params:
            raise ReproInputError("params.classifier: missing (the digit classifier .safetensors)")
        model = load_classifier(params["classifier"]).to(device)
        return _on(model.features, device), _on(model, device)
    if net == "inception":
        from repro.core.inception import URL_INCEPTION_V3

        how = (
            f"download {URL_INCEPTION_V3} and convert it with `python -m repro.core.inception "
            "convert --pth FILE.pth --out FILE.safetensors`, or use "
            "feature_net='digit_classifier'"
        )
        path = params.get("inception_weights")
        if not path:
            raise ReproInputError(
                "params.inception_weights: missing; feature_net='inception' needs the FID "
                f"Inception-v3 weights as a local .safetensors file: {how}"
            )
        try:
            inception = _InceptionV3(path, device)
        except ReproInputError as err:  # names the file; add the key and the remedy
            raise ReproInputError(
                f"params.inception_weights (feature_net='inception'): {err}. To make the "
                f"file: {how}"
            ) from err
        return inception.features, inception.logits
    raise ReproInputError(f"params.feature_net: {net!r} is not one of {list(FEATURE_NETS)}")
