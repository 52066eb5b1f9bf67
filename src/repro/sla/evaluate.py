"""Stages sla_judge and sla_eval: frame FID and the headline table results/sla_quality.csv.

The paper scores videos with VBench. The talking faces have no such judge, so a small
frame encoder is trained on the REAL training frames (identity and background
classes, from single frames) and frozen; its penultimate features stand in for
Inception's in a frame FID (Fréchet distance between Gaussians fitted to the features
of generated and real test frames), and its background head reads back the
background each test caption names (background_acc, a text-alignment measure).

    python -m repro.sla.evaluate judge --faces-train data/sla/faces/train.safetensors \
        --faces-val data/sla/faces/val.safetensors --out models/sla/judge.safetensors \
        --metrics results/sla/judge.json --params '{"steps": 400, ...}'
    python -m repro.sla.evaluate table --judge models/sla/judge.safetensors \
        --faces-val ... --faces-test ... --rows results/sla/rows/*.json \
        --out results/sla_quality.csv --params '{"order": ["full", "sla", ...]}'

`judge` reports how well the frozen encoder reads REAL validation clips (background
accuracy; identities are disjoint across splits). `table` adds frame_fid and
background_acc to each row of sla_sample and one row "real": the val clips against the
test clips, the floor a generator is read against.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from repro.core.errors import ReproInputError

log = logging.getLogger("repro")

JUDGE_KIND = "sla_judge"
FEATURES = 64


class FrameEncoder(nn.Module):
    """RGB frame [N, 3, H, W] in [-1, 1] -> features [N, FEATURES]; heads for identity and
    background on top (trained on real frames, frozen for scoring)."""

    def __init__(self, identities: int, backgrounds: int) -> None:
        super().__init__()
        self.identities, self.backgrounds = identities, backgrounds
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, FEATURES, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.identity_head = nn.Linear(FEATURES, identities)
        self.background_head = nn.Linear(FEATURES, backgrounds)

    def forward(self, frames: Tensor) -> Tensor:
        return self.body(frames)


def frames_of(video: Tensor) -> Tensor:
    """uint8 [N, 3, F, H, W] -> float frames [N * F, 3, H, W] in [-1, 1]."""
    if video.ndim != 5 or video.shape[1] != 3:
        raise ReproInputError(f"video must be [N, 3, F, H, W], got {tuple(video.shape)}")
    return video.permute(0, 2, 1, 3, 4).flatten(0, 1).float() / 127.5 - 1.0


@torch.no_grad()
def features(encoder: FrameEncoder, video: Tensor, batch_size: int = 512) -> Tensor:
    frames = frames_of(video)
    return torch.cat(
        [encoder(frames[i : i + batch_size]) for i in range(0, len(frames), batch_size)]
    )


@torch.no_grad()
def background_accuracy(
    encoder: FrameEncoder, video: Tensor, labels: Tensor, frame_features: Tensor | None = None
) -> float:
    """Fraction of clips whose background (logits averaged over frames) is `labels`;
    `frame_features` = features(encoder, video) when the caller has them already."""
    n, frames = video.shape[0], video.shape[2]
    if frame_features is None:
        frame_features = features(encoder, video)
    logits = encoder.background_head(frame_features).view(n, frames, -1).mean(1)
    return (logits.argmax(-1) == labels).float().mean().item()


def frame_fid(features_gen: Tensor, features_real: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two sets of frame features."""
    from repro.core.metrics import frechet_features

    return frechet_features(features_gen, features_real, "frame_fid")


def train_judge(train, params: dict) -> FrameEncoder:
    """The frame encoder, trained on single real training frames: cross-entropy on the
    identity plus cross-entropy on the background (repro.core.training.fit)."""
    from repro.core.distributed import step_generator
    from repro.core.training import fit

    identities = sorted(set(train.identity.tolist()))
    index = torch.full((max(identities) + 1,), -1, dtype=torch.long)
    index[torch.tensor(identities)] = torch.arange(len(identities))
    n, frames = train.video.shape[0], train.video.shape[2]
    seed, batch = int(params["seed"]), int(params["batch_size"])
    torch.manual_seed(seed)
    encoder = FrameEncoder(len(identities), len(train.backgrounds))

    def loss_fn(step: int) -> Tensor:
        gen = step_generator(seed, step)
        clip = torch.randint(n, (batch,), generator=gen)
        frame = torch.randint(frames, (batch,), generator=gen)
        x = train.video[clip, :, frame].float() / 127.5 - 1.0
        h = encoder(x)
        return F.cross_entropy(
            encoder.identity_head(h), index[train.identity[clip]]
        ) + F.cross_entropy(encoder.background_head(h), train.background[clip])

    encoder.train()
    fit(
        modules={"encoder": encoder},
        parameters=list(encoder.parameters()),
        loss_fn=loss_fn,
        steps=int(params["steps"]),
        lr=float(params["lr"]),
        warmup_fraction=0.05,
        desc="sla_judge",
    )
    return encoder.eval()


