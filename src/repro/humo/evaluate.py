"""HuMo's judges and metrics: frozen evaluators trained on real clips, and one metric row
per generated set.

The paper measures identity (ID-Cur: face-recognition cosine to the reference), lip
sync (Sync-C / Sync-D: SyncNet's confidence and offset) and text alignment. At tiny
scale the talking faces (repro.foundation.faces, kind "talking_faces") have no face
recogniser or SyncNet, so three small CNNs are trained on the REAL training clips
(identity-disjoint from the test clips) and frozen:

- the identity encoder (the ID-Cur analogue): frame -> unit embedding, trained as a
  cosine classifier over the training identities; `identity_similarity` is the mean over
  frames of cos(frame, reference);
- the mouth reader (the SyncNet analogue): frame -> mouth opening in [0, 1]; the sync
  scores correlate that series with the clip's audio envelope over a range of offsets
  (`sync_scores`): Sync-C ~ the correlation at the best offset, Sync-D ~ |best offset|;
- the scene reader (text alignment): the head-motion class from the frame differences
  and the background class from single frames, the two things every caption names.

Two subcommands, each a stage (repro.core.stage):

    python -m repro.humo.evaluate judges --faces-train data/faces/train.safetensors \
        --faces-val data/faces/val.safetensors --out models/humo/judges.safetensors \
        --metrics results/humo/judges.json --params '{"epochs": 8, "batch_size": 64, ...}'
    python -m repro.humo.evaluate metrics --judges models/humo/judges.safetensors \
        --generated results/humo/generated/full_TIA_paper_s0.safetensors \
        --faces-test data/faces/test.safetensors --out results/humo/metrics/x.json \
        --params '{"max_offset": 2, "seed": 0}'
    python -m repro.humo.evaluate metrics --real ...   # the test clips themselves

`judges` reports how well the frozen judges read REAL validation clips (identity top-1
retrieval, mouth-reader Pearson r, scene accuracies): a metric is only as good as its
judge. `metrics` writes one JSON row (repro.humo.table COLUMNS, plus the sync curves).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from repro.core.distributed import step_generator
from repro.core.errors import ReproInputError
from repro.core.io import load_tensors, save_tensors, write_json
from repro.core.metrics import frechet_features
from repro.core.training import fit

log = logging.getLogger("repro")

JUDGES_KIND = "humo_judges"
FACES_KIND = "talking_faces"
GENERATED_KIND = "humo_generated"
# What the judges and metrics read of a talking-faces file (repro.foundation.faces).
FACES_TENSORS = ("video", "reference", "mouth_open", "envelope", "identity", "motion", "background")
GENERATED_TENSORS = ("video", "index")
# The row of a generated set (repro.humo.table COLUMNS), in that order.
ROW_KEYS = ("task", "variant", "cfg", "seed")
ROW_METRICS = (
    "id_sim",
    "sync_c",
    "sync_offset",
    "sync_c_shuffled",
    "motion_acc",
    "background_acc",
    "text_align",
    "fid",
)
REAL_ROW = {"task": "real", "variant": "real", "cfg": "none"}

# The judges' config (params of `judges`; the config's humo.judges). An epoch is one pass
# over a judge's training examples: the frames of the training clips for the per-frame
# judges (identity encoder, mouth reader), the clips for the scene reader; batches are
# drawn at random (with replacement), an epoch fixes only the number of steps.
JUDGE_DEFAULTS = {
    "epochs": 8,
    "batch_size": 64,
    "lr": 2e-3,
    "seed": 0,
    "weight_decay": 1e-4,
    "warmup_fraction": 0.05,
    "width": 16,  # channels of the first conv of every judge
    "embed_dim": 32,  # identity embedding (and frame-FID feature) size
    "reference_fraction": 0.25,  # identity batches: share of reference portraits
    "max_offset": 2,  # offsets of the validation sync check
}
# The params of `metrics` (the config's humo.evaluate): the sync offsets searched, the
# seed of the shuffled control (and of the real row), frames per judge batch, and
# (--real only) how many test clips to measure: the first `clips`, as the generated
# sets are made of the first clips of the test split (None: all).
METRIC_DEFAULTS = {"max_offset": 2, "seed": 0, "batch_size": 512, "clips": None}
# A series whose standard deviation is below this (a frozen mouth, silence) has no
# defined correlation: it counts as 0, neither in sync nor against it.
CONSTANT_STD = 1e-6
# Correlations this close count as equal when the best offset is chosen (rounding).
TIE = 1e-9
# Logit scale of the identity encoder's cosine classifier (as in CosFace / ArcFace).
COSINE_SCALE = 16.0


# ---------------------------------------------------------------------------------------
# Pure functions: correlations, sync, shuffling, Fréchet distance
# ---------------------------------------------------------------------------------------


def to_float(x: Tensor) -> Tensor:
    """uint8 pixels [0, 255] -> float32 [-1, 1]; a float tensor is taken as already in
    [-1, 1] (as float32)."""
    if x.dtype == torch.uint8:
        return x.float() / 127.5 - 1.0
    return x.float()


def pearson(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation along the last dim ([..., T] x [..., T] -> [...]), in float64.

    Where either series is constant (std < CONSTANT_STD) the correlation is undefined
    and returned as 0.
    """
    a = a.double() - a.double().mean(-1, keepdim=True)
    b = b.double() - b.double().mean(-1, keepdim=True)
    norm_a, norm_b = a.norm(dim=-1), b.norm(dim=-1)
    corr = (a * b).sum(-1) / (norm_a * norm_b).clamp_min(1e-300)
    scale = math.sqrt(a.shape[-1])  # norm = std * sqrt(T) (population std)
    defined = (norm_a / scale >= CONSTANT_STD) & (norm_b / scale >= CONSTANT_STD)
    return torch.where(defined, corr.clamp(-1.0, 1.0), torch.zeros_like(corr))


