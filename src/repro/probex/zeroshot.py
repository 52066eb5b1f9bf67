"""Stage probex_zeroshot: ProbeX's zero-shot classification of models (generative ProbeX):
a probe of one layer of a LoRA zoo (repro.probex.lora_zoo) aligned with the text
embeddings of the class names, so that models of classes never trained on are
classified by their classes' text alone.

    python -m repro.probex.zeroshot --zoo data/probex/lora_zoo/manifest.json \
        --out results/probex/runs/zeroshot_s0.csv --metrics results/probex/runs/zeroshot_s0.json \
        --params '{"seed": 0, "classnames": ["zero", ..], "foundation": {"clip": {...}},
                   "zeroshot": {"heldout_classes": 3,
                                "layer": "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q",
                                "prompt": "a glyph of the digit {classname}",
                                "rank_u": 8, "rank_v": 8, "rank_t": 32, "temperature": null,
                                "epochs": 200, "lr": 0.002, "batch_size": 128}}'

As the official code (train_generative_probex.py, ProbeXZeroshot): the probe's
representation of a weight matrix (r_T) and Linear(text_dim -> r_T) of each class's
text embedding, both L2-normalised; the logits are their cosine similarities, raw
(temperature null: the official code's; its learned CLIP-style logit scale is
commented out) or divided by a fixed `temperature` or by a learned one ("learned",
CLIP's init 0.07); cross-entropy over the training classes' texts, Adam at `lr`, no
weight decay, `epochs` epochs; the epoch is chosen on the validation models of the
seen classes (best accuracy; ties: lower loss, then earlier epoch). The text
embeddings are the tiny CLIP's projected text features (repro.foundation.clip
Clip.encode_text) of `prompt` filled with each class name (the paper: CLIP ViT-L/14 on
"a photo of a {class}"; the tiny CLIP knows "a glyph of the digit seven").

Per seed, `heldout_classes` classes drawn from the seed are held out: none of their
models is trained or selected on. The probe trains on the train-split models of the
seen classes, is selected on their val-split models, and is scored once on
(a) the test-split models of the seen classes, classified among the seen classes, and
(b) EVERY model of the held-out classes, classified among the held-out classes only
(chance 1 / heldout_classes): zero-shot.

Methods: `probex` (ProbeX's encoder: probes U, shared projection V, ReLU, encoder
Linear -> r_T; repro.probex.model.ProbeX without its head) and `dense` (the Dense
baseline's Linear(out * in -> r_T) on the flattened matrix), the same alignment.
The weights are divided by one number, the standard deviation of the training
models' entries (`standardise`, default true): a LoRA's B @ A is ~1e-3, which would
leave the encoder's bias alone in the representation at the start; one scale for all
entries changes nothing else.

One row per method, columns ROW_COLUMNS.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from repro.core.cli import require
from repro.core.errors import ReproInputError
from repro.core.results import write_table
from repro.core.stage import Stage, run
from repro.probex.model import DenseExpert, ProbeX, count_parameters
from repro.probex.table import ZEROSHOT_COLUMNS, ZEROSHOT_METHODS
from repro.probex.zoo import Zoo, load_layer, load_zoo

log = logging.getLogger(__name__)

SECTION = "probex.zeroshot"
METHODS = ZEROSHOT_METHODS
ROW_COLUMNS = ZEROSHOT_COLUMNS  # the table's contract (repro.probex.table)
LEARNED_INIT = 0.07  # CLIP's initial temperature, for temperature "learned"


# --------------------------------------------------------------------------- the model


class TextAlignedProbe(nn.Module):
    """logits[i, k] = cos(encoder(X_i), text(E_k)) / temperature.

    `encoder` maps weights [B, out, in] to [B, r_T]; `text` is Linear(text_dim -> r_T)
    on the class text embeddings E [K, text_dim]. temperature None: raw cosines (the
    official code); a number: fixed; "learned": a learned log-scale from 1/0.07.
    """

    def __init__(
        self,
        encoder: nn.Module,
        rank_t: int,
        text_dim: int,
        temperature: float | str | None = None,
    ):
        super().__init__()
        self.encoder = encoder
        self.text = nn.Linear(int(text_dim), int(rank_t))
        self.temperature = temperature
        if temperature == "learned":
            self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / LEARNED_INIT)))
        elif temperature is not None and not (
            isinstance(temperature, int | float) and not isinstance(temperature, bool)
        ):
            raise ValueError(f"temperature: None, a number > 0 or 'learned', got {temperature!r}")

    def scale(self) -> Tensor | float:
        if self.temperature is None:
            return 1.0
        if self.temperature == "learned":
            return self.log_scale.exp()
        return 1.0 / float(self.temperature)

    def embed_weights(self, x: Tensor) -> Tensor:
        return F.normalize(self.encoder(x), dim=-1)

    def embed_text(self, text: Tensor) -> Tensor:
        return F.normalize(self.text(text), dim=-1)

    def forward(self, x: Tensor, text: Tensor) -> Tensor:
        return self.scale() * self.embed_weights(x) @ self.embed_text(text).T


def build_encoder(method: str, shape: tuple[int, int], settings: ZeroshotSettings) -> nn.Module:
    """ProbeX's encoder (ProbeX without its head) or the Dense Linear(out * in -> r_T)."""
    if method == "probex":
        encoder = ProbeX(*shape, 1, settings.rank_u, settings.rank_v, settings.rank_t)
        encoder.head = nn.Identity()  # forward = encode: the representation r_T
        return encoder
    if method == "dense":
        return DenseExpert(*shape, settings.rank_t)  # Linear(out * in -> r_T), flattened
    raise ValueError(f"unknown method {method!r}")


