"""Stage fedre_figures: FedRE's figures at this scale, from the headline tables.

- curves: one panel per task x partition: the sample-weighted test accuracy over all
  clients (each client's model on its own test split; the client -1 rows) against the
  round, one line per algorithm (mean over seeds, shaded +- std), FedRE thick and on
  top;
- communication: one panel per task x partition: what the clients upload per round
  (scalars, mean over rounds and seeds) per algorithm, horizontal bars on a log axis
  labelled with the value, a diamond at the bytes; an algorithm that uploads nothing
  (Local) reads "none". With the summary, each algorithm's label carries its accuracy
  (mean of the last rounds, over seeds): what each upload buys.

The drawing functions return the matplotlib Figure.

    python -m repro.fedre.plots --accuracy results/fedre_accuracy.csv \
        --communication results/fedre_communication.csv --summary results/fedre_summary.csv \
        --curves-out results/figures/fedre_curves.png \
        --communication-out results/figures/fedre_communication.png
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from repro.core.figures import no_data, save_figure
from repro.core.results import read_table  # noqa: E402
from repro.core.stage import Stage, run  # noqa: E402
from repro.fedre.claims import DISPLAY_NAME, count_text  # noqa: E402
from repro.fedre.table import (  # noqa: E402
    ABLATION_COLUMNS,
    ACCURACY_COLUMNS,
    ALL_CLIENTS,
    COMMUNICATION_COLUMNS,
    PRIVACY_COLUMNS,
    SUMMARY_COLUMNS,
)
from repro.fedre.workflow import ALGORITHMS  # noqa: E402

COLOR = {
    "local": "#8c8c8c",
    "fedproto": "#1f77b4",
    "fedgh": "#2ca02c",
    "lg_fedavg": "#9467bd",
    "fedtgp": "#ff7f0e",
    "fedre": "#d62728",
    "fedallrep": "#e377c2",
}
CURVES_TITLE = "accuracy of each client's model on its own test data (sample-weighted)"
COMMUNICATION_TITLE = "what the clients upload per round (mean over rounds and seeds)"


def name(algorithm: str) -> str:
    return DISPLAY_NAME.get(algorithm, algorithm)


def panels(settings: list[tuple], width: float = 4.8, height: float = 3.8):
    """A figure with one axes per (task, partition), as square a grid as fits (two tasks
    x two partitions: 2 x 2), at most three to a row; returns (fig, axes in `settings`
    order), unused grid cells removed."""
    count = max(1, len(settings))
    cols = min(3, math.ceil(math.sqrt(count)))
    rows = math.ceil(count / cols)
    fig, grid = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    axes = list(grid.flat)
    for ax in axes[count:]:
        fig.delaxes(ax)
    return fig, axes[:count]


def _settings(table: pd.DataFrame) -> list[tuple]:
    return sorted(table[["task", "partition"]].drop_duplicates().itertuples(index=False, name=None))


def _algorithms(table: pd.DataFrame) -> list[str]:
    present = set(table["algorithm"])
    return [a for a in ALGORITHMS if a in present]


def seed_curve(rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rounds, mean over seeds, std over seeds (0 for one seed)) of one algorithm's
    all-clients accuracy, in percent."""
    per_round = rows.groupby("round")["accuracy"]
    mean = 100.0 * per_round.mean()
    std = (100.0 * per_round.std(ddof=1)).fillna(0.0)
    return mean.index.to_numpy(), mean.to_numpy(), std.to_numpy()


