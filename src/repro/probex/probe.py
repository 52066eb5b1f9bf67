"""Stage probex_probe: learn on model weights. For each tree, ProbeX, the Dense linear expert
and StatNN predict a fine-tuned model's training classes (multi-label) from its weights;
then one ProbeX over all trees ("probex_single") and the mixture of per-tree experts with
nearest-base routing ("probex_experts").

    python -m repro.probex.probe --zoo data/probex/zoo/vit_a/manifest.json \
        --zoo data/probex/zoo/vit_b/manifest.json --zoo data/probex/zoo/cnn/manifest.json \
        --out results/probex/runs/probe_s0.csv --metrics results/probex/runs/probe_s0.json \
        --params '{"seed": 0, "trees": [{"name": "vit_a", "layer": "blocks.1.attn.proj"}, ..],
                   "probe": {"probex": {"rank_u": 8, "rank_v": 8, "rank_t": 32},
                             "statnn": {"hidden": 64}, "epochs": 200, "batch_size": 128,
                             "lr": 0.001, "weight_decay": 0.00001}}'

Training as the official code trains: Adam (L2 weight decay), multi-label BCE on the
logits, element-wise accuracy at threshold 0.5 (chance about 0.5), the checkpoint best
on the validation models kept (higher accuracy; ties: lower loss) and scored once on
the test models; the test models never choose anything. ProbeX and Dense read the raw
weights, as the official code does (it normalises nothing; on a tiny zoo, centring each
entry on the training models' mean gave no consistent gain); StatNN standardises its
statistics (see repro.probex.model).

Differences from the official code, and why: validation after every epoch (the
official code validates every 25th of its 500 epochs; an epoch here is a step or two);
accuracy ties broken by the lower validation loss (the official code keeps the first:
with a few dozen validation models, ties are common and the loss is the finer
measure); the loss reported is the mean over all elements, not over batches.

One row per method x tree, columns ROW_COLUMNS (StatNN's layer is "all": it reads
every tensor but the head's). "probex_single" rows share one model
(val_accuracy over all trees' validation models, test_accuracy over that tree's test
models). "probex_experts" rows: every test (and validation) model of every tree is sent
to the expert (this stage's per-tree ProbeX) of the tree whose base is nearest; a model
sent to a tree whose layer it lacks (another architecture) is answered "no class", i.e.
all-negative, which scores 1 - subset_size / num_classes element-wise.
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
from repro.foundation.backbones import layer_matrix
from repro.probex.evaluate import elementwise_accuracy, evaluate, predict
from repro.probex.model import DenseExpert, ProbeX, StatNN, count_parameters, weight_statistics
from repro.probex.route import route, routing_accuracy
from repro.probex.table import ACCURACY_COLUMNS
from repro.probex.workflow import PER_TREE_METHODS
from repro.probex.zoo import Zoo, load_base_state, load_layer, load_state, load_states, load_zoo

log = logging.getLogger(__name__)

SECTION = "probex"
ROW_COLUMNS = ACCURACY_COLUMNS  # the table's contract (repro.probex.table)


# --------------------------------------------------------------------------- training


@dataclass
class ProbeFit:
    """What `fit_probe` returns: the best-on-validation state and the run's history."""

    state: dict[str, Tensor]  # the model's state_dict at best_epoch (also loaded into it)
    best_epoch: int  # epochs trained when the best state was reached (1-based)
    val_accuracy: float
    val_loss: float
    seconds: float
    history: list[dict] = field(default_factory=list)  # per epoch: train_loss, val_*


