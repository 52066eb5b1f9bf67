"""Stage probex_figures: ProbeX's figures at this scale, from the headline tables.

- accuracy: the paper's table as a figure: test element-wise accuracy per tree and
  method (mean +- std over seeds, each seed a dot), chance (50 %) as a dashed line;
- layers: the layer study: accuracy of ProbeX on every eligible layer of each tree,
  the layer chosen on validation ringed;
- parameters: accuracy against the probe's parameter count (log scale), one marker
  per method and tree: what ProbeX buys over Dense;
- zeroshot: probes aligned to text, on the LoRA zoo: accuracy on models of the seen
  classes (among the seen classes) and of classes never seen in training (among the
  held-out classes), chance of each as a dashed tick.

Every accuracy is a test accuracy at the epoch chosen on the validation models. The
drawing functions return the matplotlib Figure.

    python -m repro.probex.plots --accuracy results/probex_accuracy.csv \
        --layers results/probex_layers.csv --accuracy-out results/figures/probex_accuracy.png \
        --layers-out results/figures/probex_layers.png \
        --parameters-out results/figures/probex_parameters.png \
        --zeroshot results/probex_zeroshot.csv --zeroshot-out results/figures/probex_zeroshot.png
"""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from repro.core.figures import no_data, save_figure
from repro.core.results import read_table  # noqa: E402
from repro.core.stage import Stage, run  # noqa: E402
from repro.probex.table import ACCURACY_COLUMNS, LAYER_COLUMNS, ZEROSHOT_COLUMNS  # noqa: E402
from repro.probex.workflow import METHODS  # noqa: E402

METHOD_NAME = {
    "probex": "ProbeX (tree's expert)",
    "dense": "Dense linear expert",
    "statnn": "StatNN",
    "probex_single": "one ProbeX across trees",
    "probex_experts": "tree experts, routed",
}
COLOR = {
    "probex": "#d62728",
    "dense": "#1f77b4",
    "statnn": "#8c8c8c",
    "probex_single": "#ff7f0e",
    "probex_experts": "#2ca02c",
}
MARKER = {"probex": "o", "dense": "s", "statnn": "^", "probex_single": "D", "probex_experts": "P"}
CHANCE = 50.0  # element-wise accuracy of a coin flip per class


def percent_stats(values) -> tuple[float, float, np.ndarray]:
    """(mean, std (0 for one value), values) in percent, NaNs dropped."""
    xs = 100.0 * np.asarray([v for v in values if not math.isnan(float(v))], dtype=float)
    if xs.size == 0:
        return math.nan, math.nan, xs
    return float(xs.mean()), float(xs.std(ddof=1)) if xs.size > 1 else 0.0, xs


def chance_line(ax) -> None:
    ax.axhline(CHANCE, color="0.3", ls="--", lw=1.2, label="chance (50 %)")


def accuracy_figure(table: pd.DataFrame) -> plt.Figure:
    """Grouped bars: one group per tree, one bar per method (mean +- std over seeds)."""
    fig, ax = plt.subplots(figsize=(8.5, 4.2))
    if table.empty:
        no_data(ax)
        return fig
    trees = sorted(table.tree.unique())
    methods = [m for m in METHODS if m in set(table.method)]
    width = 0.8 / len(methods)
    rng = np.random.default_rng(0)  # dot jitter only
    for j, method in enumerate(methods):
        for i, tree in enumerate(trees):
            mean, std, xs = percent_stats(
                table[(table.method == method) & (table.tree == tree)].test_accuracy
            )
            if xs.size == 0:
                continue
            x = i - 0.4 + width * (j + 0.5)
            ax.bar(
                x,
                mean - CHANCE,
                width * 0.9,
                bottom=CHANCE,
                yerr=std,
                color=COLOR[method],
                alpha=0.85,
                capsize=2,
                label=METHOD_NAME[method] if i == 0 else None,
            )
            ax.scatter(x + rng.uniform(-0.15, 0.15, xs.size) * width, xs, s=8, color="k", zorder=3)
    chance_line(ax)
    ax.set_xticks(range(len(trees)), trees)
    ax.set_xlabel("model tree (its base model)")
    ax.set_ylabel("test element-wise accuracy (%)")
    lows = 100 * table.test_accuracy.min()
    ax.set_ylim(min(CHANCE - 5, lows - 3), 100)
    ax.set_title("Which classes was each model fine-tuned on? (bars: mean ± std over seeds)")
    ax.legend(fontsize=8, loc="upper left", ncol=2, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return fig


def layers_figure(layers: pd.DataFrame) -> plt.Figure:
    """One panel per tree: ProbeX's accuracy on each layer, the val-chosen one ringed."""
    trees = sorted(layers.tree.unique()) if not layers.empty else []
    fig, axes = plt.subplots(
        1, max(1, len(trees)), figsize=(4.2 * max(1, len(trees)), 4.0), squeeze=False
    )
    if not trees:
        no_data(axes[0, 0])
        return fig
    for ax, tree in zip(axes[0], trees, strict=True):
        rows = layers[layers.tree == tree]
        names = sorted(rows.layer.unique())
        stats = [percent_stats(rows[rows.layer == n].test_accuracy) for n in names]
        y = np.arange(len(names))
        ax.barh(
            y,
            [s[0] - CHANCE for s in stats],
            left=CHANCE,
            xerr=[s[1] for s in stats],
            color="#d62728",
            alpha=0.8,
            capsize=2,
        )
        chosen = rows[rows.chosen.astype(bool)].layer.value_counts()
        for k, name in enumerate(names):
            if name in chosen:
                ax.plot(
                    stats[k][0],
                    k,
                    "o",
                    ms=11,
                    mfc="none",
                    mec="k",
                    label=f"chosen on val ({int(chosen[name])} of {rows.seed.nunique()} seeds)",
                )
        shapes = rows.drop_duplicates("layer").set_index("layer")["shape"]
        ax.set_yticks(y, [f"{n}\n({shapes[n]})" for n in names], fontsize=7)
        ax.axvline(CHANCE, color="0.3", ls="--", lw=1.2)
        ax.set_xlabel("test element-wise accuracy (%)")
        ax.set_title(f"tree {tree}")
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles, strict=True))
        ax.legend(unique.values(), unique.keys(), fontsize=7, loc="lower right", frameon=False)
    fig.suptitle("ProbeX on every layer (the paper probes one layer; which one matters)")
    fig.tight_layout()
    return fig


