"""FedRE's client and server models: ten different client architectures that share one
representation size and one head shape, and FedTGP's trainable prototype generator.

A client is `base` then `head`, as in HtFLlib:

    x [B, C, H, W] --backbone (architecture-specific)--> flatten [B, F]
      --RepresentationMapping: AdaptiveAvgPool1d(rep_dim) on [B, 1, F]--> z [B, rep_dim]
      --head: Linear(rep_dim -> num_classes)--> logits

The mapping has no parameters (HtFLlib replaces each torchvision model's last layer by
nn.AdaptiveAvgPool1d(feature_dim)), so every client's representation has the same size
whatever its backbone, and heads and prototypes of that size can be shared.

ARCHITECTURES is the tiny analogue of HtFLlib's "HtM10" family (4-layer CNN, GoogLeNet,
MobileNetV2, ResNets, ...): ten backbones of different kind, depth and width, each ending
in a ReLU / GELU feature of F >= 64 values at 8x8 input (F is in each builder's comment).
Images arrive in [-1, 1]; every builder takes (in_channels, image_size).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from repro.core.errors import ReproInputError

HEAD_KEYS = ("weight", "bias")


class RepresentationMapping(nn.Module):
    """Any backbone output -> [B, rep_dim]: flattened to [B, F], then averaged over the
    AdaptiveAvgPool1d bins of [B, 1, F] (bin i covers floor(i F / rep_dim) ..
    ceil((i + 1) F / rep_dim) - 1, so bins overlap when rep_dim does not divide F)."""

    def __init__(self, rep_dim: int):
        super().__init__()
        self.rep_dim = int(rep_dim)
        self.pool = nn.AdaptiveAvgPool1d(self.rep_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(x.flatten(1).unsqueeze(1)).squeeze(1)


# --- the ten backbones ------------------------------------------------------------------


def _mlp(in_channels: int, image_size: int, widths: Sequence[int]) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    previous = in_channels * image_size * image_size
    for width in widths:
        layers += [nn.Linear(previous, width), nn.ReLU()]
        previous = width
    return nn.Sequential(*layers)


def mlp_narrow(in_channels: int, image_size: int) -> nn.Module:
    """One hidden layer of 64. F = 64."""
    return _mlp(in_channels, image_size, [64])


def mlp_wide(in_channels: int, image_size: int) -> nn.Module:
    """One hidden layer of 256. F = 256."""
    return _mlp(in_channels, image_size, [256])


def mlp_deep(in_channels: int, image_size: int) -> nn.Module:
    """Three hidden layers of 128. F = 128."""
    return _mlp(in_channels, image_size, [128, 128, 128])


def _conv(in_channels: int, out_channels: int, *, batch_norm: bool = False) -> list[nn.Module]:
    """3x3 same-size convolution + (BatchNorm) + ReLU; no bias before a BatchNorm."""
    conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=not batch_norm)
    norm = [nn.BatchNorm2d(out_channels)] if batch_norm else []
    return [conv, *norm, nn.ReLU()]


def cnn_small(in_channels: int, image_size: int) -> nn.Module:
    """conv 16, maxpool, conv 32. F = 32 x 4 x 4 = 512 at 8x8."""
    return nn.Sequential(*_conv(in_channels, 16), nn.MaxPool2d(2), *_conv(16, 32))


def cnn_wide(in_channels: int, image_size: int) -> nn.Module:
    """conv 64, maxpool, conv 64 (pooled first: the wide conv then costs a quarter).
    F = 64 x 4 x 4 = 1024 at 8x8."""
    return nn.Sequential(*_conv(in_channels, 64), nn.MaxPool2d(2), *_conv(64, 64))


def cnn_deep(in_channels: int, image_size: int) -> nn.Module:
    """conv 16, conv 32, maxpool, conv 32, conv 64, maxpool. F = 64 x 2 x 2 = 256 at 8x8."""
    return nn.Sequential(
        *_conv(in_channels, 16),
        *_conv(16, 32),
        nn.MaxPool2d(2),
        *_conv(32, 32),
        *_conv(32, 64),
        nn.MaxPool2d(2),
    )


def cnn_bn(in_channels: int, image_size: int) -> nn.Module:
    """(conv + BatchNorm + ReLU) x 3 of 32, 32, 64 with maxpools after the first and the
    last. Train and eval outputs differ (batch vs running statistics), which matters
    because prototypes are computed in eval mode. F = 64 x 2 x 2 = 256 at 8x8."""
    return nn.Sequential(
        *_conv(in_channels, 32, batch_norm=True),
        nn.MaxPool2d(2),
        *_conv(32, 32, batch_norm=True),
        *_conv(32, 64, batch_norm=True),
        nn.MaxPool2d(2),
    )


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 conv + BatchNorm, a 1x1 conv + BatchNorm shortcut
    where the stride or width changes, ReLU after the sum."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


def resnet_tiny(in_channels: int, image_size: int) -> nn.Module:
    """stem conv 16 + BatchNorm + ReLU, block 16 -> 16, block 16 -> 32 at stride 2.
    F = 32 x 4 x 4 = 512 at 8x8."""
    return nn.Sequential(
        *_conv(in_channels, 16, batch_norm=True),
        BasicBlock(16, 16, stride=1),
        BasicBlock(16, 32, stride=2),
    )


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand + BN + ReLU6, depthwise 3x3 + BN + ReLU6, 1x1
    linear project + BN; the input is added back when the shape is kept."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_channels * expansion
        self.block = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        out = self.block(x)
        return x + out if self.residual else out


def mobilenet_tiny(in_channels: int, image_size: int) -> nn.Module:
    """stem conv 16 + BN + ReLU6, inverted residuals 16 -> 16 (x2 expansion, residual) and
    16 -> 24 (x2, stride 2), then MobileNetV2's final 1x1 conv + BN + ReLU6 (to 32): the
    blocks end in a linear projection, and the representation should be activated.
    Expansion 2, not MobileNetV2's 6: depthwise convolutions are slow on CPU, and x4
    already took ~6.5 ms per training step at batch 32 on one thread. F = 32 x 4 x 4 = 512
    at 8x8."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU6(),
        InvertedResidual(16, 16, stride=1, expansion=2),
        InvertedResidual(16, 24, stride=2, expansion=2),
        nn.Conv2d(24, 32, 1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU6(),
    )