# --------------------------------------------------------------------------- config


@dataclass
class ZeroshotSettings:
    """The probex.zeroshot section, checked."""

    heldout_classes: int
    layer: str
    prompt: str
    rank_u: int
    rank_v: int
    rank_t: int
    epochs: int
    lr: float
    batch_size: int
    temperature: float | str | None = None
    standardise: bool = True
    methods: list[str] = field(default_factory=lambda: list(METHODS))


def zeroshot_settings(params: Mapping, num_classes: int | None = None) -> ZeroshotSettings:
    """`params["zeroshot"]` as ZeroshotSettings; a missing or bad value names its key. With
    `num_classes`, heldout_classes must leave 2 or more classes on each side."""
    section = require(params, "zeroshot", "probex")
    if not isinstance(section, dict):
        raise ReproInputError(f"{SECTION}: expected a mapping, got {section!r}")

    def positive_int(key: str) -> int:
        value = require(section, key, SECTION)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ReproInputError(f"{SECTION}.{key}: must be an integer >= 1, got {value!r}")
        return value

    heldout = positive_int("heldout_classes")
    if num_classes is not None and not 2 <= heldout <= num_classes - 2:
        raise ReproInputError(
            f"{SECTION}.heldout_classes: {heldout} of {num_classes} classes; must be in "
            f"[2, {num_classes - 2}] (at least two held-out and two seen classes)"
        )
    layer = require(section, "layer", SECTION)
    if not isinstance(layer, str) or not layer:
        raise ReproInputError(f"{SECTION}.layer: a module name of the zoo, got {layer!r}")
    prompt = require(section, "prompt", SECTION)
    if not isinstance(prompt, str) or "{classname}" not in prompt:
        raise ReproInputError(
            f"{SECTION}.prompt: a string with a {{classname}} field, got {prompt!r}"
        )
    lr = require(section, "lr", SECTION)
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not lr > 0:
        raise ReproInputError(f"{SECTION}.lr: must be a number > 0, got {lr!r}")
    temperature = section.get("temperature")
    if temperature is not None and temperature != "learned":
        if (
            isinstance(temperature, bool)
            or not isinstance(temperature, int | float)
            or not temperature > 0
        ):
            raise ReproInputError(
                f"{SECTION}.temperature: null (raw cosines), a number > 0 or 'learned', "
                f"got {temperature!r}"
            )
        temperature = float(temperature)
    standardise = section.get("standardise", True)
    if not isinstance(standardise, bool):
        raise ReproInputError(f"{SECTION}.standardise: true or false, got {standardise!r}")
    methods = section.get("methods", list(METHODS))
    if not isinstance(methods, list) or not methods or set(methods) - set(METHODS):
        raise ReproInputError(
            f"{SECTION}.methods: a non-empty list of {list(METHODS)}, got {methods!r}"
        )
    return ZeroshotSettings(
        heldout_classes=heldout,
        layer=layer,
        prompt=prompt,
        rank_u=positive_int("rank_u"),
        rank_v=positive_int("rank_v"),
        rank_t=positive_int("rank_t"),
        epochs=positive_int("epochs"),
        lr=float(lr),
        batch_size=positive_int("batch_size"),
        temperature=temperature,
        standardise=standardise,
        methods=list(methods),
    )