def sync_offsets(max_offset: int) -> list[int]:
    """The offsets the sync scores search, in curve order: -max_offset .. max_offset."""
    return list(range(-max_offset, max_offset + 1))


def sync_scores(mouth: Tensor, envelope: Tensor, max_offset: int) -> tuple[Tensor, Tensor, Tensor]:
    """Lip-sync of every clip: (best_corr [N], best_offset [N] int64, curve [N, 2K+1]).

    curve[:, k] is the Pearson correlation of mouth(t) with envelope(t - o), o =
    sync_offsets(K)[k], over the frames where both exist (t in [max(0, o), min(F, F + o))):
    a positive o means the mouth lags the audio by o frames. The best offset is the one
    of highest correlation, the smallest |o| among ties (within TIE; then the negative
    one); Sync-C's
    analogue is the best correlation, Sync-D's |best offset|. Constant series give 0.
    At least 3 overlapping frames are needed: max_offset <= F - 3.
    """
    if mouth.ndim != 2 or mouth.shape != envelope.shape:
        raise ReproInputError(
            f"sync_scores: mouth {tuple(mouth.shape)} and envelope {tuple(envelope.shape)} "
            "must both be [clips, frames]"
        )
    frames = mouth.shape[1]
    if isinstance(max_offset, bool) or int(max_offset) != max_offset or max_offset < 0:
        raise ReproInputError(f"max_offset: {max_offset!r} is not a whole number >= 0")
    max_offset = int(max_offset)
    if frames - max_offset < 3:
        raise ReproInputError(
            f"max_offset: {max_offset} leaves fewer than 3 overlapping frames of {frames}"
        )
    offsets = sync_offsets(max_offset)
    columns = []
    for o in offsets:
        lo, hi = max(0, o), min(frames, frames + o)
        columns.append(pearson(mouth[:, lo:hi], envelope[:, lo - o : hi - o]))
    curve = torch.stack(columns, dim=1)
    # Among the offsets within TIE of the maximum (equal but for rounding), the first in
    # the order nearest 0 first: argmax of a boolean keeps the first True.
    order = sorted(range(len(offsets)), key=lambda k: (abs(offsets[k]), offsets[k]))
    near_max = curve[:, order] >= curve.max(dim=1, keepdim=True).values - TIE
    best = torch.tensor(order)[near_max.byte().argmax(dim=1)]
    best_corr = curve.gather(1, best[:, None])[:, 0]
    return best_corr, torch.tensor(offsets)[best], curve


def derangement(n: int, generator: torch.Generator) -> Tensor:
    """A random permutation of range(n) with no fixed point ([n] int64, out[i] != i).

    A random order p of the clips, each clip taking the next one's place in it:
    out[p[i]] = p[(i + 1) % n] (a uniformly drawn n-cycle).
    """
    if n < 2:
        raise ReproInputError(f"shuffled control: needs at least 2 clips to shuffle, got {n}")
    order = torch.randperm(n, generator=generator)
    out = torch.empty(n, dtype=torch.long)
    out[order] = order.roll(-1)
    return out


def shuffled_envelopes(envelope: Tensor, generator: torch.Generator) -> Tensor:
    """The envelopes dealt to other clips (`derangement`): the sync control, what a mouth
    correlates with by chance when the audio is not its own."""
    return envelope[derangement(len(envelope), generator)]