class TinyViT(nn.Module):
    """Patch size 2 -> (size / 2)^2 tokens of dim 32 with a learned position embedding,
    2 pre-norm transformer encoder layers (4 heads, feed-forward 64, GELU, no dropout),
    final LayerNorm, mean over tokens, then ViT's pre-logits layer Linear(32 -> 128) + GELU
    (the token mean alone is 32 < rep_dim 64 values, and not activated). F = 128."""

    def __init__(self, in_channels: int, image_size: int, dim: int = 32, pre_logits: int = 128):
        super().__init__()
        tokens = (image_size // 2) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, kernel_size=2, stride=2)
        self.position = nn.Parameter(torch.zeros(1, tokens, dim))
        nn.init.trunc_normal_(self.position, std=0.02)
        # A plain list of layers, not nn.TransformerEncoder: the latter warns about
        # nested tensors for pre-norm layers, and adds nothing here.
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                dim,
                nhead=4,
                dim_feedforward=64,
                dropout=0.0,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(2)
        )
        self.norm = nn.LayerNorm(dim)
        self.pre_logits = nn.Sequential(nn.Linear(dim, pre_logits), nn.GELU())

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2) + self.position  # [B, T, dim]
        for layer in self.layers:
            tokens = layer(tokens)
        return self.pre_logits(self.norm(tokens).mean(1))


def vit_tiny(in_channels: int, image_size: int) -> nn.Module:
    """TinyViT (16 tokens at 8x8). F = 128."""
    return TinyViT(in_channels, image_size)


Builder = Callable[[int, int], nn.Module]

ARCHITECTURES: OrderedDict[str, Builder] = OrderedDict(
    [
        ("mlp_narrow", mlp_narrow),
        ("mlp_wide", mlp_wide),
        ("mlp_deep", mlp_deep),
        ("cnn_small", cnn_small),
        ("cnn_wide", cnn_wide),
        ("cnn_deep", cnn_deep),
        ("cnn_bn", cnn_bn),
        ("resnet_tiny", resnet_tiny),
        ("mobilenet_tiny", mobilenet_tiny),
        ("vit_tiny", vit_tiny),
    ]
)


# --- clients ----------------------------------------------------------------------------


class ClientModel(nn.Module):
    """One client: `base` (backbone + RepresentationMapping) and `head` Linear(rep_dim ->
    num_classes). `features` is the representation the algorithms share or align."""

    def __init__(self, arch: str, backbone: nn.Module, rep_dim: int, num_classes: int):
        super().__init__()
        self.arch = arch
        self.rep_dim = int(rep_dim)
        self.num_classes = int(num_classes)
        self.base = nn.Sequential(backbone, RepresentationMapping(self.rep_dim))
        self.head = nn.Linear(self.rep_dim, self.num_classes)

    def features(self, x: Tensor) -> Tensor:
        """The representation [B, rep_dim] of images x [B, C, H, W]."""
        return self.base(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.base(x))


