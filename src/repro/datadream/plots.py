"""Stage datadream_figures: DataDream's figures at this scale, from the headline tables.

- main: the paper's main table as a figure: test accuracy per method at the main
  shots (mean +- std over seeds, each seed a dot), zero-shot CLIP as a reference
  line, and beside it the FID of each generator's synthetic set;
- n_synthetic: accuracy vs synthetic images per class (the paper's figure), synthetic
  only and real + synthetic, with real-only and zero-shot as references;
- shots: accuracy vs real shots per class: real-only at every size, DataDream where
  the generator was adapted, the shot-free methods as references;
- samples: one row per class: the real shots | the unadapted generator |
  DataDream_cls | DataDream_dset.

Every accuracy is a test accuracy at the epoch chosen on validation; the main and
shots figures use each method's val-chosen N (the table's `selected` rows), the
n_synthetic figure every N. The drawing functions return the matplotlib Figure.

    python -m repro.datadream.plots --accuracy results/datadream_accuracy.csv \
        --fid results/datadream_fid.csv --fewshot data/datadream/fewshot/16shot_s0.safetensors \
        --synthetic unadapted=S cls=S dset=S --main-out results/figures/datadream_main.png \
        --n-synthetic-out ... --shots-out ... --samples-out ... --params '{"main_shots": 16}'
"""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import FixedLocator, NullLocator  # noqa: E402

from repro.core.cli import require  # noqa: E402
from repro.core.data import load_image_dataset  # noqa: E402
from repro.core.errors import ReproInputError  # noqa: E402
from repro.core.figures import no_data, save_figure
from repro.core.results import read_table  # noqa: E402
from repro.core.stage import Stage, run  # noqa: E402
from repro.datadream.table import ACCURACY_COLUMNS, FID_COLUMNS  # noqa: E402

# One colour per source of training images, the same in every figure.
COLOR = {
    "real": "#1f77b4",
    "unadapted": "#8c8c8c",
    "cls": "#2ca02c",
    "dset": "#d62728",
    "zero_shot": "#444444",
}
GENERATOR_NAME = {
    "unadapted": "unadapted generator",
    "cls": "DataDream_cls",
    "dset": "DataDream_dset",
}
GENERATORS = ("unadapted", "cls", "dset")
# The main table's rows, top to bottom: (method, generator).
MAIN_ROWS = [
    ("real", "none"),
    ("synthetic", "unadapted"),
    ("synthetic", "cls"),
    ("synthetic", "dset"),
    ("real_synthetic", "unadapted"),
    ("real_synthetic", "cls"),
    ("real_synthetic", "dset"),
]
SHOT_FREE = {("zero_shot", "none"), ("synthetic", "unadapted")}
PANEL_TITLE = {
    "synthetic": "synthetic images only",
    "real_synthetic": "real shots + synthetic images",
}


def entry_label(method: str, generator: str) -> str:
    """How a reader should see (method, generator)."""
    if method == "zero_shot":
        return "zero-shot CLIP"
    if method == "real":
        return "real shots only"
    source = GENERATOR_NAME.get(generator, generator)
    return f"synthetic: {source}" if method == "synthetic" else f"real + synthetic: {source}"


def entry_color(method: str, generator: str) -> str:
    return COLOR["real"] if method == "real" else COLOR.get(generator, COLOR["zero_shot"])


def main_rows(table: pd.DataFrame, method: str, generator: str, main_shots: int) -> pd.DataFrame:
    """The selected rows (val-chosen N) of one method at the main table's shots."""
    shots = 0 if (method, generator) in SHOT_FREE else main_shots
    return table[
        (table.method == method)
        & (table.generator == generator)
        & (table.shots == shots)
        & table.selected.astype(bool)
    ]


def percent_stats(values) -> tuple[float, float, np.ndarray]:
    """(mean, std (0 for one value), values) in percent, NaNs dropped."""
    xs = 100.0 * np.asarray([v for v in values if not math.isnan(float(v))], dtype=float)
    if xs.size == 0:
        return math.nan, math.nan, xs
    return float(xs.mean()), float(xs.std(ddof=1)) if xs.size > 1 else 0.0, xs