def curves_figure(accuracy: pd.DataFrame) -> plt.Figure:
    """Weighted test accuracy against round, one panel per task x partition."""
    overall = accuracy[accuracy["client"] == ALL_CLIENTS] if len(accuracy) else accuracy
    settings = _settings(overall) if len(overall) else []
    fig, axes = panels(settings)
    if not settings:
        no_data(axes[0])
        return fig
    for ax, (task, partition) in zip(axes, settings, strict=True):
        rows = overall[(overall.task == task) & (overall.partition == partition)]
        for algorithm in _algorithms(rows):
            rounds, mean, std = seed_curve(rows[rows.algorithm == algorithm])
            ours = algorithm == "fedre"
            (line,) = ax.plot(
                rounds,
                mean,
                color=COLOR.get(algorithm, "k"),
                lw=2.8 if ours else 1.4,
                zorder=10 if ours else 3,
                label=name(algorithm),
            )
            line.set_gid(algorithm)
            ax.fill_between(
                rounds,
                mean - std,
                mean + std,
                color=line.get_color(),
                alpha=0.2 if ours else 0.12,
                lw=0,
                zorder=9 if ours else 2,
            )
        seeds = rows.seed.nunique()
        ax.set_title(f"{task} ({partition}), {seeds} seed{'s' * (seeds != 1)}")
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("weighted test accuracy (%)")
        ax.grid(alpha=0.3)
    legend_once(fig, axes)
    fig.suptitle(CURVES_TITLE + "\nlines: mean over seeds, shaded: ± std")
    fig.tight_layout()
    return fig


def legend_once(fig, axes) -> None:
    """One legend for the figure, each label once, in the order first drawn."""
    entries: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            entries.setdefault(label, handle)
    if entries:
        fig.legend(
            entries.values(),
            entries.keys(),
            loc="lower center",
            ncol=min(len(entries), 4),
            fontsize=8,
            frameon=False,
            bbox_to_anchor=(0.5, -0.08),
        )


def upload_per_algorithm(rows: pd.DataFrame) -> pd.DataFrame:
    """Per algorithm (ALGORITHMS order): upload scalars and bytes per round, the mean over
    rounds per seed, then over seeds."""
    uploads = rows[rows.direction == "upload"]
    per_seed = uploads.groupby(["algorithm", "seed"])[["scalars", "bytes"]].mean()
    means = per_seed.groupby(level="algorithm").mean()
    return means.reindex([a for a in ALGORITHMS if a in means.index])


def communication_figure(
    communication: pd.DataFrame, summary: pd.DataFrame | None = None
) -> plt.Figure:
    """Upload per round per algorithm, horizontal bars on a log axis, one panel per task
    x partition; with `summary`, each label carries the algorithm's accuracy there."""
    settings = _settings(communication) if len(communication) else []
    fig, axes = panels(settings, width=6.0, height=3.6)
    if not settings:
        no_data(axes[0])
        return fig
    for ax, (task, partition) in zip(axes, settings, strict=True):
        rows = communication[(communication.task == task) & (communication.partition == partition)]
        uploads = upload_per_algorithm(rows)
        y = np.arange(len(uploads))
        positive = uploads.scalars[uploads.scalars > 0]
        low = 10.0 ** math.floor(math.log10(positive.min())) / 10 if len(positive) else 1.0
        high = 10.0 ** math.ceil(math.log10(uploads.values.max())) * 30 if len(positive) else 10.0
        for k, (algorithm, values) in enumerate(uploads.iterrows()):
            if values.scalars > 0:
                ax.barh(k, values.scalars, color=COLOR.get(algorithm, "k"), alpha=0.85, height=0.6)
                ax.plot(values.bytes, k, "D", color="k", ms=4, label="bytes per round")
                text = f"{count_text(values.scalars)} scalars, {count_text(values.bytes)}B"
                ax.text(max(values.scalars, values.bytes) * 1.3, k, text, va="center", fontsize=7)
            else:
                ax.text(low * 1.3, k, "none", va="center", fontsize=8, color="0.3")
        ax.set_xscale("log")
        ax.set_xlim(low, high)
        labels = [_label(algorithm, summary, task, partition) for algorithm in uploads.index]
        ax.set_yticks(y, labels, fontsize=8)
        ax.set_ylim(len(uploads) - 0.5, -0.5)  # the first algorithm on top, rows without bars kept
        ax.set_xlabel("per round, log scale (bars: scalars; diamonds: bytes)")
        ax.set_title(f"{task} ({partition})")
        ax.grid(axis="x", alpha=0.3)
    legend_once(fig, axes)
    fig.suptitle(COMMUNICATION_TITLE)
    fig.tight_layout()
    return fig