def parameters_figure(table: pd.DataFrame) -> plt.Figure:
    """Accuracy against parameters (log x), one marker per method, one point per tree."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    if table.empty:
        no_data(ax)
        return fig
    for method in [m for m in METHODS if m in set(table.method)]:
        rows = table[table.method == method]
        first = True
        for _tree, group in rows.groupby("tree"):
            mean, std, _ = percent_stats(group.test_accuracy)
            ax.errorbar(
                group.parameters.max(),
                mean,
                yerr=std,
                fmt=MARKER[method],
                color=COLOR[method],
                capsize=2,
                label=METHOD_NAME[method] if first else None,
            )
            first = False
    chance_line(ax)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters of the probe (log scale)")
    ax.set_ylabel("test element-wise accuracy (%)")
    ax.set_title("Accuracy against size (one point per tree, mean ± std over seeds)")
    ax.legend(fontsize=8, frameon=False)
    ax.grid(alpha=0.3)
    return fig


ZEROSHOT_NAME = {"probex": "ProbeX, aligned to text", "dense": "Dense, aligned to text"}


def zeroshot_figure(zeroshot: pd.DataFrame) -> plt.Figure:
    """Two groups (seen classes, held-out classes), one bar per method, chance marked."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    if zeroshot.empty:
        no_data(ax)
        return fig
    groups = [
        ("seen_test_accuracy", "models of seen classes\n(test models, among seen classes)"),
        ("zeroshot_accuracy", "models of held-out classes\n(zero-shot, among held-out classes)"),
    ]
    methods = [m for m in ("probex", "dense") if m in set(zeroshot.method)]
    width = 0.8 / len(methods)
    for j, method in enumerate(methods):
        rows = zeroshot[zeroshot.method == method]
        for i, (column, _) in enumerate(groups):
            mean, std, xs = percent_stats(rows[column])
            x = i - 0.4 + width * (j + 0.5)
            ax.bar(
                x,
                mean,
                width * 0.9,
                yerr=std,
                capsize=3,
                color=COLOR["probex" if method == "probex" else "dense"],
                alpha=0.85,
                label=ZEROSHOT_NAME[method] if i == 0 else None,
            )
            ax.scatter(np.full(xs.size, x), xs, s=10, color="k", zorder=3)
    chance = 100.0 * zeroshot.chance.mean()
    ax.hlines(chance, 0.6, 1.4, colors="0.3", linestyles="--", label=f"chance ({chance:.0f} %)")
    ax.set_xticks(range(len(groups)), [label for _, label in groups], fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    held = ", ".join(sorted(set(zeroshot.heldout.astype(str))))
    ax.set_title(f"Which class was each LoRA trained on? (held out per seed: {held})", fontsize=9)
    ax.legend(fontsize=8, frameon=False, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    return fig


def main(argv=None) -> None:
    stage = Stage(__doc__, paper="probex")
    add = stage.parser.add_argument
    add("--accuracy", required=True, help="results/probex_accuracy.csv")
    add("--layers", required=True, help="results/probex_layers.csv")
    add("--accuracy-out", required=True)
    add("--layers-out", required=True)
    add("--parameters-out", required=True)
    add("--zeroshot", required=True, help="results/probex_zeroshot.csv")
    add("--zeroshot-out", required=True)
    args = stage.start(argv)
    table = read_table(args.accuracy, required=ACCURACY_COLUMNS)
    layers = read_table(args.layers, required=LAYER_COLUMNS)
    save_figure(accuracy_figure(table), args.accuracy_out)
    save_figure(layers_figure(layers), args.layers_out)
    save_figure(parameters_figure(table), args.parameters_out)
    zeroshot = read_table(args.zeroshot, required=ZEROSHOT_COLUMNS)
    save_figure(zeroshot_figure(zeroshot), args.zeroshot_out)


if __name__ == "__main__":
    run(main)