def zero_shot_line(ax, table: pd.DataFrame, orientation: str = "h") -> None:
    """Zero-shot CLIP's accuracy as a dashed reference line, labelled."""
    mean, _, xs = percent_stats(table[table.method == "zero_shot"].test_acc)
    if xs.size == 0:
        return
    line = ax.axvline if orientation == "v" else ax.axhline
    line(mean, color=COLOR["zero_shot"], ls="--", lw=1.4, label=f"zero-shot CLIP ({mean:.1f}%)")


def main_figure(table: pd.DataFrame, fid: pd.DataFrame, main_shots: int) -> plt.Figure:
    """Accuracy per method at the main shots (bars: mean +- std, dots: seeds), zero-shot
    CLIP as a line; FID per generator beside it."""
    fig, (ax, fx) = plt.subplots(
        1, 2, figsize=(11.5, 4.6), gridspec_kw={"width_ratios": [2.6, 1]}, layout="constrained"
    )
    rows = [(m, g) for m, g in MAIN_ROWS if not main_rows(table, m, g, main_shots).empty]
    for y, (method, generator) in enumerate(rows):
        mean, std, xs = percent_stats(main_rows(table, method, generator, main_shots).test_acc)
        color = entry_color(method, generator)
        synthetic_only = method == "synthetic"
        ax.barh(
            y,
            mean,
            xerr=std,
            color=color,
            alpha=0.45 if synthetic_only else 0.9,
            hatch="//" if synthetic_only else None,
            edgecolor=color,
            capsize=4,
            height=0.7,
        )
        ax.scatter(xs, np.full(xs.size, y), color="k", s=10, zorder=3, lw=0)
        # The number inside the bar's base, where no error bar or dot can cover it.
        ax.text(
            1.0,
            y,
            f"{mean:.1f}%",
            va="center",
            fontsize=9,
            fontweight="bold",
            color="black" if synthetic_only else "white",
        )
    ax.set_yticks(range(len(rows)), [entry_label(*r) for r in rows])
    ax.invert_yaxis()
    zero_shot_line(ax, table, orientation="v")
    if rows:
        ax.set_xlim(0, 110)
        fig.legend(
            handles=[
                *ax.get_legend_handles_labels()[0],
                Patch(
                    facecolor="white", edgecolor="0.3", hatch="//", label="synthetic images only"
                ),
                Patch(facecolor="0.3", label="real shots (+ synthetic images)"),
                Line2D([], [], color="k", marker="o", ls="", ms=3, label="one seed"),
            ],
            loc="outside lower center",
            ncol=4,
            fontsize=9,
            frameon=False,
        )
    else:
        no_data(ax)
    ax.set_xlabel("test accuracy (%), epoch and N chosen on validation")
    ax.set_title(f"Classifiers at {main_shots} real shots per class", fontsize=11)
    ax.grid(axis="x", alpha=0.3)

    drawn = []
    for generator in GENERATORS:
        rows_g = fid[fid.generator == generator]
        if generator != "unadapted":
            rows_g = rows_g[rows_g.shots == main_shots]
        values = rows_g.fid.dropna().to_numpy(float)
        if values.size == 0:
            continue
        y = len(drawn)
        std = values.std(ddof=1) if values.size > 1 else 0.0
        fx.barh(y, values.mean(), xerr=std, color=COLOR[generator], capsize=4, height=0.7)
        fx.scatter(values, np.full(values.size, y), color="k", s=10, zorder=3, lw=0)
        fx.text(
            0.03 * values.mean(),
            y,
            f"{values.mean():.3g}",
            va="center",
            fontsize=9,
            fontweight="bold",
            color="white",
        )
        drawn.append(GENERATOR_NAME[generator])
    if drawn:
        fx.set_yticks(range(len(drawn)), drawn)
        fx.invert_yaxis()
    else:
        no_data(fx, "no FID rows")
    fx.set_xlabel("FID to the real test digits\n(lower = closer to real)")
    fx.set_title("Synthetic sets", fontsize=11)
    fx.grid(axis="x", alpha=0.3)
    seeds = table.seed.nunique() if len(table) else 0
    fig.suptitle(f"DataDream at this scale: test accuracy and FID, mean ± std over {seeds} seeds")
    return fig