def _label(algorithm: str, summary: pd.DataFrame | None, task: str, partition: str) -> str:
    """The algorithm's name and, with a summary, its accuracy on (task, partition)."""
    if summary is None or summary.empty:
        return name(algorithm)
    rows = summary[
        (summary.task == task) & (summary.partition == partition) & (summary.algorithm == algorithm)
    ]
    if rows.empty:
        return name(algorithm)
    return f"{name(algorithm)}\n{100 * rows.last_mean_accuracy.mean():.1f}% accuracy"


VARIANT_NAME = {
    "fedre": "FedRE: U(0,1) weights,\nredrawn every round",
    "fixed": "weights drawn once,\nkept every round",
    "uniform": "uniform average\nof the prototypes",
    "onehot": "one prototype\n(one-hot weights)",
    "simplex": "weights uniform\non the simplex (Dir(1))",
}


def ablation_figure(ablation: pd.DataFrame) -> plt.Figure:
    """The ablation as the paper's table: per variant, the mean of the last rounds'
    weighted accuracy (bar: mean over seeds, error bar: std, dots: seeds), FedRE first and
    its mean dashed across the panel."""
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    if ablation.empty:
        no_data(ax)
        return fig
    order = ["fedre", *sorted(v for v in ablation.variant.unique() if v != "fedre")]
    stats = []
    for i, variant in enumerate(order):
        values = 100 * ablation[ablation.variant == variant].last_mean_accuracy.to_numpy(float)
        mean = float(values.mean())
        std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        stats.append(mean)
        color = COLOR.get("fedre", "#d62728") if variant == "fedre" else "#8c8c8c"
        ax.bar(i, mean, yerr=std, color=color, alpha=0.85, capsize=4, width=0.6)
        ax.scatter(np.full(len(values), i), values, color="black", s=10, zorder=3)
        ax.text(i, mean + std + 0.5, f"{mean:.1f}", ha="center", va="bottom", fontsize=8)
    ax.axhline(stats[0], color=COLOR.get("fedre", "#d62728"), ls="--", lw=1)
    ax.set_xticks(range(len(order)), [VARIANT_NAME.get(v, v) for v in order], fontsize=8)
    low = min(stats) - 10
    ax.set_ylim(max(0.0, low), min(100.0, max(stats) + 8))
    ax.set_ylabel("weighted test accuracy (%),\nmean of the last rounds")
    first = ablation.iloc[0]
    ax.set_title(
        f"FedRE's entanglement, one part changed ({first.task}, {first.partition}, "
        f"{ablation.seed.nunique()} seeds)"
    )
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


INVERSION_ORDER = ("fedallrep", "fedproto", "fedgh", "fedtgp", "fedre")


