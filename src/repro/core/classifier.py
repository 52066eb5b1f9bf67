"""A small CNN on 8x8 digits: the feature network of FID / IS at tiny scale.

At paper scale FID and IS use Inception-v3 trained on ImageNet; at tiny scale the
images are 8x8 digits, so the same two metrics are computed on the penultimate
features and the logits of this classifier, trained on the real digits' train split
(the best epoch chosen on val, the test split touched once, by the CLI).
"""

from __future__ import annotations

import copy
import logging
import os
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from repro.core.errors import ReproInputError
from repro.core.io import load_tensors, save_tensors

log = logging.getLogger("repro")

KIND = "digit_classifier"

DEFAULT_PARAMS = {
    "epochs": 30,
    "batch_size": 64,
    "lr": 2e-3,
    "weight_decay": 1e-4,
    "seed": 0,
    "augment": True,
}


class DigitClassifier(nn.Module):
    """conv-conv-pool-conv + MLP on [N, 1, S, S] images in [-1, 1]."""

    def __init__(
        self, num_classes: int = 10, image_size: int = 8, width: int = 32, feature_dim: int = 64
    ):
        super().__init__()
        if image_size % 2:
            raise ValueError(f"image_size must be even (one 2x pool), got {image_size}")
        self._config = {
            "num_classes": int(num_classes),
            "image_size": int(image_size),
            "width": int(width),
            "feature_dim": int(feature_dim),
        }
        self.conv = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
        )
        flat = 2 * width * (image_size // 2) ** 2
        self.mlp = nn.Sequential(
            nn.Flatten(), nn.Dropout(0.2), nn.Linear(flat, feature_dim), nn.ReLU()
        )
        self.head = nn.Linear(feature_dim, num_classes)

    @property
    def config(self) -> dict:
        return dict(self._config)

    @property
    def num_features(self) -> int:
        # torchmetrics' FID reads this instead of probing with a 3x299x299 dummy image.
        return self._config["feature_dim"]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations [N, feature_dim]."""
        return self.mlp(self.conv(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def random_shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shift every image by a random whole number of pixels in [-max_shift, max_shift],
    filling with the background value -1."""
    n, _, h, w = x.shape
    shifts = torch.randint(-max_shift, max_shift + 1, (n, 2), generator=gen)
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    rows = (torch.arange(h).view(1, h) + max_shift - shifts[:, :1]).view(n, 1, h, 1)
    cols = (torch.arange(w).view(1, w) + max_shift - shifts[:, 1:]).view(n, 1, 1, w)
    batch = torch.arange(n).view(n, 1, 1, 1)
    return padded[batch, 0, rows, cols]


@torch.no_grad()
def accuracy(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1024
) -> float:
    """The fraction of `images` classified as `labels`, the model run on its own device."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = model(images[start : start + batch_size].to(device)).to(labels.device)
        correct += int((logits.argmax(1) == labels[start : start + batch_size]).sum())
    model.train(was_training)
    return correct / max(1, len(images))


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def train_classifier(
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    params: dict,
    device: torch.device | None = None,
) -> tuple[DigitClassifier, dict]:
    """Train with AdamW + cosine decay; return the epoch with the best VAL accuracy.

    params: epochs, batch_size, lr, weight_decay, seed, augment (+ optional width,
    feature_dim). Deterministic for a seed (on the same thread count). The model
    trains on `device` (default: the CPU, where it is built); batches are drawn and
    augmented on the CPU and moved there.
    """
    unknown = sorted(set(params) - set(DEFAULT_PARAMS) - {"width", "feature_dim"})
    if unknown:
        raise ReproInputError(f"params: unknown keys {unknown}, allowed {sorted(DEFAULT_PARAMS)}")
    p = {**DEFAULT_PARAMS, **params}
    x_train, y_train = train
    x_val, y_val = val
    num_classes = int(max(y_train.max(), y_val.max())) + 1

    # A private RNG stream: the same seed gives the same model whatever ran before.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(p["seed"]))
        model = DigitClassifier(
            num_classes=num_classes,
            image_size=x_train.shape[-1],
            width=int(p.get("width", 32)),
            feature_dim=int(p.get("feature_dim", 64)),
        ).to(device)
        gen = torch.Generator().manual_seed(int(p["seed"]))
        opt = torch.optim.AdamW(
            model.parameters(), lr=float(p["lr"]), weight_decay=float(p["weight_decay"])
        )
        epochs, batch_size = int(p["epochs"]), int(p["batch_size"])
        steps = epochs * -(-len(x_train) // batch_size)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=float(p["lr"]), total_steps=max(1, steps), pct_start=0.15
        )

        best = (-1.0, 0, copy.deepcopy(model.state_dict()))
        history = []
        start_time = time.perf_counter()
        for epoch in tqdm(range(1, epochs + 1), desc="classifier", disable=None):
            model.train()
            order = torch.randperm(len(x_train), generator=gen)
            total = 0.0
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                x = x_train[idx]
                if p["augment"]:
                    x = random_shift(x, gen)
                loss = F.cross_entropy(model(x.to(device)), y_train[idx].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(idx)
            val_acc = accuracy(model, x_val, y_val)
            history.append(
                {"epoch": epoch, "train_loss": total / len(x_train), "val_accuracy": val_acc}
            )
            if val_acc > best[0]:
                best = (val_acc, epoch, copy.deepcopy(model.state_dict()))

    model.load_state_dict(best[2])
    model.eval()
    metrics = {
        "val_accuracy": best[0],
        "best_epoch": best[1],
        "epochs": epochs,
        "params": count_params(model),
        "train_seconds": round(time.perf_counter() - start_time, 3),
        "history": history,
        "hparams": p,
    }
    log.info("classifier: best val accuracy %.4f at epoch %d", best[0], best[1])
    return model, metrics


def save_classifier(
    path: str | os.PathLike, model: DigitClassifier, metrics: dict | None = None
) -> None:
    """safetensors of the state dict, kind 'digit_classifier', config (+ metrics) in metadata."""
    meta = {"config": model.config}
    if metrics is not None:
        meta["metrics"] = {k: v for k, v in metrics.items() if k != "history"}
    save_tensors(path, model.state_dict(), KIND, meta)


def load_classifier(path: str | os.PathLike) -> DigitClassifier:
    """The classifier saved by save_classifier, in eval mode (errors name the file)."""
    path = Path(path)
    tensors, meta = load_tensors(path, kind=KIND)
    config = meta.get("config")
    if not isinstance(config, dict):
        raise ReproInputError(f"{path}: metadata has no classifier 'config'")
    try:
        model = DigitClassifier(**config)
        model.load_state_dict(tensors, strict=True)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ReproInputError(f"{path}: does not match DigitClassifier({config}): {err}") from err
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    from repro.core.data import load_image_dataset
    from repro.core.stage import Stage

    stage = Stage(
        "Train the digit classifier used as the FID / IS feature network (8x8 digits; 16x16 glyphs for SLA).",
        paper="core",
        out="classifier .safetensors to write",
        metrics=True,
    )
    stage.parser.prog = "repro.core.classifier"
    stage.parser.add_argument(
        "--data-dir", type=Path, required=True, help="holds train/val/test.safetensors"
    )
    stage.parser.add_argument(
        "--kind",
        default="digits",
        choices=("digits", "glyphs"),
        help="what the split files hold (glyphs: SLA's image experiment at 16 x 16)",
    )
    args = stage.start(argv)

    splits = {
        name: load_image_dataset(args.data_dir / f"{name}.safetensors", kind=args.kind)
        for name in ("train", "val", "test")
    }
    model, metrics = train_classifier(
        (splits["train"].images, splits["train"].labels),
        (splits["val"].images, splits["val"].labels),
        stage.params,
        device=stage.device,
    )
    # The one and only look at the test split, after model selection on val.
    metrics["test_accuracy"] = accuracy(model, splits["test"].images, splits["test"].labels)
    log.info("classifier: test accuracy %.4f", metrics["test_accuracy"])
    save_classifier(args.out, model, metrics)
    stage.finish(metrics)  # the whole metrics JSON; MLflow gets its numbers


if __name__ == "__main__":
    from repro.core.stage import run

    run(main)