def frechet_frames(features_gen: Tensor, features_real: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two sets of frame features [M, D] and
    [K, D] (repro.core.metrics.frechet_features; the frame FID with the identity
    encoder's features in place of Inception's)."""
    return frechet_features(features_gen, features_real, "frechet_frames")


# ---------------------------------------------------------------------------------------
# The judges
# ---------------------------------------------------------------------------------------


class SmallCNN(nn.Module):
    """conv-ReLU-pool-conv-ReLU-pool -> Linear-ReLU-Linear: [B, C, S, S] -> [B, out].

    The trunk of every judge (a few tens of thousands of weights at 16 x 16).
    """

    def __init__(self, in_channels: int, width: int, size: int, hidden: int, out_dim: int):
        super().__init__()
        if size % 4:
            raise ReproInputError(f"size: the judges need a frame size divisible by 4, got {size}")
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.mlp = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * width * (size // 4) ** 2, hidden),
            nn.ReLU(),
            nn.Linear(hidden, out_dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(self.conv(x))


class IdentityEncoder(nn.Module):
    """A frame [B, 3, S, S] in [-1, 1] -> an identity embedding; trained as a cosine
    classifier (logits = COSINE_SCALE * cos(embedding, class centre)) over the training
    identities, so that the cosine between embeddings is what says "same person"."""

    def __init__(self, size: int, width: int, embed_dim: int, num_identities: int):
        super().__init__()
        self.config = dict(
            size=size, width=width, embed_dim=embed_dim, num_identities=num_identities
        )
        self.body = SmallCNN(3, width, size, 4 * width, embed_dim)
        self.centres = nn.Parameter(torch.randn(num_identities, embed_dim) / math.sqrt(embed_dim))

    def embed(self, x: Tensor) -> Tensor:
        """The unit embedding [B, D] (identity similarity is its cosine)."""
        return F.normalize(self.body(x), dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        return COSINE_SCALE * self.embed(x) @ F.normalize(self.centres, dim=-1).T


class MouthReader(nn.Module):
    """A frame [B, 3, S, S] -> the mouth opening [B] (regressed on mouth_open in [0, 1])."""

    def __init__(self, size: int, width: int):
        super().__init__()
        self.config = dict(size=size, width=width)
        self.body = SmallCNN(3, width, size, 4 * width, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)[:, 0]


class SceneReader(nn.Module):
    """What a caption names: the head-motion class, read from the F - 1 frame differences
    stacked as channels, and the background class, read from each frame (logits averaged
    over the frames)."""

    def __init__(self, size: int, frames: int, width: int, num_motions: int, num_backgrounds: int):
        super().__init__()
        if frames < 2:
            raise ReproInputError(f"frames: motion needs at least 2 frames, got {frames}")
        self.config = dict(
            size=size,
            frames=frames,
            width=width,
            num_motions=num_motions,
            num_backgrounds=num_backgrounds,
        )
        self.motion = SmallCNN(3 * (frames - 1), width, size, 4 * width, num_motions)
        self.background = SmallCNN(3, width, size, 4 * width, num_backgrounds)

    def motion_logits(self, video: Tensor) -> Tensor:
        """[N, 3, F, S, S] in [-1, 1] -> [N, motions]."""
        n, c, f, h, w = video.shape
        if f != self.config["frames"]:
            raise ReproInputError(
                f"scene reader: trained on {self.config['frames']}-frame clips, got {f} frames"
            )
        diffs = video[:, :, 1:] - video[:, :, :-1]
        return self.motion(diffs.transpose(1, 2).reshape(n, (f - 1) * c, h, w))

    def background_logits(self, video: Tensor) -> Tensor:
        """[N, 3, F, S, S] in [-1, 1] -> [N, backgrounds], the mean of the frames' logits."""
        n, c, f, h, w = video.shape
        frames = video.transpose(1, 2).reshape(n * f, c, h, w)
        return self.background(frames).view(n, f, -1).mean(1)

    @torch.no_grad()
    def classify(self, video: Tensor, batch_size: int = 256) -> tuple[Tensor, Tensor]:
        """(motion class [N], background class [N]) of clips (uint8 or [-1, 1] floats)."""
        device = next(self.parameters()).device
        motions, backgrounds = [], []
        for start in range(0, len(video), batch_size):
            clip = to_float(video[start : start + batch_size]).to(device)
            motions.append(self.motion_logits(clip).argmax(1).cpu())
            backgrounds.append(self.background_logits(clip).argmax(1).cpu())
        return torch.cat(motions), torch.cat(backgrounds)


@dataclass
class Judges:
    """The three frozen evaluators, the class names they read, and how well they read
    real validation clips (`quality`, from `judges`)."""

    identity: IdentityEncoder
    mouth: MouthReader
    scene: SceneReader
    motions: list[str]
    backgrounds: list[str]
    quality: dict

    def modules(self) -> dict[str, nn.Module]:
        return {"identity": self.identity, "mouth": self.mouth, "scene": self.scene}

    def to(self, device) -> Judges:
        for module in self.modules().values():
            module.to(device)
        return self

    def eval(self) -> Judges:
        for module in self.modules().values():
            module.eval()
        return self


def save_judges(path, judges: Judges) -> None:
    """One safetensors file (kind "humo_judges"): every judge's weights under its name
    ("identity.", "mouth.", "scene."), their configs, class names and quality in metadata."""
    tensors = {
        f"{name}.{key}": value
        for name, module in judges.modules().items()
        for key, value in module.state_dict().items()
    }
    metadata = {
        "config": {name: module.config for name, module in judges.modules().items()},
        "motions": judges.motions,
        "backgrounds": judges.backgrounds,
        "quality": judges.quality,
    }
    save_tensors(path, tensors, JUDGES_KIND, metadata)


def load_judges(path) -> Judges:
    """The judges saved by `save_judges`, on the CPU in eval mode (errors name the file)."""
    path = Path(path)
    tensors, meta = load_tensors(path, kind=JUDGES_KIND)
    config = meta.get("config")
    if not isinstance(config, dict) or set(config) != {"identity", "mouth", "scene"}:
        raise ReproInputError(f"{path}: metadata 'config' must hold identity, mouth and scene")
    classes = {"identity": IdentityEncoder, "mouth": MouthReader, "scene": SceneReader}
    modules = {}
    for name, cls in classes.items():
        prefix = f"{name}."
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            module = cls(**config[name])
            module.load_state_dict(state, strict=True)
        except (TypeError, RuntimeError) as err:
            raise ReproInputError(f"{path}: {name} does not match {config[name]}: {err}") from err
        modules[name] = module
    return Judges(
        **modules,
        motions=list(meta.get("motions", [])),
        backgrounds=list(meta.get("backgrounds", [])),
        quality=dict(meta.get("quality", {})),
    ).eval()


# ---------------------------------------------------------------------------------------
# Reading the judges: per-frame helpers and the metrics of a set of clips
# ---------------------------------------------------------------------------------------


def _device_of(fn: Callable) -> torch.device:
    """The device of the module `fn` is (or is a method of); the CPU for a plain function."""
    module = fn if isinstance(fn, nn.Module) else getattr(fn, "__self__", None)
    if isinstance(module, nn.Module):
        return next(module.parameters()).device
    return torch.device("cpu")


@torch.no_grad()
def per_frame(fn: Callable[[Tensor], Tensor], video: Tensor, batch_size: int = 512) -> Tensor:
    """fn applied to every frame of video [N, 3, F, H, W] (uint8 or [-1, 1]) in batches
    -> [N, F, ...] on the CPU; fn runs on the device of the module it belongs to."""
    device = _device_of(fn)
    n, c, f, h, w = video.shape
    frames = video.transpose(1, 2).reshape(n * f, c, h, w)
    outs = [
        fn(to_float(frames[start : start + batch_size]).to(device)).cpu()
        for start in range(0, len(frames), batch_size)
    ]
    out = torch.cat(outs)
    return out.view(n, f, *out.shape[1:])


@torch.no_grad()
def embed_images(encoder: IdentityEncoder, images: Tensor, batch_size: int = 512) -> Tensor:
    """Unit identity embeddings [N, D] of images [N, 3, H, W] (uint8 or [-1, 1])."""
    return per_frame(encoder.embed, images[:, :, None], batch_size)[:, 0]


@torch.no_grad()
def identity_similarity(
    encoder: IdentityEncoder, video: Tensor, reference: Tensor, batch_size: int = 512
) -> Tensor:
    """ID-Cur's analogue per clip [N]: the mean over frames of cos(frame, reference)."""
    if reference.shape != (video.shape[0], video.shape[1], *video.shape[3:]):
        raise ReproInputError(
            f"identity_similarity: reference {tuple(reference.shape)} does not match the "
            f"video {tuple(video.shape)}"
        )
    frames = per_frame(encoder.embed, video, batch_size)  # [N, F, D]
    refs = embed_images(encoder, reference, batch_size)  # [N, D]
    return (frames * refs[:, None]).sum(-1).mean(1)


@torch.no_grad()
def mouth_series(reader: MouthReader, video: Tensor, batch_size: int = 512) -> Tensor:
    """The mouth opening the reader sees in every frame: [N, F]."""
    return per_frame(reader, video, batch_size)


@torch.no_grad()
def text_alignment(
    reader, video: Tensor, motion: Tensor, background: Tensor
) -> tuple[Tensor, Tensor]:
    """(motion right [N] bool, background right [N] bool): does the clip show the motion
    and the background its caption names? `reader` has classify(video) -> (motion class
    [N], background class [N]) (a SceneReader)."""
    predicted_motion, predicted_background = reader.classify(video)
    return predicted_motion == motion, predicted_background == background


def measure(
    judges: Judges,
    video: Tensor,
    clips: FaceClips,
    *,
    max_offset: int,
    seed: int,
    fid_reference: Tensor | None = None,
    batch_size: int = 512,
) -> dict:
    """The metrics of generated `video` [N, 3, F, H, W] made for the real `clips` (the same
    N rows: their reference, audio envelope, motion and background).

    id_sim: mean identity_similarity to the clips' references; sync_c / sync_offset: mean
    best correlation / mean |best offset| of the mouth series with the clips' envelopes;
    sync_c_shuffled: the same against other clips' envelopes (a derangement drawn from
    `seed`: the chance level); motion_acc / background_acc: the scene reader's accuracy
    against the captions' classes; text_align: the fraction of clips where both are
    right (the clip shows its whole caption); fid: the frame Fréchet distance of the
    identity encoder's unit embeddings (its cosine classifier leaves their norm arbitrary)
    against the frames of `fid_reference` (default: the real clips themselves). sync_curve / sync_curve_shuffled: the mean correlation per offset.
    """
    if video.shape != clips.video.shape:
        raise ReproInputError(
            f"generated video {tuple(video.shape)} does not match its real clips "
            f"{tuple(clips.video.shape)}"
        )
    id_sim = identity_similarity(judges.identity, video, clips.reference, batch_size)
    mouth = mouth_series(judges.mouth, video, batch_size)
    best, offset, curve = sync_scores(mouth, clips.envelope, max_offset)
    generator = torch.Generator().manual_seed(int(seed))
    shuffled_best, _, shuffled_curve = sync_scores(
        mouth, shuffled_envelopes(clips.envelope, generator), max_offset
    )
    motion_ok, background_ok = text_alignment(judges.scene, video, clips.motion, clips.background)
    reference = clips.video if fid_reference is None else fid_reference
    features = per_frame(judges.identity.embed, video, batch_size).flatten(0, 1)
    real_features = per_frame(judges.identity.embed, reference, batch_size).flatten(0, 1)
    return {
        "n_clips": len(video),
        "id_sim": float(id_sim.mean()),
        "sync_c": float(best.mean()),
        "sync_offset": float(offset.abs().float().mean()),
        "sync_c_shuffled": float(shuffled_best.mean()),
        "motion_acc": float(motion_ok.float().mean()),
        "background_acc": float(background_ok.float().mean()),
        "text_align": float((motion_ok & background_ok).float().mean()),
        "fid": frechet_frames(features, real_features),
        "max_offset": int(max_offset),
        "sync_offsets": sync_offsets(int(max_offset)),
        "sync_curve": curve.mean(0).tolist(),
        "sync_curve_shuffled": shuffled_curve.mean(0).tolist(),
    }


# ---------------------------------------------------------------------------------------
# Data: the talking-faces files and the generated sets
# ---------------------------------------------------------------------------------------


@dataclass
class FaceClips:
    """What the judges read of a talking-faces split (see repro.foundation.faces)."""

    video: Tensor  # uint8 [N, 3, F, H, W]
    reference: Tensor  # uint8 [N, 3, H, W]
    mouth_open: Tensor  # float32 [N, F]
    envelope: Tensor  # float32 [N, F]
    identity: Tensor  # int64 [N]
    motion: Tensor  # int64 [N]
    background: Tensor  # int64 [N]
    motions: list[str]
    backgrounds: list[str]

    def __len__(self) -> int:
        return len(self.video)

    def rows(self, index: Tensor) -> FaceClips:
        """The clips at `index`, in that order."""
        tensors = {name: getattr(self, name)[index] for name in FACES_TENSORS}
        return FaceClips(**tensors, motions=self.motions, backgrounds=self.backgrounds)


def read_clips(path) -> FaceClips:
    """A talking-faces split (kind "talking_faces"), checked: errors name the file."""
    path = Path(path)
    tensors, meta = load_tensors(path, kind=FACES_KIND, required=FACES_TENSORS)
    video = tensors["video"]
    if video.ndim != 5 or video.shape[1] != 3 or video.dtype != torch.uint8:
        raise ReproInputError(f"{path}: video must be uint8 [N, 3, F, H, W], got {video.dtype} "
                              f"{tuple(video.shape)}")  # fmt: skip
    n, _, f, h, w = video.shape
    expected = {
        "reference": (n, 3, h, w),
        "mouth_open": (n, f),
        "envelope": (n, f),
        "identity": (n,),
        "motion": (n,),
        "background": (n,),
    }
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ReproInputError(
                f"{path}: {name} is {tuple(tensors[name].shape)}, expected {shape} "
                f"for video {tuple(video.shape)}"
            )
    motions, backgrounds = meta.get("motions"), meta.get("backgrounds")
    if not isinstance(motions, list) or not isinstance(backgrounds, list):
        raise ReproInputError(f"{path}: metadata must name the motions and backgrounds")
    for name, names in (("motion", motions), ("background", backgrounds)):
        labels = tensors[name]
        if n and (labels.min() < 0 or labels.max() >= len(names)):
            raise ReproInputError(f"{path}: {name} labels outside the {len(names)} classes")
    return FaceClips(
        video=video,
        reference=tensors["reference"],
        mouth_open=tensors["mouth_open"].float(),
        envelope=tensors["envelope"].float(),
        identity=tensors["identity"].long(),
        motion=tensors["motion"].long(),
        background=tensors["background"].long(),
        motions=[str(m) for m in motions],
        backgrounds=[str(b) for b in backgrounds],
    )


def read_generated(path, test: FaceClips) -> tuple[Tensor, Tensor, dict]:
    """(video uint8 [N, 3, F, H, W], index [N] of test rows, row keys) of a generated set
    (kind "humo_generated"), checked against the test split: errors name the file."""
    path = Path(path)
    tensors, meta = load_tensors(path, kind=GENERATED_KIND, required=GENERATED_TENSORS)
    video, index = tensors["video"], tensors["index"].long()
    if video.dtype != torch.uint8 or video.ndim != 5:
        raise ReproInputError(f"{path}: video must be uint8 [N, 3, F, H, W], got {video.dtype} "
                              f"{tuple(video.shape)}")  # fmt: skip
    if video.shape[1:] != test.video.shape[1:]:
        raise ReproInputError(
            f"{path}: clips {tuple(video.shape[1:])} do not match the test split's "
            f"{tuple(test.video.shape[1:])}"
        )
    if index.shape != (len(video),):
        raise ReproInputError(f"{path}: index {tuple(index.shape)} must be [{len(video)}]")
    if len(index) and (index.min() < 0 or index.max() >= len(test)):
        raise ReproInputError(
            f"{path}: index outside the {len(test)} rows of the test split "
            f"({int(index.min())}..{int(index.max())})"
        )
    missing = [k for k in ROW_KEYS if k not in meta]
    if missing:
        raise ReproInputError(f"{path}: metadata lacks {missing}")
    return video, index, {k: meta[k] for k in ROW_KEYS}


# ---------------------------------------------------------------------------------------
# Training the judges
# ---------------------------------------------------------------------------------------


def judge_params(params: dict) -> dict:
    """JUDGE_DEFAULTS updated with `params`; unknown keys are refused (named)."""
    unknown = sorted(set(params) - set(JUDGE_DEFAULTS))
    if unknown:
        raise ReproInputError(f"params: unknown keys {unknown}, allowed {sorted(JUDGE_DEFAULTS)}")
    return {**JUDGE_DEFAULTS, **params}


def _fit(module: nn.Module, loss_fn: Callable[[int], Tensor], steps: int, p: dict, desc: str):
    """fit with the judges' optimiser settings, no checkpoints (a judge trains in seconds)."""
    module.train()
    summary = fit(
        modules={desc: module},
        parameters=list(module.parameters()),
        loss_fn=loss_fn,
        steps=steps,
        lr=float(p["lr"]),
        weight_decay=float(p["weight_decay"]),
        warmup_fraction=float(p["warmup_fraction"]),
        log_every=max(1, steps // 4),
        desc=desc,
    )
    module.eval()
    return summary


def train_judges(
    train: FaceClips, val: FaceClips, params: dict, device: torch.device | None = None
) -> tuple[Judges, dict]:
    """Train the three judges on `train` (each for `epochs` passes over its examples, see
    JUDGE_DEFAULTS; AdamW with warm-up + cosine via repro.core.training.fit, batches a
    pure function of (seed, step)); return them frozen, with their quality on `val`
    (`judge_quality`) and the training losses, steps and seconds in the metrics."""
    p = judge_params(params)
    device = torch.device("cpu") if device is None else device
    n, _, frames, size, _ = train.video.shape
    batch, seed = int(p["batch_size"]), int(p["seed"])
    epochs = int(p["epochs"])
    steps = {
        "identity": math.ceil(epochs * n * frames / batch),
        "mouth": math.ceil(epochs * n * frames / batch),
        "scene": math.ceil(epochs * n / batch),
    }
    width, embed_dim = int(p["width"]), int(p["embed_dim"])
    labels, identity = torch.unique(train.identity, return_inverse=True)
    with torch.random.fork_rng(devices=[]):  # the same seed, the same judges
        torch.manual_seed(seed)
        judges = Judges(
            identity=IdentityEncoder(size, width, embed_dim, len(labels)),
            mouth=MouthReader(size, width),
            scene=SceneReader(size, frames, width, len(train.motions), len(train.backgrounds)),
            motions=train.motions,
            backgrounds=train.backgrounds,
            quality={},
        ).to(device)

    def draw(step: int) -> tuple[torch.Generator, Tensor, Tensor]:
        """(generator, clips [B], frames [B]) of one step."""
        g = step_generator(seed, step)
        return (
            g,
            torch.randint(n, (batch,), generator=g),
            torch.randint(frames, (batch,), generator=g),
        )

    def identity_loss(step: int) -> Tensor:
        g, clip, frame = draw(step)
        x = train.video[clip, :, frame]  # [B, 3, H, W]
        use_reference = torch.rand(batch, generator=g) < float(p["reference_fraction"])
        x = torch.where(use_reference[:, None, None, None], train.reference[clip], x)
        logits = judges.identity(to_float(x).to(device))
        return F.cross_entropy(logits, identity[clip].to(device))

    def mouth_loss(step: int) -> Tensor:
        _, clip, frame = draw(step)
        predicted = judges.mouth(to_float(train.video[clip, :, frame]).to(device))
        return F.mse_loss(predicted, train.mouth_open[clip, frame].to(device))

    def scene_loss(step: int) -> Tensor:
        _, clip, frame = draw(step)
        video = to_float(train.video[clip]).to(device)
        motion = F.cross_entropy(judges.scene.motion_logits(video), train.motion[clip].to(device))
        # The background from one frame of each clip (classify averages over the frames).
        one_frame = video[torch.arange(batch, device=device), :, frame.to(device)]
        background = judges.scene.background(one_frame)
        return motion + F.cross_entropy(background, train.background[clip].to(device))

    summaries, seconds = {}, {}
    for name, loss_fn in (
        ("identity", identity_loss),
        ("mouth", mouth_loss),
        ("scene", scene_loss),
    ):
        started = time.perf_counter()
        summaries[name] = _fit(judges.modules()[name], loss_fn, steps[name], p, f"judge_{name}")
        seconds[name] = time.perf_counter() - started
    judges.quality = judge_quality(judges, val, int(p["max_offset"]), seed)
    metrics = {
        **judges.quality,
        **{f"{name}_steps": count for name, count in steps.items()},
        **{f"{name}_final_loss": s["final_loss"] for name, s in summaries.items()},
        **{f"{name}_seconds": round(s, 3) for name, s in seconds.items()},
    }
    return judges, metrics


@torch.no_grad()
def judge_quality(judges: Judges, clips: FaceClips, max_offset: int, seed: int = 0) -> dict:
    """How well the judges read REAL clips (the validation split: identities unseen in
    training).

    identity_top1: each clip retrieves the reference (among all the clips' references) of
    highest mean frame cosine; right when that reference shows the clip's identity (chance
    ~ 1 / identities). id_sim_same / id_sim_other: mean cosine of a clip to its own
    reference / to references of other identities. mouth_r: Pearson r of the mouth reader
    with mouth_open over all frames; sync_c / sync_offset / sync_c_shuffled: the sync
    scores of the real clips (best offset should be 0; the shuffled control's derangement
    drawn from `seed`). motion_acc / background_acc.
    """
    frames = per_frame(judges.identity.embed, clips.video).mean(1)  # [N, D]
    refs = embed_images(judges.identity, clips.reference)
    similarity = frames @ refs.T  # [N clips, N references]: mean over frames of the cosine
    same = clips.identity[:, None] == clips.identity[None, :]
    retrieved = clips.identity[similarity.argmax(1)]
    mouth = mouth_series(judges.mouth, clips.video)
    best, offset, _ = sync_scores(mouth, clips.envelope, max_offset)
    generator = torch.Generator().manual_seed(int(seed))
    shuffled, _, _ = sync_scores(mouth, shuffled_envelopes(clips.envelope, generator), max_offset)
    motion_ok, background_ok = text_alignment(
        judges.scene, clips.video, clips.motion, clips.background
    )
    return {
        "identity_top1": float((retrieved == clips.identity).float().mean()),
        "identity_chance": 1.0 / len(torch.unique(clips.identity)),
        "id_sim_same": float(similarity.diagonal().mean()),
        "id_sim_other": float(similarity[~same].mean()) if (~same).any() else math.nan,
        "mouth_r": float(pearson(mouth.flatten(), clips.mouth_open.flatten())),
        "mouth_mae": float((mouth - clips.mouth_open).abs().mean()),
        "sync_c": float(best.mean()),
        "sync_offset": float(offset.abs().float().mean()),
        "sync_c_shuffled": float(shuffled.mean()),
        "motion_acc": float(motion_ok.float().mean()),
        "background_acc": float(background_ok.float().mean()),
    }


# ---------------------------------------------------------------------------------------
# The stages
# ---------------------------------------------------------------------------------------


def judges_main(argv: Sequence[str] | None = None) -> None:
    """Stage humo_judges: train the judges on the real training clips, report their
    quality on the validation clips, save them (one safetensors file)."""
    from repro.core.stage import Stage

    stage = Stage(
        judges_main.__doc__,
        paper="humo",
        out="the judges (.safetensors, kind humo_judges)",
        metrics=True,
    )
    stage.parser.prog = "repro.humo.evaluate"
    stage.parser.add_argument("command", choices=["judges"])
    stage.parser.add_argument("--faces-train", required=True, help="talking faces, train split")
    stage.parser.add_argument("--faces-val", required=True, help="talking faces, val split")
    args = stage.start(argv)
    train, val = read_clips(args.faces_train), read_clips(args.faces_val)
    if val.video.shape[1:] != train.video.shape[1:]:
        raise ReproInputError(
            f"{args.faces_val}: clips {tuple(val.video.shape[1:])} differ from the train "
            f"split's {tuple(train.video.shape[1:])}"
        )
    if (val.motions, val.backgrounds) != (train.motions, train.backgrounds):
        raise ReproInputError(f"{args.faces_val}: motion / background classes differ from train")
    judges, metrics = train_judges(train, val, stage.params, device=stage.device)
    if stage.is_main:
        save_judges(args.out, judges)
    metrics["seconds"] = time.perf_counter() - stage.started
    stage.finish(metrics, artifacts=[args.out])


def metric_params(params: dict) -> dict:
    """METRIC_DEFAULTS updated with `params`; unknown keys are refused (named)."""
    unknown = sorted(set(params) - set(METRIC_DEFAULTS))
    if unknown:
        raise ReproInputError(f"params: unknown keys {unknown}, allowed {sorted(METRIC_DEFAULTS)}")
    return {**METRIC_DEFAULTS, **params}


def metrics_main(argv: Sequence[str] | None = None) -> None:
    """Stage humo_metrics: one generated set (or, with --real, the test clips
    themselves) measured by the frozen judges: one JSON row of repro.humo.table."""
    from repro.core.stage import Stage

    stage = Stage(metrics_main.__doc__, paper="humo", out="the metric row (JSON)")
    stage.parser.prog = "repro.humo.evaluate"
    stage.parser.add_argument("command", choices=["metrics"])
    add = stage.parser.add_argument
    add("--judges", required=True, help="the judges (repro.humo.evaluate judges)")
    add("--faces-test", required=True, help="talking faces, test split")
    source = stage.parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--generated", help="a generated set (kind humo_generated), or a directory of them"
    )
    source.add_argument("--real", action="store_true", help="measure the test clips themselves")
    add("--fid-reference", help="talking faces whose frames the FID compares with "
        "(default: the test clips the set was made for)")  # fmt: skip
    args = stage.start(argv)
    p = metric_params(stage.params)
    judges = load_judges(args.judges).to(stage.device)
    test = read_clips(args.faces_test)
    if (
        test.video.shape[2] != judges.scene.config["frames"]
        or test.video.shape[3] != (judges.identity.config["size"])
    ):
        raise ReproInputError(
            f"{args.faces_test}: clips {tuple(test.video.shape[1:])} are not what the judges "
            f"in {args.judges} read ({judges.scene.config['frames']} frames of "
            f"{judges.identity.config['size']} pixels)"
        )
    if (test.motions, test.backgrounds) != (judges.motions, judges.backgrounds):
        raise ReproInputError(
            f"{args.faces_test}: motion / background classes differ from the judges' "
            f"({args.judges})"
        )
    fid_reference = read_clips(args.fid_reference).video if args.fid_reference else None
    if args.real:
        count = len(test) if p["clips"] is None else min(int(p["clips"]), len(test))
        index = torch.arange(count)
        sets = [(test.video[index], index, {**REAL_ROW, "seed": int(p["seed"])})]
    else:
        sets = [read_generated(path, test) for path in generated_files(args.generated)]
    rows = []
    for video, index, keys in sets:
        rows.append(
            {
                **keys,
                **measure(
                    judges,
                    video,
                    test.rows(index),
                    max_offset=int(p["max_offset"]),
                    seed=int(p["seed"]),
                    fid_reference=fid_reference,
                    batch_size=int(p["batch_size"]),
                ),
            }
        )
    # One generated file (or --real): one JSON object; a directory: a list of them.
    single = args.real or Path(args.generated).is_file()
    if stage.is_main:
        write_json(args.out, rows[0] if single else rows)
    summary = {}
    for row in rows:
        prefix = "" if single else f"{row['task']}_{row['cfg']}_"
        summary.update({prefix + k: row[k] for k in ("n_clips", *ROW_METRICS)})
    stage.finish(
        summary,
        artifacts=[args.out],
        params={**p, **{k: rows[0][k] for k in ("variant", "seed")}},
    )


def generated_files(path) -> list[Path]:
    """--generated: one humo_generated file, or every *.safetensors of a directory (all
    the sets of one model, written by repro.humo.generate sample), sorted."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ReproInputError(f"{path}: no generated sets (*.safetensors) in it")
        return files
    return [path]


COMMANDS = {"judges": judges_main, "metrics": metrics_main}


def main(argv: Sequence[str] | None = None) -> None:
    """`judges ...` or `metrics ...`: the subcommand's own stage parses the command line
    (the subcommand included, so that the logged command can be rerun as it is)."""
    from repro.core.stage import dispatch

    dispatch(COMMANDS, argv, "repro.humo.evaluate", __doc__)


if __name__ == "__main__":
    from repro.core.stage import run

    run(main)
