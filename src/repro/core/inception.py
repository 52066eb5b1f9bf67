"""The FID Inception-v3 (TF-FID "pool3" features and logits), in plain PyTorch.

FID and IS at paper scale are defined by one network: the Inception-v3 graph of
TensorFlow's 2015-12-05 release, as used by the original TTUR FID code. torch-fidelity
(`FeatureExtractorInceptionV3`, what torchmetrics' FID wraps) and pytorch-fid ported it
to PyTorch; this module rebuilds the same network without depending on either (both
import torchvision, which has no CPU build that installs beside our torch). What makes
it the FID network rather than torchvision's Inception-v3:

* images go in as uint8 RGB at any size and are resized to 299x299 with TensorFlow 1's
  bilinear resize (align_corners=False, no half-pixel centres), which is not what
  `F.interpolate` computes, then mapped to [-1, 1] by (x - 128) / 128;
* the 3x3 average pools inside the A, C and E blocks ignore the zero padding
  (TensorFlow's `count_include_pad=False`), and the last E block pools with max;
* batch norms have eps = 1e-3, and the classifier has 1008 classes;
* the 2048-d features are the global average pool of the last block ("pool3"), and the
  IS logits are `features @ fc.weight.T` without the bias ("logits_unbiased", as
  torch-fidelity's and the original IS code compute them).

Parameter names equal torch-fidelity's, so the official weights file loads unchanged
after `convert` (which only drops BatchNorm's `num_batches_tracked` training counters).
Nothing here downloads anything: fetch `URL_INCEPTION_V3` yourself, then

    python -m repro.core.inception convert --pth weights-inception-2015-12-05-6726825d.pth \\
        --out inception-2015-12-05.safetensors
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from repro.core.cli import log_command, setup_logging
from repro.core.errors import ReproInputError
from repro.core.io import load_tensors, save_tensors, sha256_file

log = logging.getLogger("repro")

# The TF-FID weights as torch-fidelity (and so torchmetrics) downloads them; pytorch-fid
# publishes the same weights, under the same parameter names, as MIRROR.
URL_INCEPTION_V3 = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
    "weights-inception-2015-12-05-6726825d.pth"
)
URL_INCEPTION_V3_MIRROR = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth"
)

KIND = "inception_v3_fid"
INPUT_SIZE = 299
NUM_FEATURES = 2048
NUM_CLASSES = 1008  # 1000 ImageNet classes + 8 unused ones of the 2015 graph


# ---------------------------------------------------------------------------------------
# Pre-processing
# ---------------------------------------------------------------------------------------


def to_uint8_rgb(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images [N, 1|3, H, W] -> uint8 [N, 3, H, W] (grey repeated to RGB).

    Quantised as a sample saved to PNG would be: floor(127.5 x + 128) clamped to [0, 255]
    (the convention of DiT's and ADM's sampling scripts), so FID scores the 8-bit images.
    """
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images: expected [N, 1|3, H, W], got {tuple(images.shape)}")
    if not torch.is_floating_point(images):
        raise ValueError(f"images: expected floats in [-1, 1], got {images.dtype}")
    if not torch.isfinite(images).all():
        raise ValueError("images: contain NaN or infinite values")
    x = (127.5 * images.float() + 128).clamp(0, 255).to(torch.uint8)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def resize_bilinear_tf1(x: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """TensorFlow 1.x `resize_bilinear(align_corners=False)` of float [N, C, H, W] to size^2.

    TF1 samples output pixel i at source coordinate i * (in / out) (float32, no
    half-pixel offset) and lerps between floor() and the next pixel, clamped at the
    border. `F.interpolate` uses half-pixel centres instead, which shifts the image by
    up to half a pixel and changes the features. Separable: width first, then height.
    """

    def taps(n_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scale = torch.tensor(n_in / size, dtype=torch.float32)
        src = torch.arange(size, dtype=torch.float32, device=x.device) * scale.to(x.device)
        lo = src.long()  # src >= 0: truncation is floor
        hi = (lo + 1).clamp(max=n_in - 1)
        return lo, hi, (src - lo).to(x.dtype)

    lo, hi, frac = taps(x.shape[-1])
    left, right = x[..., lo], x[..., hi]
    x = left + (right - left) * frac
    lo, hi, frac = taps(x.shape[-2])
    top, bottom = x[..., lo, :], x[..., hi, :]
    return top + (bottom - top) * frac[:, None]


# ---------------------------------------------------------------------------------------
# Building blocks (module names follow torch-fidelity's, i.e. the weights file's keys)
# ---------------------------------------------------------------------------------------


class FrozenBatchNorm2d(nn.Module):
    """Inference-only BatchNorm: the four tensors of nn.BatchNorm2d, no training counter.

    The net is never trained here, so `num_batches_tracked` (absent from some exports of
    the weights) is not part of the state dict.
    """

    def __init__(self, channels: int, eps: float = 1e-3):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(channels))
        self.register_buffer("bias", torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )


class BasicConv2d(nn.Module):
    """conv (no bias) -> batch norm (eps 1e-3) -> ReLU: every convolution of the net."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False)
        self.bn = FrozenBatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_3x3_tf(x: torch.Tensor) -> torch.Tensor:
    """TensorFlow's SAME 3x3 average pool: border windows average their real pixels only."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1 (Mixed_5b..5d)."""

    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                self.branch_pool(_avg_pool_3x3_tf(x)),
            ],
            dim=1,
        )