# --------------------------------------------------------------------------- data


def draw_heldout(num_classes: int, count: int, seed: int) -> list[int]:
    """The `count` held-out classes of `seed`, sorted."""
    gen = torch.Generator().manual_seed(int(seed))
    return sorted(torch.randperm(num_classes, generator=gen)[:count].tolist())


def single_labels(zoo: Zoo) -> Tensor:
    """Each model's one class [N]; a model of several (or no) classes is refused."""
    labels = []
    for model in zoo.models:
        if len(model["labels"]) != 1:
            raise ReproInputError(
                f"{zoo.path(model)}: labels {model['labels']}; zero-shot classification of "
                f"models needs one class per model ({zoo.manifest})"
            )
        labels.append(int(model["labels"][0]))
    return torch.tensor(labels, dtype=torch.long)


@dataclass
class Partition:
    """Rows of the zoo's models by role, and the classes on each side."""

    seen: list[int]
    heldout: list[int]
    rows: dict[str, Tensor]  # train / val / test (seen classes), zeroshot (held-out classes)


def partition(labels: Tensor, splits: Sequence[str], heldout: Sequence[int], where) -> Partition:
    """The seen classes' train / val / test models and every held-out class's model."""
    num = int(labels.max()) + 1 if len(labels) else 0
    held = torch.zeros(max(num, max(heldout) + 1), dtype=torch.bool)
    held[list(heldout)] = True
    is_held = held[labels]
    rows = {
        s: torch.tensor(
            [i for i, x in enumerate(splits) if x == s and not is_held[i]], dtype=torch.long
        )
        for s in ("train", "val", "test")
    }
    rows["zeroshot"] = torch.nonzero(is_held).flatten()
    empty = [s for s, r in rows.items() if len(r) == 0]
    if empty:
        raise ReproInputError(
            f"{where}: no {' / '.join(empty)} models once classes {list(heldout)} are held out"
        )
    seen = sorted(set(range(len(held))) - set(heldout))
    return Partition(seen=seen, heldout=sorted(heldout), rows=rows)


def text_embeddings(clip, prompts: list[str]) -> Tensor:
    """The CLIP's projected, L2-normalised text features of `prompts` [K, P]."""
    with torch.no_grad():
        return clip.encode_text(prompts).detach().float().cpu()


# --------------------------------------------------------------------------- training


@dataclass
class AlignFit:
    best_epoch: int
    val_accuracy: float
    val_loss: float
    seconds: float
    history: list[dict] = field(default_factory=list)


@torch.no_grad()
def score(model: TextAlignedProbe, X: Tensor, y: Tensor, text: Tensor) -> tuple[float, float]:
    """(cross-entropy, accuracy) of `model` on models X with class indices y into `text`."""
    if len(X) == 0:
        return math.nan, math.nan
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    logits = model(X.to(device), text.to(device)).cpu()
    model.train(was)
    return float(F.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())