def inversion_figure(privacy: pd.DataFrame, examples: dict[str, dict]) -> plt.Figure:
    """Per task (one example file each, `examples`: task -> {"<algorithm>/recon",
    "<algorithm>/nearest"} tensors in [-1, 1]): one row per algorithm attacked, pairs of
    reconstruction over the client's nearest true image, the mean PSNR in the label."""
    tasks = list(examples)
    algorithms = [a for a in INVERSION_ORDER if any(f"{a}/recon" in e for e in examples.values())]
    if not tasks or not algorithms:
        fig, ax = plt.subplots(figsize=(6, 2))
        no_data(ax, "no inversion examples")
        ax.axis("off")
        return fig
    per_row = 6
    fig, axes = plt.subplots(
        len(algorithms) * 2,
        per_row * len(tasks),
        figsize=(1.0 * per_row * len(tasks) + 1.5, 2.0 * len(algorithms) + 0.6),
        squeeze=False,
    )
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        for side in ax.spines.values():
            side.set_visible(False)
    for t, task in enumerate(tasks):
        for a, algorithm in enumerate(algorithms):
            recon = examples[task].get(f"{algorithm}/recon")
            nearest = examples[task].get(f"{algorithm}/nearest")
            psnrs = privacy[privacy.algorithm == algorithm].groupby("task").psnr.mean()
            label = name(algorithm) + "".join(f"\n{k}: {v:.1f} dB" for k, v in psnrs.items())
            for j in range(per_row):
                top, bottom = axes[2 * a, t * per_row + j], axes[2 * a + 1, t * per_row + j]
                if recon is not None and j < len(recon):
                    top.imshow(_image(recon[j]), cmap="gray", vmin=0, vmax=1)
                    bottom.imshow(_image(nearest[j]), cmap="gray", vmin=0, vmax=1)
            if t == 0:  # the row's labels once, left of the first task
                first = axes[2 * a, 0]
                first.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
                axes[2 * a + 1, 0].set_ylabel(
                    "nearest\ntrue", rotation=0, ha="right", va="center", fontsize=7
                )
        axes[0, t * per_row].set_title(
            f"{task}: reconstructed (top) / client's image", loc="left", fontsize=9
        )
    fig.suptitle(
        "inverting each upload: the server decodes one client's last upload "
        "(mean PSNR over clients and seeds)",
        fontsize=10,
    )
    fig.tight_layout()
    return fig


def _image(x) -> np.ndarray:
    """[C, H, W] in [-1, 1] -> an array imshow takes, in [0, 1]."""
    x = (np.asarray(x, dtype=float) + 1) / 2
    return x[0] if x.shape[0] == 1 else np.transpose(x, (1, 2, 0)).clip(0, 1)


def load_examples(paths) -> dict[str, dict]:
    """The first file of each task (named <task>_<partition>_s<seed>_inversion...)."""
    from safetensors.torch import load_file

    out = {}
    for path in sorted(paths, key=str):
        task = Path(path).name.split("_")[0]
        if task not in out:
            tensors = load_file(str(path))
            if tensors:
                out[task] = {k: v.numpy() for k, v in tensors.items()}
    return out


def main(argv=None) -> None:
    stage = Stage(__doc__, paper="fedre")
    add = stage.parser.add_argument
    add("--accuracy", required=True, help="results/fedre_accuracy.csv")
    add("--communication", required=True, help="results/fedre_communication.csv")
    add("--summary", required=True, help="results/fedre_summary.csv")
    add("--curves-out", required=True, help="results/figures/fedre_curves.png")
    add("--communication-out", required=True, help="results/figures/fedre_communication.png")
    add("--ablation", help="results/fedre_ablation.csv")
    add("--ablation-out", help="results/figures/fedre_ablation.png")
    add("--privacy", help="results/fedre_privacy.csv")
    add("--inversion-examples", nargs="*", default=[], help="the simulation's examples")
    add("--inversion-out", help="results/figures/fedre_inversion.png")
    args = stage.start(argv)
    accuracy = read_table(args.accuracy, required=ACCURACY_COLUMNS)
    communication = read_table(args.communication, required=COMMUNICATION_COLUMNS)
    summary = read_table(args.summary, required=SUMMARY_COLUMNS)
    save_figure(curves_figure(accuracy), args.curves_out)
    save_figure(communication_figure(communication, summary), args.communication_out)
    if args.ablation and args.ablation_out:
        ablation = read_table(args.ablation, required=ABLATION_COLUMNS)
        save_figure(ablation_figure(ablation), args.ablation_out)
    if args.privacy and args.inversion_out:
        privacy = read_table(args.privacy, required=PRIVACY_COLUMNS)
        examples = load_examples(args.inversion_examples)
        save_figure(inversion_figure(privacy, examples), args.inversion_out)


if __name__ == "__main__":
    run(main)