def fit_probe(
    model: nn.Module,
    X_train: Tensor,
    Y_train: Tensor,
    X_val: Tensor,
    Y_val: Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int,
) -> ProbeFit:
    """Train `model` (multi-label BCE, Adam) for `epochs` epochs over shuffled minibatches of
    the training models (order drawn from `seed`), validate after every epoch, and keep
    the state with the best validation accuracy (ties: the lower validation loss, then
    the earlier epoch). The best state is loaded into `model` and returned."""
    if len(X_train) == 0 or len(X_val) == 0:
        raise ValueError(f"fit_probe: {len(X_train)} train and {len(X_val)} val models")
    if len(X_train) != len(Y_train) or len(X_val) != len(Y_val):
        raise ValueError("fit_probe: inputs and targets differ in length")
    started = time.perf_counter()
    device = next(model.parameters()).device
    X_train, Y_train = X_train.to(device), Y_train.float().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    order = torch.Generator().manual_seed(int(seed))
    best = None
    history = []
    for epoch in range(1, int(epochs) + 1):
        model.train()
        permutation = torch.randperm(len(X_train), generator=order).to(device)
        total, count = 0.0, 0
        for start in range(0, len(permutation), batch_size):
            rows = permutation[start : start + batch_size]
            loss = F.binary_cross_entropy_with_logits(model(X_train[rows]), Y_train[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(rows)
            count += len(rows)
        val_loss, val_accuracy = evaluate(model, X_val, Y_val, batch_size)
        history.append(
            {
                "epoch": epoch,
                "train_loss": total / count,
                "val_loss": val_loss,
                "val_accuracy": val_accuracy,
            }
        )
        if best is None or (val_accuracy, -val_loss) > (best[1], -best[2]):
            best = (epoch, val_accuracy, val_loss, copy.deepcopy(model.state_dict()))
    epoch, val_accuracy, val_loss, state = best
    model.load_state_dict(state)
    return ProbeFit(state, epoch, val_accuracy, val_loss, time.perf_counter() - started, history)


# --------------------------------------------------------------------------- config


@dataclass
class ProbeSettings:
    """The probex.probe section, checked."""

    rank_u: int
    rank_v: int
    rank_t: int
    statnn_hidden: int
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float

    def training(self, seed: int) -> dict:
        """fit_probe's keyword arguments."""
        return dict(
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            weight_decay=self.weight_decay,
            seed=seed,
        )


def probe_settings(params: Mapping) -> ProbeSettings:
    """`params["probe"]` as ProbeSettings; a missing or bad value names its key."""
    probe = require(params, "probe", SECTION)
    where = f"{SECTION}.probe"
    if not isinstance(probe, dict):
        raise ReproInputError(f"{where}: expected a mapping, got {probe!r}")
    probex = require(probe, "probex", where)
    statnn = require(probe, "statnn", where)

    def positive_int(section: Mapping, key: str, at: str) -> int:
        value = require(section, key, at)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ReproInputError(f"{at}.{key}: must be an integer >= 1, got {value!r}")
        return value

    def non_negative(key: str) -> float:
        value = require(probe, key, where)
        if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
            raise ReproInputError(f"{where}.{key}: must be a number >= 0, got {value!r}")
        return float(value)

    lr = non_negative("lr")
    if lr <= 0:
        raise ReproInputError(f"{where}.lr: must be > 0, got {lr}")
    return ProbeSettings(
        rank_u=positive_int(probex, "rank_u", f"{where}.probex"),
        rank_v=positive_int(probex, "rank_v", f"{where}.probex"),
        rank_t=positive_int(probex, "rank_t", f"{where}.probex"),
        statnn_hidden=positive_int(statnn, "hidden", f"{where}.statnn"),
        epochs=positive_int(probe, "epochs", where),
        batch_size=positive_int(probe, "batch_size", where),
        lr=lr,
        weight_decay=non_negative("weight_decay"),
    )


def tree_layers(params: Mapping, zoos: Sequence[Zoo]) -> dict[str, str]:
    """{tree name: probed layer} of probex.trees, each tree's zoo given once by --zoo."""
    trees = require(params, "trees", SECTION)
    if not isinstance(trees, list) or not trees:
        raise ReproInputError(
            f"{SECTION}.trees: a non-empty list of {{name, layer}}, got {trees!r}"
        )
    layers = {}
    for entry in trees:
        if not isinstance(entry, dict) or "name" not in entry or "layer" not in entry:
            raise ReproInputError(
                f"{SECTION}.trees: each entry needs name and layer, got {entry!r}"
            )
        if entry["name"] in layers:
            raise ReproInputError(f"{SECTION}.trees: tree {entry['name']!r} listed twice")
        layers[str(entry["name"])] = str(entry["layer"])
    given = [zoo.tree for zoo in zoos]
    duplicated = sorted({t for t in given if given.count(t) > 1})
    if duplicated:
        raise ReproInputError(f"--zoo: more than one zoo of trees {duplicated}")
    missing = sorted(set(layers) - set(given))
    extra = sorted(set(given) - set(layers))
    if missing or extra:
        raise ReproInputError(
            f"{SECTION}.trees names {sorted(layers)} but the --zoo manifests are of trees "
            f"{sorted(given)} (no zoo: {missing}; not in {SECTION}.trees: {extra})"
        )
    names = {tuple(zoo.classnames) for zoo in zoos}
    if len(names) > 1:
        raise ReproInputError(
            f"--zoo: the zoos' class names differ ({[str(z.manifest) for z in zoos]})"
        )
    return layers


# --------------------------------------------------------------------------- data


@dataclass
class TreeData:
    """One tree's probed layer, split: X [N, out, in], Y multi-hot [N, C], per split."""

    tree: str
    layer: str
    X: dict[str, Tensor]
    Y: dict[str, Tensor]
    index: dict[str, Tensor]  # rows of the zoo's models in each split

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.X["train"].shape[1:])

    def count(self, split: str) -> int:
        return len(self.Y[split])


def split_rows(splits: Sequence[str], where) -> dict[str, Tensor]:
    """Indices of the models of each split; a split without models is refused."""
    rows = {
        s: torch.tensor([i for i, x in enumerate(splits) if x == s], dtype=torch.long)
        for s in ("train", "val", "test")
    }
    empty = [s for s, r in rows.items() if len(r) == 0]
    if empty:
        raise ReproInputError(f"{where}: no {' / '.join(empty)} models (need train, val and test)")
    return rows


def tree_data(zoo: Zoo, layer: str) -> TreeData:
    """The zoo's `layer` of every model, cut into its train / val / test models."""
    X, Y, splits = load_layer(zoo, layer)
    rows = split_rows(splits, zoo.manifest)
    return TreeData(
        zoo.tree,
        layer,
        {s: X[r] for s, r in rows.items()},
        {s: Y[r] for s, r in rows.items()},
        rows,
    )


def statistics_features(zoo: Zoo) -> Tensor:
    """StatNN's features of every model of the zoo [N, n_features], in manifest order."""
    features = []
    for model, state in zip(zoo.models, load_states(zoo), strict=True):
        feature = weight_statistics(state)
        if features and feature.shape != features[0].shape:
            raise ReproInputError(
                f"{zoo.path(model)}: {len(feature)} weight statistics, but the zoo's first "
                f"model has {len(features[0])} (models of one tree must share their tensors)"
            )
        features.append(feature)
    return torch.stack(features)


# --------------------------------------------------------------------------- methods


def _build(method: str, settings: ProbeSettings, shape, num_classes: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)  # the probe's initial weights: from the seed alone
    if method == "probex":
        return ProbeX(*shape, num_classes, settings.rank_u, settings.rank_v, settings.rank_t)
    if method == "dense":
        return DenseExpert(*shape, num_classes)
    if method == "statnn":
        return StatNN(shape, settings.statnn_hidden, num_classes)
    raise ValueError(f"unknown method {method!r}")


def train_and_score(
    method: str,
    settings: ProbeSettings,
    X: Mapping[str, Tensor],
    Y: Mapping[str, Tensor],
    seed: int,
    device: torch.device | str = "cpu",
) -> tuple[nn.Module, ProbeFit, float]:
    """Train one probe on X/Y["train"], choose on "val", score once on "test"."""
    num_classes = Y["train"].shape[1]
    shape = X["train"].shape[1] if method == "statnn" else tuple(X["train"].shape[1:])
    model = _build(method, settings, shape, num_classes, seed).to(device)
    if method == "statnn":
        model.standardise_with(X["train"].to(device))
    fit = fit_probe(model, X["train"], Y["train"], X["val"], Y["val"], **settings.training(seed))
    _, test_accuracy = evaluate(model, X["test"], Y["test"], settings.batch_size)
    return model, fit, test_accuracy


def table_row(method: str, data: TreeData, seed: int, **values) -> dict:
    """One row of the table for `method` on `data`'s tree; columns not in `values` are
    the tree's own counts, or NaN (not applicable)."""
    counts = dict(n_train=data.count("train"), n_val=data.count("val"), n_test=data.count("test"))
    return {
        **{column: math.nan for column in ROW_COLUMNS},
        **counts,
        "method": method,
        "tree": data.tree,
        "layer": data.layer,
        "seed": seed,
        **values,
    }


def check_single_shapes(data: Sequence[TreeData]) -> tuple[int, int]:
    """The one layer shape of every tree, which a single ProbeX across trees needs."""
    shapes = {d.tree: d.shape for d in data}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{d.tree} {d.layer} {d.shape[0]}x{d.shape[1]}" for d in data)
        raise ReproInputError(
            f"{SECTION}.trees: probex_single trains one ProbeX on every tree's layer, but "
            f"their shapes differ ({listed}); choose layers of one shape"
        )
    return data[0].shape


def expert_logits(
    states: Sequence[Mapping[str, Tensor]],
    routed: Sequence[str],
    experts: Mapping[str, nn.Module],
    layers: Mapping[str, str],
    num_classes: int,
    batch_size: int,
) -> Tensor:
    """Logits of each model by its routed tree's expert, read from that tree's layer; a
    model that lacks that layer (or has it in another shape) gets logits -inf: no class."""
    logits = torch.full((len(states), num_classes), -math.inf)
    for tree, expert in experts.items():
        key = f"{layers[tree]}.weight"
        rows, inputs = [], []
        for i, (state, to) in enumerate(zip(states, routed, strict=True)):
            weight = state.get(key)
            if to != tree or weight is None or weight.dim() < 2:
                continue
            matrix = layer_matrix(weight).float()
            if tuple(matrix.shape) == (expert.d_out, expert.d_in):
                rows.append(i)
                inputs.append(matrix)
        if rows:
            logits[rows] = predict(expert, torch.stack(inputs), batch_size)
    return logits


def per_tree_rows(
    zoo: Zoo, data: TreeData, settings: ProbeSettings, seed: int, device
) -> tuple[list[dict], nn.Module]:
    """ProbeX, Dense and StatNN on one tree: their rows, and the ProbeX (the tree's expert)."""
    features = statistics_features(zoo)
    inputs = {
        "probex": data.X,
        "dense": data.X,
        "statnn": {s: features[rows] for s, rows in data.index.items()},
    }
    rows = []
    for method in PER_TREE_METHODS:
        model, fit, test = train_and_score(method, settings, inputs[method], data.Y, seed, device)
        parameters = count_parameters(model)
        log.info(
            "%s %s %s: val %.3f (epoch %d) test %.3f, %d parameters, %.1f s",
            *(method, data.tree, data.layer, fit.val_accuracy, fit.best_epoch, test),
            *(parameters, fit.seconds),
        )
        rows.append(
            table_row(
                method,
                data,
                seed,
                layer="all" if method == "statnn" else data.layer,
                val_accuracy=fit.val_accuracy,
                test_accuracy=test,
                parameters=parameters,
                best_epoch=fit.best_epoch,
            )
        )
        if method == "probex":
            expert = model.cpu()
    return rows, expert


def single_rows(data: Sequence[TreeData], settings: ProbeSettings, seed: int, device) -> list[dict]:
    """One ProbeX trained on the union of every tree's models, scored on each tree's test."""
    union = {
        key: {s: torch.cat([getattr(d, key)[s] for d in data]) for s in ("train", "val", "test")}
        for key in ("X", "Y")
    }
    model, fit, _ = train_and_score("probex", settings, union["X"], union["Y"], seed, device)
    log.info("probex_single: val %.3f (epoch %d)", fit.val_accuracy, fit.best_epoch)
    return [
        table_row(
            "probex_single",
            d,
            seed,
            val_accuracy=fit.val_accuracy,
            test_accuracy=evaluate(model, d.X["test"], d.Y["test"], settings.batch_size)[1],
            parameters=count_parameters(model),
            n_train=len(union["Y"]["train"]),
            n_val=len(union["Y"]["val"]),
            best_epoch=fit.best_epoch,
        )
        for d in data
    ]


def expert_rows(
    zoos: Sequence[Zoo],
    data: Sequence[TreeData],
    experts: Mapping[str, nn.Module],
    settings: ProbeSettings,
    seed: int,
) -> list[dict]:
    """The mixture of experts: every val and test model of every tree routed to the tree
    of its nearest base and answered by that tree's expert."""
    bases = {zoo.tree: load_base_state(zoo) for zoo in zoos}
    layers = {d.tree: d.layer for d in data}
    num_classes = data[0].Y["train"].shape[1]
    rows = []
    for zoo, d in zip(zoos, data, strict=True):
        accuracy, routing = {}, {}
        for split in ("val", "test"):
            models = [zoo.models[i] for i in d.index[split].tolist()]
            states = [load_state(zoo, m) for m in models]
            routed = route(states, bases, names=[str(zoo.path(m)) for m in models])
            routing[split] = routing_accuracy(routed, [zoo.tree] * len(routed))
            logits = expert_logits(
                states, routed, experts, layers, num_classes, settings.batch_size
            )
            accuracy[split] = elementwise_accuracy(logits, d.Y[split])
        log.info(
            "probex_experts %s: test %.3f, routing %.3f", d.tree, accuracy["test"], routing["test"]
        )
        rows.append(
            table_row(
                "probex_experts",
                d,
                seed,
                val_accuracy=accuracy["val"],
                test_accuracy=accuracy["test"],
                parameters=sum(count_parameters(e) for e in experts.values()),
                n_train=sum(x.count("train") for x in data),
                routing_accuracy=routing["test"],
            )
        )
    return rows


def run_probes(
    zoos: Sequence[Zoo], params: Mapping, device: torch.device | str = "cpu"
) -> pd.DataFrame:
    """Every method's rows (ROW_COLUMNS) for the zoos (repro.probex.zoo.Zoo, one per tree),
    in probex.trees order: per tree ProbeX, Dense, StatNN; then probex_single, probex_experts."""
    settings = probe_settings(params)
    seed = int(require(params, "seed", SECTION))
    layers = tree_layers(params, zoos)
    zoos = sorted(zoos, key=lambda z: list(layers).index(z.tree))
    data = [tree_data(zoo, layers[zoo.tree]) for zoo in zoos]
    check_single_shapes(data)  # before any training: a config error fails fast
    rows, experts = [], {}
    for zoo, d in zip(zoos, data, strict=True):
        tree_rows, experts[zoo.tree] = per_tree_rows(zoo, d, settings, seed, device)
        rows += tree_rows
    rows += single_rows(data, settings, seed, device)
    rows += expert_rows(zoos, data, experts, settings, seed)
    return pd.DataFrame(rows, columns=ROW_COLUMNS)


def table_metrics(table: pd.DataFrame) -> dict:
    """The numbers of the table as flat metrics: <method>/<tree>/test_accuracy, ..."""
    metrics = {}
    for record in table.to_dict("records"):
        prefix = f"{record['method']}/{record['tree']}"
        for key in ("val_accuracy", "test_accuracy", "routing_accuracy", "parameters"):
            value = record[key]
            if not (isinstance(value, float) and math.isnan(value)):
                metrics[f"{prefix}/{key}"] = value
    return metrics


def load_zoos(paths: Sequence[str]) -> list[Zoo]:
    return [load_zoo(p) for p in paths]


def main(argv=None) -> None:
    stage = Stage(__doc__, paper="probex", out="the results table (.csv)", metrics=True)
    stage.parser.add_argument(
        "--zoo", action="append", required=True, help="a tree's zoo manifest (once per tree)"
    )
    args = stage.start(argv)
    table = run_probes(load_zoos(args.zoo), stage.params, stage.device)
    if stage.is_main:
        write_table(table, args.out)
        stage.finish(
            {"seconds": time.perf_counter() - stage.started, **table_metrics(table)},
            artifacts=[args.out],
        )


if __name__ == "__main__":
    run(main)