def save_judge(path, encoder: FrameEncoder) -> None:
    from repro.core.io import save_tensors

    save_tensors(
        path,
        encoder.state_dict(),
        JUDGE_KIND,
        {"identities": encoder.identities, "backgrounds": encoder.backgrounds},
    )


def load_judge(path) -> FrameEncoder:
    from repro.core.io import load_tensors

    tensors, meta = load_tensors(path, kind=JUDGE_KIND)
    try:
        encoder = FrameEncoder(int(meta["identities"]), int(meta["backgrounds"]))
        encoder.load_state_dict(tensors)
    except (KeyError, RuntimeError, TypeError, ValueError) as err:
        raise ReproInputError(f"{path}: not a frame encoder of this shape ({err})") from err
    return encoder.eval()


def _stage(command: str, out: str, metrics: bool = False):
    from repro.core.stage import Stage

    stage = Stage(__doc__, paper="sla", out=out, metrics=metrics)
    stage.parser.prog = "repro.sla.evaluate"
    stage.parser.add_argument("command", choices=[command])
    return stage


def judge_main(argv: Sequence[str] | None = None) -> None:
    from repro.foundation.faces import load_faces

    stage = _stage("judge", "the frame encoder (safetensors)", metrics=True)
    stage.parser.add_argument("--faces-train", required=True)
    stage.parser.add_argument("--faces-val", required=True)
    args = stage.start(argv)
    for key in ("steps", "batch_size", "lr", "seed"):
        if key not in stage.params:
            raise ReproInputError(f"sla.quality.judge.{key}: missing")
    train, val = load_faces(args.faces_train), load_faces(args.faces_val)
    encoder = train_judge(train, stage.params)
    save_judge(args.out, encoder)
    accuracy = background_accuracy(encoder, val.video, val.background)
    stage.finish({"val_background_accuracy": accuracy, "train_clips": len(train.video)})


def table_main(argv: Sequence[str] | None = None) -> None:
    from repro.core.io import load_tensors, read_json
    from repro.foundation.faces import load_faces
    from repro.sla import table
    from repro.sla.sample import SAMPLES_KIND

    stage = _stage("table", "results/sla_quality.csv")
    stage.parser.add_argument("--judge", required=True)
    stage.parser.add_argument("--faces-val", required=True)
    stage.parser.add_argument("--faces-test", required=True)
    stage.parser.add_argument("--rows", nargs="+", required=True, help="sla_sample's JSON rows")
    args = stage.start(argv)
    encoder = load_judge(args.judge)
    val, test = load_faces(args.faces_val), load_faces(args.faces_test)
    real = features(encoder, test.video)
    rows, n = [], len(val.video)
    for path in args.rows:
        row = dict(read_json(path))
        if "samples" not in row:
            raise ReproInputError(f"{path}: not an sla_sample row (no 'samples')")
        tensors, meta = load_tensors(row["samples"], kind=SAMPLES_KIND, required=("video",))
        video = tensors["video"]
        if video.shape[2:] != test.video.shape[2:]:
            raise ReproInputError(
                f"{row['samples']}: clips {tuple(video.shape[2:])}, the test clips "
                f"{tuple(test.video.shape[2:])}"
            )
        generated = features(encoder, video)  # once, for both scores
        row["frame_fid"] = frame_fid(generated, real)
        row["background_acc"] = background_accuracy(
            encoder, video, test.background[: len(video)], generated
        )
        rows.append(row)
        n = len(video)
    rows.append(
        {
            "variant": "real",
            "attention": "real",
            "phi": "none",
            "k_h": float("nan"),
            "k_l": float("nan"),
            "sparsity": float("nan"),
            "seed": 0,
            "steps": 0,
            "frame_fid": frame_fid(features(encoder, val.video), real),
            # the judge on the real clips of the same captions: the ceiling
            "background_acc": background_accuracy(encoder, test.video[:n], test.background[:n]),
        }
    )
    order = stage.params.get("order")
    table.write(rows, args.out, order=order)
    log.info("%s: %d rows", args.out, len(rows))
    stage.finish({"rows": len(rows)})


COMMANDS = {"judge": judge_main, "table": table_main}


def main(argv: Sequence[str] | None = None) -> None:
    from repro.core.stage import dispatch

    dispatch(COMMANDS, argv, "repro.sla.evaluate", __doc__)


if __name__ == "__main__":
    from repro.core.stage import run

    run(main)