def fit_aligned(
    model: TextAlignedProbe,
    X_train: Tensor,
    y_train: Tensor,
    X_val: Tensor,
    y_val: Tensor,
    text: Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
) -> AlignFit:
    """Cross-entropy on the cosine logits against `text` [K, P] (y: indices into it), Adam
    (no weight decay), shuffled minibatches from `seed`; the state best on the val models
    (accuracy, then lower loss, then earlier epoch) is loaded into `model`."""
    started = time.perf_counter()
    device = next(model.parameters()).device
    X_train, y_train, text = X_train.to(device), y_train.to(device), text.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=0.0)
    order = torch.Generator().manual_seed(int(seed))
    best, history = None, []
    for epoch in range(1, int(epochs) + 1):
        model.train()
        permutation = torch.randperm(len(X_train), generator=order).to(device)
        total = 0.0
        for begin in range(0, len(permutation), batch_size):
            rows = permutation[begin : begin + batch_size]
            loss = F.cross_entropy(model(X_train[rows], text), y_train[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(rows)
        val_loss, val_accuracy = score(model, X_val, y_val, text)
        history.append(
            {
                "epoch": epoch,
                "train_loss": total / len(X_train),
                "val_loss": val_loss,
                "val_accuracy": val_accuracy,
            }
        )
        if best is None or (val_accuracy, -val_loss) > (best[1], -best[2]):
            best = (epoch, val_accuracy, val_loss, copy.deepcopy(model.state_dict()))
    epoch, val_accuracy, val_loss, state = best
    model.load_state_dict(state)
    return AlignFit(epoch, val_accuracy, val_loss, time.perf_counter() - started, history)


# --------------------------------------------------------------------------- the run


def run_zeroshot(
    zoo: Zoo,
    text: Tensor,
    settings: ZeroshotSettings,
    seed: int,
    device: torch.device | str = "cpu",
    details: dict | None = None,
) -> pd.DataFrame:
    """Every method's row for one seed. `text` [num_classes, P]: each class's text
    embedding. `details`, if given, receives the partition and each method's fit (tests)."""
    if settings.layer not in zoo.layers:
        raise ReproInputError(
            f"{SECTION}.layer: {settings.layer!r} is not a layer of the zoo {zoo.manifest}; "
            f"its layers are {sorted(zoo.layers)}"
        )
    if not 2 <= settings.heldout_classes <= zoo.num_classes - 2:
        raise ReproInputError(
            f"{SECTION}.heldout_classes: {settings.heldout_classes} of {zoo.num_classes} "
            f"classes; must be in [2, {zoo.num_classes - 2}]"
        )
    if len(text) != zoo.num_classes:
        raise ValueError(f"{len(text)} text embeddings for {zoo.num_classes} classes")
    labels = single_labels(zoo)
    X, _, splits = load_layer(zoo, settings.layer)
    heldout = draw_heldout(zoo.num_classes, settings.heldout_classes, seed)
    part = partition(labels, splits, heldout, zoo.manifest)
    if settings.standardise:
        std = float(X[part.rows["train"]].std())
        X = X / (std if std > 0 else 1.0)
    # Class indices within each side's texts.
    seen_index = torch.full((zoo.num_classes,), -1, dtype=torch.long)
    seen_index[part.seen] = torch.arange(len(part.seen))
    held_index = torch.full((zoo.num_classes,), -1, dtype=torch.long)
    held_index[part.heldout] = torch.arange(len(part.heldout))
    data = {s: (X[r], seen_index[labels[r]]) for s, r in part.rows.items() if s != "zeroshot"}
    zero_rows = part.rows["zeroshot"]
    X_zero, y_zero = X[zero_rows], held_index[labels[zero_rows]]
    text_seen, text_held = text[part.seen], text[part.heldout]
    if details is not None:
        details["partition"] = part
        details["fits"] = {}
    shape = tuple(X.shape[1:])
    rows = []
    for method in settings.methods:
        torch.manual_seed(seed)  # the probe's init: from the seed alone
        model = TextAlignedProbe(
            build_encoder(method, shape, settings),
            settings.rank_t,
            text.shape[1],
            settings.temperature,
        ).to(device)
        fit = fit_aligned(
            model,
            *data["train"],
            *data["val"],
            text_seen,
            epochs=settings.epochs,
            batch_size=settings.batch_size,
            lr=settings.lr,
            seed=seed,
        )
        _, test_accuracy = score(model, *data["test"], text_seen)
        _, zeroshot_accuracy = score(model, X_zero, y_zero, text_held)
        parameters = count_parameters(model)
        log.info(
            "%s %s held out %s: seen val %.3f (epoch %d) test %.3f, zero-shot %.3f "
            "(chance %.3f), %d parameters, %.1f s",
            method,
            settings.layer,
            [zoo.classnames[c] for c in heldout],
            fit.val_accuracy,
            fit.best_epoch,
            test_accuracy,
            zeroshot_accuracy,
            1 / len(heldout),
            parameters,
            fit.seconds,
        )
        if details is not None:
            details["fits"][method] = fit
        rows.append(
            {
                "method": method,
                "seed": seed,
                "layer": settings.layer,
                "heldout": "+".join(zoo.classnames[c] for c in heldout),
                "seen_val_accuracy": fit.val_accuracy,
                "seen_test_accuracy": test_accuracy,
                "zeroshot_accuracy": zeroshot_accuracy,
                "chance": 1.0 / len(heldout),
                "parameters": parameters,
                "best_epoch": fit.best_epoch,
                "n_train": len(data["train"][0]),
                "n_zeroshot": len(zero_rows),
            }
        )
    return pd.DataFrame(rows, columns=ROW_COLUMNS)


def table_metrics(table: pd.DataFrame) -> dict:
    metrics = {}
    for record in table.to_dict("records"):
        for key in ("seen_val_accuracy", "seen_test_accuracy", "zeroshot_accuracy", "parameters"):
            metrics[f"{record['method']}/{key}"] = record[key]
    if len(table):
        metrics["chance"] = float(table["chance"].iloc[0])
    return metrics


def main(argv=None) -> None:
    from repro.foundation.clip import class_prompts, load_clip

    stage = Stage(__doc__, paper="probex", out="the results table (.csv)", metrics=True)
    stage.parser.add_argument("--zoo", required=True, help="the LoRA zoo's manifest")
    args = stage.start(argv)
    params = stage.params
    seed = require(params, "seed", "probex")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ReproInputError(f"probex.seed: an integer, got {seed!r}")
    zoo = load_zoo(args.zoo)
    settings = zeroshot_settings(params, zoo.num_classes)
    if settings.layer not in zoo.layers:
        raise ReproInputError(
            f"{SECTION}.layer: {settings.layer!r} is not a layer of the zoo {zoo.manifest}; "
            f"its layers are {sorted(zoo.layers)}"
        )
    single_labels(zoo)  # a zoo of multi-class models fails before any model is loaded
    classnames = require(params, "classnames", "probex")
    if classnames != zoo.classnames:
        raise ReproInputError(
            f"probex.classnames: {classnames!r}, but the zoo {zoo.manifest} is of classes "
            f"{zoo.classnames}"
        )
    foundation = require(require(params, "foundation", "probex"), "clip", "probex.foundation")
    clip = load_clip(foundation).to(stage.device)
    text = text_embeddings(clip, class_prompts(settings.prompt, classnames))
    table = run_zeroshot(zoo, text, settings, seed, stage.device)
    if stage.is_main:
        write_table(table, args.out)
        stage.finish(
            {"seconds": time.perf_counter() - stage.started, **table_metrics(table)},
            artifacts=[args.out],
        )


if __name__ == "__main__":
    run(main)