class InceptionB(nn.Module):
    """35x35 -> 17x17 reduction: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2 (Mixed_6a)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                self.branch3x3(x),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                F.max_pool2d(x, kernel_size=3, stride=2),
            ],
            dim=1,
        )


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (Mixed_6b..6e)."""

    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7dbl = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4):
            b7dbl = conv(b7dbl)
        b7dbl = self.branch7x7dbl_5(b7dbl)
        return torch.cat(
            [self.branch1x1(x), b7, b7dbl, self.branch_pool(_avg_pool_3x3_tf(x))], dim=1
        )


class InceptionD(nn.Module):
    """17x17 -> 8x8 reduction: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2 (Mixed_7a)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7x3_1(x)
        for conv in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = conv(b7)
        return torch.cat(
            [
                self.branch3x3_2(self.branch3x3_1(x)),
                b7,
                F.max_pool2d(x, kernel_size=3, stride=2),
            ],
            dim=1,
        )


class InceptionE(nn.Module):
    """8x8 block with split 1x3 / 3x1 branches (Mixed_7b with pool="avg", Mixed_7c "max").

    The TF graph's last block pools with max where the paper (and torchvision) average:
    a quirk of that graph that FID inherits.
    """

    def __init__(self, in_channels: int, pool: str):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool: {pool!r} is not 'avg' or 'max'")
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        b3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        if self.pool == "avg":
            pooled = _avg_pool_3x3_tf(x)
        else:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch3x3_2a(b3),
                self.branch3x3_2b(b3),
                self.branch3x3dbl_3a(b3dbl),
                self.branch3x3dbl_3b(b3dbl),
                self.branch_pool(pooled),
            ],
            dim=1,
        )


# ---------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------


class InceptionV3(nn.Module):
    """The TF-FID Inception-v3: uint8 RGB images -> (2048-d pool3 features, 1008 logits).

    Built with random weights that keep activations O(1) through all 94 convolutions
    (`init_weights`), so that an untrained net is still a usable stand-in in tests;
    `load_inception` fills in the real ones.
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(NUM_FEATURES, NUM_CLASSES)  # its bias is loaded, never used
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """He-normal convolutions, identity batch norms, fc with unit-variance outputs."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.normal_(0.0, (2.0 / fan_in) ** 0.5, generator=generator)
        self.fc.weight.normal_(0.0, NUM_FEATURES**-0.5, generator=generator)
        self.fc.bias.zero_()

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 1|3, H, W] (any H, W) -> float32 pool3 features [N, 2048]."""
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images: expected [N, 1|3, H, W], got {tuple(images.shape)}")
        if images.dtype != torch.uint8:
            raise ValueError(f"images: expected uint8 (see to_uint8_rgb), got {images.dtype}")
        x = images.expand(-1, 3, -1, -1).to(self.fc.weight.device, torch.float32)
        x = resize_bilinear_tf1(x, INPUT_SIZE)
        x = (x - 128) / 128  # the graph's (x - 128) * 0.0078125, exactly
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # 64 x 147 x 147
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # 73 x 73
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # 192 x 71 x 71
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # 35 x 35
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d):
            x = block(x)  # 288 x 35 x 35
        for block in (self.Mixed_6a, self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e):
            x = block(x)  # 768 x 17 x 17
        for block in (self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)  # 2048 x 8 x 8
        return x.mean(dim=(2, 3))

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """IS logits [N, 1008] of pool3 features: the fc layer without its bias."""
        return features @ self.fc.weight.T

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 [N, 1|3, H, W] -> (features [N, 2048], logits [N, 1008]), one pass."""
        feats = self.features(images)
        return feats, self.logits(feats)


# ---------------------------------------------------------------------------------------
# Weights: convert the official .pth once, then load safetensors
# ---------------------------------------------------------------------------------------


def _check_state_dict(state: Mapping[str, torch.Tensor], source: str | os.PathLike) -> None:
    """Raise ReproInputError naming `source` unless `state` fits InceptionV3 exactly."""
    with torch.device("meta"):  # shapes only: no memory, no random numbers
        want = {k: tuple(v.shape) for k, v in InceptionV3().state_dict().items()}
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    wrong = [
        f"{k} {tuple(state[k].shape)} != {want[k]}"
        for k in sorted(set(want) & set(state))
        if tuple(state[k].shape) != want[k]
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensors (e.g. {missing[:3]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[:3]})")
    if wrong:
        problems.append(f"{len(wrong)} wrong shapes (e.g. {wrong[:3]})")
    if problems:
        raise ReproInputError(f"{source}: not the FID Inception-v3 weights: " + "; ".join(problems))


def save_inception(
    path: str | os.PathLike,
    state_dict: Mapping[str, torch.Tensor],
    metadata: Mapping[str, object] | None = None,
    source: str | os.PathLike | None = None,
) -> None:
    """Write a torch-fidelity-named Inception state dict as a repro safetensors file.

    BatchNorm `num_batches_tracked` counters are dropped (unused at inference); every
    other tensor must fit InceptionV3 exactly. `source` names the input in errors.
    """
    state = {k: v for k, v in state_dict.items() if not k.endswith(".num_batches_tracked")}
    _check_state_dict(state, source if source is not None else path)
    save_tensors(path, {k: v.float() for k, v in state.items()}, kind=KIND, metadata=metadata)


def load_inception(path: str | os.PathLike) -> InceptionV3:
    """The FID Inception-v3 with the weights of a `convert`ed .safetensors file (eval mode).

    A missing, truncated or foreign file, or one with missing, unexpected or misshapen
    tensors, raises ReproInputError naming it.
    """
    tensors, _ = load_tensors(path, kind=KIND)
    _check_state_dict(tensors, path)
    model = InceptionV3()
    model.load_state_dict(tensors, strict=True)
    return model.requires_grad_(False).eval()


def convert(pth: str | os.PathLike, out: str | os.PathLike) -> None:
    """Convert the official PyTorch weights (.pth state dict) to `out` (.safetensors).

    Read with torch.load(weights_only=True): no code from the file runs.
    """
    pth = Path(pth)
    if not pth.is_file():
        raise ReproInputError(f"{pth}: file not found (download it from {URL_INCEPTION_V3})")
    try:
        # Every tensor into host memory, whatever device it was saved from.
        state = torch.load(pth, map_location=lambda storage, _: storage, weights_only=True)
    except Exception as err:  # torch.load raises many types for truncated / foreign files
        raise ReproInputError(
            f"{pth}: truncated, corrupt or not a PyTorch weights file ({type(err).__name__}: {err})"
        ) from err
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise ReproInputError(f"{pth}: not a state dict of tensors ({type(state).__name__})")
    meta = {"source": pth.name, "source_sha256": sha256_file(pth), "url": URL_INCEPTION_V3}
    save_inception(out, state, metadata=meta, source=pth)
    log.info("wrote %s from %s (sha256 %s)", out, pth, meta["source_sha256"])


def fetch(out: str | os.PathLike, url: str = URL_INCEPTION_V3) -> None:
    """Download the official weights from `url` and `convert` them to `out` (.safetensors).

    For the paper scale's local rule `inception_weights`, run on the host that
    submits jobs (compute nodes may have no internet). The download must be the
    file its name promises: the sha256 starts with the 8 hex digits in the name.
    """
    import tempfile
    import urllib.request

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        pth = Path(tmp) / Path(url).name
        try:
            with urllib.request.urlopen(url, timeout=120) as response, pth.open("wb") as f:
                f.write(response.read())
        except OSError as err:
            raise ReproInputError(f"{url}: download failed ({err})") from err
        expected = pth.stem.rsplit("-", 1)[-1]
        digest = sha256_file(pth)
        if len(expected) == 8 and not digest.startswith(expected):
            raise ReproInputError(
                f"{url}: sha256 {digest[:8]}... does not match the name's {expected}"
            )
        convert(pth, out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m repro.core.inception",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    conv = commands.add_parser("convert", help="official .pth -> .safetensors")
    conv.add_argument("--pth", required=True, help="the downloaded torch-fidelity weights")
    conv.add_argument("--out", required=True, help=".safetensors file to write")
    get = commands.add_parser("fetch", help="download the official weights and convert them")
    get.add_argument("--out", required=True, help=".safetensors file to write")
    get.add_argument("--url", default=URL_INCEPTION_V3, help="where the .pth lives")
    args = parser.parse_args(argv)
    setup_logging()
    log_command(parser, argv)
    if args.command == "fetch":
        fetch(args.out, args.url)
    else:
        convert(args.pth, args.out)


if __name__ == "__main__":
    from repro.core.stage import run

    run(main)  # bad input: one line on stderr, exit status 2