def mean_band(ax, x, groups, color, label, ls="-", marker="o") -> None:
    """A line of means with a ± std band (x ascending)."""
    stats = groups.agg(["mean", "std"]).fillna(0.0)
    mean, std = 100 * stats["mean"].to_numpy(), 100 * stats["std"].to_numpy()
    if len(x) == 1:  # a band needs two points: an error bar instead
        ax.errorbar(x, mean, yerr=std, color=color, marker=marker, ms=7, capsize=4, label=label)
        return
    ax.plot(x, mean, color=color, ls=ls, marker=marker, lw=2, ms=6, label=label)
    ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.15, lw=0)


def log_ticks(ax, values) -> None:
    values = sorted(set(int(v) for v in values))
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(values))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([str(v) for v in values])


def n_synthetic_figure(table: pd.DataFrame, main_shots: int) -> plt.Figure:
    """Test accuracy vs synthetic images per class, every N (not only the chosen one)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True, layout="constrained")
    real = main_rows(table, "real", "none", main_shots)
    for ax, method in zip(axes, ("synthetic", "real_synthetic"), strict=True):
        ns = []
        for generator in GENERATORS:
            shots = 0 if (method, generator) in SHOT_FREE else main_shots
            rows = table[
                (table.method == method) & (table.generator == generator) & (table.shots == shots)
            ]
            if rows.empty:
                continue
            groups = rows.groupby("n_synthetic_per_class").test_acc
            x = np.array(sorted(rows.n_synthetic_per_class.unique()), dtype=float)
            mean_band(ax, x, groups, COLOR[generator], GENERATOR_NAME[generator])
            ns += list(x)
        if len(real):
            mean, _, _ = percent_stats(real.test_acc)
            ax.axhline(mean, color=COLOR["real"], lw=1.4, label=f"real shots only ({mean:.1f}%)")
        zero_shot_line(ax, table)
        if ns:
            log_ticks(ax, ns)
        else:
            no_data(ax)
        ax.set_xlabel("synthetic images per class (N)")
        ax.set_title(PANEL_TITLE[method], fontsize=11)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    # One legend under both panels (the same lines in each), where it covers no data.
    legend = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    if legend:
        fig.legend(
            legend.values(), legend.keys(), loc="outside lower center", ncol=3, frameon=False
        )
    fig.suptitle(
        f"More synthetic images per class ({main_shots} real shots for the adapted "
        "generators; mean ± std over seeds)"
    )
    return fig


def shots_figure(table: pd.DataFrame) -> plt.Figure:
    """Test accuracy vs real shots per class: real-only at every size, the DataDream
    methods where the generator was adapted (val-chosen N), shot-free references."""
    fig, ax = plt.subplots(figsize=(7.5, 4.6), layout="constrained")
    chosen = table[table.selected.astype(bool)]
    real = chosen[chosen.method == "real"]
    shots = sorted(set(chosen[chosen.shots > 0].shots))
    if not real.empty:
        x = np.array(sorted(real.shots.unique()), dtype=float)
        mean_band(ax, x, real.groupby("shots").test_acc, COLOR["real"], "real shots only")
    for method, ls, marker in (("real_synthetic", "-", "D"), ("synthetic", ":", "s")):
        for generator in ("cls", "dset", "unadapted"):
            rows = chosen[
                (chosen.method == method) & (chosen.generator == generator) & (chosen.shots > 0)
            ]
            if rows.empty:
                continue
            x = np.array(sorted(rows.shots.unique()), dtype=float)
            label = entry_label(method, generator)
            mean_band(ax, x, rows.groupby("shots").test_acc, COLOR[generator], label, ls, marker)
    unadapted = chosen[(chosen.method == "synthetic") & (chosen.generator == "unadapted")]
    unadapted = unadapted[unadapted.shots == 0]
    if len(unadapted):
        mean, _, _ = percent_stats(unadapted.test_acc)
        ax.axhline(
            mean,
            color=COLOR["unadapted"],
            ls=":",
            lw=1.4,
            label=f"synthetic: unadapted generator, no real shot ({mean:.1f}%)",
        )
    zero_shot_line(ax, table)
    if shots:
        log_ticks(ax, shots)
        fig.legend(loc="outside right center", fontsize=8, frameon=False)
    else:
        no_data(ax)
    ax.set_xlabel("real shots per class")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Accuracy vs real shots (mean ± std over seeds, N chosen on validation)")
    ax.grid(alpha=0.3)
    return fig


def first_per_class(data, classes: int, k: int) -> torch.Tensor:
    """The first k images of each class [classes * k, C, H, W] (blank where a class has fewer)."""
    out = torch.full((classes, k, *data.images.shape[1:]), -1.0)
    for c in range(classes):
        idx = torch.nonzero(data.labels == c).flatten()[:k]
        out[c, : len(idx)] = data.images[idx]
    return out.flatten(0, 1)


def tile(images: torch.Tensor, rows: int, cols: int, gap: int = 1) -> np.ndarray:
    """Single-channel images [rows*cols, 1, h, w] in [-1, 1] -> one [0, 1] array with grey gaps."""
    h, w = images.shape[-2:]
    pixels = ((images[:, 0].float() + 1) / 2).clamp(0, 1).numpy()
    grid = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap), 0.5)
    for k in range(rows * cols):
        r, c = divmod(k, cols)
        grid[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = pixels[k]
    return grid


def samples_figure(panels: list[tuple[str, object]], classnames: list[str], k: int) -> plt.Figure:
    """One panel per source (title, ImageDataset): k images of each class, a row per class."""
    classes = len(classnames)
    fig, axes = plt.subplots(
        1,
        len(panels),
        figsize=(max(2.0, 0.42 * k + 0.5) * len(panels) + 0.8, 0.42 * classes + 1.2),
        squeeze=False,
        layout="constrained",
    )
    for i, (ax, (title, data)) in enumerate(zip(axes[0], panels, strict=True)):
        images = first_per_class(data, classes, k)
        if images.shape[1] != 1:
            images = images.mean(dim=1, keepdim=True)  # grey for a colour set
        ax.imshow(tile(images, classes, k), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(title, fontsize=10)
        h = images.shape[-2] + 1
        ax.set_yticks(np.arange(classes) * h + h / 2 - 0.5, classnames if i == 0 else [])
        ax.set_xticks([])
        ax.tick_params(length=0)
    fig.suptitle("Real shots and synthetic images, one row per class")
    return fig


def parse_synthetic(values: list[str]) -> dict[str, str]:
    """["unadapted=path", "cls=path", ...] -> {generator: path} (generators checked)."""
    out = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or name not in GENERATORS or not path:
            raise ReproInputError(
                f"--synthetic: {value!r} is not GENERATOR=PATH with GENERATOR in {GENERATORS}"
            )
        out[name] = path
    return out


def main(argv=None) -> None:
    stage = Stage(__doc__, paper="datadream")
    add = stage.parser.add_argument
    add("--accuracy", required=True, help="results/datadream_accuracy.csv")
    add("--fid", required=True, help="results/datadream_fid.csv")
    add("--fewshot", required=True, help="the few-shot set of the sample grid")
    add("--synthetic", nargs="+", default=[], help="GENERATOR=PATH of the sample grid's sets")
    add("--main-out", required=True)
    add("--n-synthetic-out", required=True)
    add("--shots-out", required=True)
    add("--samples-out", required=True)
    args = stage.start(argv)
    params = stage.params
    main_shots = require(params, "main_shots", "datadream")
    # Everything is read before the first figure is written.
    table = read_table(args.accuracy, required=ACCURACY_COLUMNS)
    fid = read_table(args.fid, required=FID_COLUMNS)
    fewshot = load_image_dataset(args.fewshot, kind="datadream_fewshot")
    classnames = params.get("classnames") or fewshot.meta.get("classnames")
    if not classnames:
        raise ReproInputError(f"datadream.classnames: missing, and {args.fewshot} names none")
    panels = [(f"real shots ({fewshot.meta.get('shots', '?')} per class)", fewshot)]
    synthetic = parse_synthetic(args.synthetic)
    for generator in [g for g in GENERATORS if g in synthetic]:  # the grid's column order
        path = synthetic[generator]
        data = load_image_dataset(path, kind="datadream_synthetic")
        if len(data.labels) == 0:
            raise ReproInputError(f"{path}: the synthetic set holds no image")
        panels.append((GENERATOR_NAME[generator], data))
    k = int(params.get("grid_per_class", min(4, int(fewshot.meta.get("shots", 4)))))

    save_figure(main_figure(table, fid, main_shots), args.main_out)
    save_figure(n_synthetic_figure(table, main_shots), args.n_synthetic_out)
    save_figure(shots_figure(table), args.shots_out)
    save_figure(samples_figure(panels, list(classnames), k), args.samples_out)


if __name__ == "__main__":
    run(main)