def build_client(
    arch: str, *, in_channels: int, image_size: int, rep_dim: int, num_classes: int, seed: int
) -> ClientModel:
    """A ClientModel of `arch`, initialised from `seed` alone (the global RNG is neither
    read nor advanced)."""
    if arch not in ARCHITECTURES:
        raise ReproInputError(
            f"fedre.clients: unknown architecture {arch!r} (allowed: {', '.join(ARCHITECTURES)})"
        )
    if rep_dim < 1:
        raise ReproInputError(f"fedre.rep_dim: must be >= 1, got {rep_dim}")
    if num_classes < 2:
        raise ReproInputError(f"fedre.tasks: a task needs >= 2 classes, got {num_classes}")
    if in_channels < 1:
        raise ReproInputError(f"fedre.tasks: images need >= 1 channel, got {in_channels}")
    # Two 2x2 poolings (cnn_deep, cnn_bn) need 4 pixels; the ViT's 2x2 patches an even size.
    if image_size < 4 or image_size % 2:
        raise ReproInputError(f"fedre.tasks: image size must be even and >= 4, got {image_size}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = ARCHITECTURES[arch](in_channels, image_size)
        return ClientModel(arch, backbone, rep_dim, num_classes)


def build_clients(
    archs: Sequence[str],
    *,
    in_channels: int,
    image_size: int,
    rep_dim: int,
    num_classes: int,
    seed: int,
) -> list[ClientModel]:
    """One ClientModel per entry of `archs`; client i is initialised from seed * 1000 + i,
    so two clients of the same architecture still start apart."""
    if not archs:
        raise ReproInputError("fedre.clients: no architectures (one per client)")
    return [
        build_client(
            arch,
            in_channels=in_channels,
            image_size=image_size,
            rep_dim=rep_dim,
            num_classes=num_classes,
            seed=seed * 1000 + index,
        )
        for index, arch in enumerate(archs)
    ]


# --- the server's model and the shared head ---------------------------------------------


class PrototypeGenerator(nn.Module):
    """FedTGP's trainable prototypes (HtFLlib's Trainable_prototypes): class id ->
    Embedding(num_classes, rep_dim) -> Linear(rep_dim -> hidden) + ReLU ->
    Linear(hidden -> rep_dim)."""

    def __init__(self, num_classes: int, rep_dim: int, hidden: int):
        super().__init__()
        for name, value in {
            "num_classes": num_classes,
            "rep_dim": rep_dim,
            "hidden": hidden,
        }.items():
            if int(value) < 1:
                raise ValueError(f"PrototypeGenerator: {name} must be >= 1, got {value}")
        self.embedding = nn.Embedding(int(num_classes), int(rep_dim))
        self.middle = nn.Sequential(nn.Linear(int(rep_dim), int(hidden)), nn.ReLU())
        self.out = nn.Linear(int(hidden), int(rep_dim))

    def forward(self, class_ids: Tensor) -> Tensor:
        """Prototypes [len(class_ids), rep_dim] of the classes `class_ids` (LongTensor)."""
        return self.out(self.middle(self.embedding(class_ids)))


def head_state(model: ClientModel) -> dict[str, Tensor]:
    """The head's weight [num_classes, rep_dim] and bias [num_classes], detached copies."""
    return {key: getattr(model.head, key).detach().clone() for key in HEAD_KEYS}


@torch.no_grad()
def load_head(model: ClientModel, state: Mapping[str, Tensor]) -> None:
    """Set `model`'s head to `state` (as head_state gives it), copying the values."""
    missing = [key for key in HEAD_KEYS if key not in state]
    if missing:
        raise ReproInputError(f"head state: missing {missing} (need {list(HEAD_KEYS)})")
    for key in HEAD_KEYS:
        target = getattr(model.head, key)
        if tuple(state[key].shape) != tuple(target.shape):
            raise ReproInputError(
                f"head state: {key} has shape {tuple(state[key].shape)}, the {model.arch} "
                f"client's head needs {tuple(target.shape)}"
            )
        target.copy_(state[key])


def count_parameters(module: nn.Module) -> int:
    """Number of parameters of `module` (BatchNorm's running statistics excluded)."""
    return sum(p.numel() for p in module.parameters())
