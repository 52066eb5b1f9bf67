"""Stage humo_figures: HuMo's figures at this scale, from the metrics and sync-curve tables.

- humo_ablation.png: the paper's ablation table as a figure, one panel per metric
  (identity similarity, lip sync, text alignment, frame FID), one bar per variant (full,
  w/o focus-by-predicting, w/o progressive training, full fine-tuning) on TIA at the
  main CFG form: mean over seeds, error bar +- std, dots the seeds; the real test clips'
  value dashed across the panel.
- humo_sync.png: lip sync against the audio offset, one panel per task (TIA, TA, and the
  real clips): the mean over clips of the correlation of the mouth with the audio
  envelope shifted by each offset, matched audio against another clip's (shuffled), the
  line the mean over seeds, shaded +- std. A model that follows the audio peaks at 0.
- humo_cfg.png: the sync / identity trade-off of the CFG forms on TIA: identity
  similarity (x) against lip sync (y), mean with +- std error bars over seeds.
- humo_strips.png: for a few test clips, one row per task and one of the real clip
  (the reference portrait first, then the frames, upscaled with nearest neighbour so
  16 x 16 frames stay sharp), the clip's audio envelope under its frames.

Each drawing function returns (the matplotlib Figure, the DataFrame of what it drew),
so that a test can check the plotted numbers against the table.

    python -m repro.humo.plots --metrics results/humo_metrics.csv \
        --curves results/humo_sync_curves.csv --strips results/humo/strips.safetensors \
        --out-dir results/figures --params '{"cfg": "paper"}'
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from repro.core import figures
from repro.core.errors import ReproInputError  # noqa: E402
from repro.core.figures import no_data, save_figure
from repro.core.io import load_tensors, save_tensors  # noqa: E402
from repro.core.results import mean_std, read_table  # noqa: E402
from repro.core.stage import Stage, run  # noqa: E402
from repro.humo.table import AUDIO, CFG_FORMS, COLUMNS, CURVE_COLUMNS, REAL  # noqa: E402

FIGURES = {
    "ablation": "humo_ablation.png",
    "sync": "humo_sync.png",
    "cfg": "humo_cfg.png",
    "strips": "humo_strips.png",
}
ABLATION_VARIANTS = ("full", "no_focus", "no_progressive", "full_finetune")
ABLATION_METRICS = ("id_sim", "sync_c", "text_align", "fid")
SYNC_TASKS = ("TIA", "TA", "real")
VARIANT_NAME = {
    "full": "HuMo\n(full)",
    "no_focus": "w/o focus-\nby-predicting",
    "no_progressive": "w/o progressive\ntraining",
    "full_finetune": "full\nfine-tuning",
}
METRIC_NAME = {
    "id_sim": "identity similarity (cosine)",
    "sync_c": "lip sync (correlation at best offset)",
    "text_align": "text alignment (accuracy)",
    "fid": "frame FID (lower is better)",
}
CFG_NAME = {
    "paper": "time-adaptive (paper, Eq. 4)",
    "code_17b": "17B code (3 calls)",
    "code_1_7b": "1.7B code (4 calls)",
    "fixed": "fixed weights",
}
COLOR = {
    "full": "#d62728",
    "no_focus": "#1f77b4",
    "no_progressive": "#2ca02c",
    "full_finetune": "#9467bd",
    "paper": "#d62728",
    "code_17b": "#ff7f0e",
    "code_1_7b": "#1f77b4",
    "fixed": "#8c8c8c",
    "matched": "#d62728",
    "shuffled": "#8c8c8c",
}
# The CFG forms of generated sets (the real clips' rows have cfg "none").
GENERATED_FORMS = tuple(form for form in CFG_FORMS if form != REAL["cfg"])
STRIPS_KIND = "humo_strips"
STRIP_SCALE = 4  # nearest-neighbour upscale of each frame in the strips


def require(table: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    """Refuse a table that lacks any of `columns`, naming them."""
    missing = [c for c in columns if c not in table]
    if missing:
        raise ReproInputError(f"{what} lacks columns {missing} (has {list(table.columns)})")


def select(table: pd.DataFrame, task: str, variant: str, cfg: str) -> pd.DataFrame:
    return table[(table.task == task) & (table.variant == variant) & (table.cfg == cfg)]


def real_rows(table: pd.DataFrame) -> pd.DataFrame:
    return select(table, REAL["task"], REAL["variant"], REAL["cfg"])


def over_seeds(values) -> tuple[float, float, int]:
    """(mean, std (0 for one seed), number of seeds) of per-seed values, NaNs dropped."""
    values = [float(v) for v in values]
    mean, std = mean_std(values)
    return mean, std, sum(not np.isnan(v) for v in values)


# ---------------------------------------------------------------- the ablation


def ablation_data(metrics: pd.DataFrame, cfg: str = "paper") -> pd.DataFrame:
    """Per metric of ABLATION_METRICS and variant present (TIA at `cfg`, in
    ABLATION_VARIANTS order, then "real" for the real clips' rows): mean, std and n over
    seeds. Columns: metric, variant, mean, std, n_seeds."""
    require(metrics, [*COLUMNS[:4], *ABLATION_METRICS], "the metrics table")
    groups = [(v, select(metrics, "TIA", v, cfg)) for v in ABLATION_VARIANTS]
    groups.append(("real", real_rows(metrics)))
    rows = []
    for metric in ABLATION_METRICS:
        for variant, group in groups:
            if len(group):
                mean, std, n = over_seeds(group[metric])
                rows.append((metric, variant, mean, std, n))
    return pd.DataFrame(rows, columns=["metric", "variant", "mean", "std", "n_seeds"])


def ablation_figure(metrics: pd.DataFrame, cfg: str = "paper") -> tuple[plt.Figure, pd.DataFrame]:
    """One panel per metric, one bar per variant (TIA at `cfg`): mean over seeds, error
    bar the std, dots the seeds; the real clips' mean dashed across (where measured)."""
    data = ablation_data(metrics, cfg)
    fig, axes = plt.subplots(1, len(ABLATION_METRICS), figsize=(3.3 * len(ABLATION_METRICS), 3.6))
    for ax, metric in zip(axes, ABLATION_METRICS, strict=True):
        stats = data[(data.metric == metric) & (data.variant != "real")].reset_index(drop=True)
        if stats.empty:
            no_data(ax, f"no TIA rows at cfg {cfg!r}")
        for i, row in stats.iterrows():
            color = COLOR.get(row.variant, "k")
            bars = ax.bar(i, row["mean"], yerr=row["std"], color=color, capsize=4, width=0.6)
            bars.patches[0].set_gid(row.variant)
            seeds = select(metrics, "TIA", row.variant, cfg)[metric].to_numpy(float)
            dots = ax.scatter(np.full(len(seeds), i), seeds, color="black", s=9, zorder=3)
            dots.set_gid(f"seeds/{row.variant}")
            ax.annotate(
                f"{row['mean']:.3g}",
                (i, row["mean"] + row["std"]),
                xytext=(0, 3),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=7,
            )
        real = data[(data.metric == metric) & (data.variant == "real")]
        if len(real) and np.isfinite(real["mean"].iloc[0]):
            line = ax.axhline(real["mean"].iloc[0], color="0.3", ls="--", lw=1, label="real clips")
            line.set_gid("real")
        ax.set_xticks(range(len(stats)), [VARIANT_NAME.get(v, v) for v in stats.variant])
        ax.tick_params(axis="x", labelsize=7)
        ax.set_title(METRIC_NAME[metric], fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    seeds = int(data.n_seeds.max()) if len(data) else 0
    fig.suptitle(
        f"HuMo's ablation (TIA, CFG {cfg!r}): bars mean over {seeds} seeds, "
        "error bars ± std, dots seeds, dashed: real test clips",
        fontsize=10,
    )
    fig.tight_layout()
    return fig, data


# ---------------------------------------------------------------- sync curves


def sync_data(curves: pd.DataFrame, cfg: str = "paper", variant: str = "full") -> pd.DataFrame:
    """Per task of SYNC_TASKS (TIA / TA: `variant` at `cfg`; real: the real rows), audio
    and offset: the mean, std and n over seeds of the curve's correlation. Columns: task,
    audio, offset, mean, std, n_seeds."""
    require(curves, CURVE_COLUMNS, "the sync curves table")
    rows = []
    for task in SYNC_TASKS:
        chosen = real_rows(curves) if task == "real" else select(curves, task, variant, cfg)
        for audio in AUDIO:
            part = chosen[chosen.audio == audio]
            for offset, group in part.groupby("offset", sort=True):
                mean, std, n = over_seeds(group["corr"])
                rows.append((task, audio, int(offset), mean, std, n))
    return pd.DataFrame(rows, columns=["task", "audio", "offset", "mean", "std", "n_seeds"])


def sync_figure(
    curves: pd.DataFrame, cfg: str = "paper", variant: str = "full"
) -> tuple[plt.Figure, pd.DataFrame]:
    """Correlation of mouth and audio envelope against the offset, one panel per task,
    matched and shuffled audio, mean over seeds shaded +- std."""
    data = sync_data(curves, cfg, variant)
    fig, axes = plt.subplots(1, len(SYNC_TASKS), figsize=(4.2 * len(SYNC_TASKS), 3.4), sharey=True)
    for ax, task in zip(axes, SYNC_TASKS, strict=True):
        rows = data[data.task == task]
        if rows.empty:
            no_data(ax)
        for audio in AUDIO:
            line_rows = rows[rows.audio == audio]
            if line_rows.empty:
                continue
            x, mean, std = (line_rows[c].to_numpy(float) for c in ("offset", "mean", "std"))
            (line,) = ax.plot(x, mean, "o-", color=COLOR[audio], ms=3, label=f"{audio} audio")
            line.set_gid(audio)
            ax.fill_between(x, mean - std, mean + std, color=COLOR[audio], alpha=0.2, lw=0)
        ax.axvline(0, color="0.6", lw=0.8, ls=":")
        ax.axhline(0, color="0.6", lw=0.8)
        seeds = int(rows.n_seeds.max()) if len(rows) else 0
        where = "real test clips" if task == "real" else f"{task}, {variant}, CFG {cfg!r}"
        ax.set_title(f"{where}\n{seeds} seed{'s' * (seeds != 1)}", fontsize=9)
        ax.set_xlabel("audio offset (video frames)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mouth / envelope correlation\n(mean over clips)")
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes[1:]:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    if handles:
        fig.legend(handles, labels, loc="upper right", fontsize=8, frameon=False)
    fig.suptitle("lip sync against the audio offset: lines mean over seeds, shaded ± std")
    fig.tight_layout()
    return fig, data


# ---------------------------------------------------------------- CFG trade-off


def cfg_data(metrics: pd.DataFrame, variant: str = "full") -> pd.DataFrame:
    """Per CFG form present (CFG_FORMS order) on TIA rows of `variant`, then "none" for
    the real clips: id_sim and sync_c mean and std over seeds. Columns: cfg, id_sim_mean,
    id_sim_std, sync_c_mean, sync_c_std, n_seeds."""
    require(metrics, [*COLUMNS[:4], "id_sim", "sync_c"], "the metrics table")
    groups = [(form, select(metrics, "TIA", variant, form)) for form in GENERATED_FORMS]
    groups.append((REAL["cfg"], real_rows(metrics)))
    rows = []
    for form, group in groups:
        if len(group):
            id_mean, id_std, n = over_seeds(group.id_sim)
            sync_mean, sync_std, _ = over_seeds(group.sync_c)
            rows.append((form, id_mean, id_std, sync_mean, sync_std, n))
    columns = ["cfg", "id_sim_mean", "id_sim_std", "sync_c_mean", "sync_c_std", "n_seeds"]
    return pd.DataFrame(rows, columns=columns)


def cfg_figure(metrics: pd.DataFrame, variant: str = "full") -> tuple[plt.Figure, pd.DataFrame]:
    """Identity similarity (x) against lip sync (y) per CFG form on TIA, mean +- std over
    seeds; the real clips as a star."""
    data = cfg_data(metrics, variant)
    fig, ax = plt.subplots(figsize=(5.6, 4.2))
    if data.empty:
        no_data(ax)
    for row in data.itertuples(index=False):
        real = row.cfg == REAL["cfg"]
        label = "real test clips" if real else CFG_NAME.get(row.cfg, row.cfg)
        container = ax.errorbar(
            row.id_sim_mean,
            row.sync_c_mean,
            xerr=row.id_sim_std,
            yerr=row.sync_c_std,
            fmt="*" if real else "o",
            ms=12 if real else 7,
            color="black" if real else COLOR.get(row.cfg, "k"),
            capsize=3,
            label=f"{label} ({row.n_seeds} seed{'s' * (row.n_seeds != 1)})",
        )
        container.lines[0].set_gid(row.cfg)
    ax.set_xlabel(f"{METRIC_NAME['id_sim']}, to the reference")
    ax.set_ylabel(METRIC_NAME["sync_c"])
    ax.set_title(f"the sync / identity trade-off of the CFG forms (TIA, {variant})", fontsize=10)
    ax.grid(alpha=0.3)
    if len(data):
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig, data


# ---------------------------------------------------------------- strips


@dataclass
class Strips:
    """A few test clips as every task generated them: `videos[task]` uint8 [K,3,F,H,W],
    `reference` uint8 [K,3,H,W], `envelope` float32 [K,F], `real` uint8 [K,3,F,H,W]."""

    tasks: list[str]
    videos: dict[str, np.ndarray]
    reference: np.ndarray
    envelope: np.ndarray
    real: np.ndarray
    captions: list[str]


def save_strips(
    path: str | os.PathLike,
    videos: Mapping[str, torch.Tensor],
    reference: torch.Tensor,
    envelope: torch.Tensor,
    real: torch.Tensor,
    captions: Sequence[str],
) -> None:
    """Write the strips file (kind "humo_strips") that `load_strips` reads: `videos` maps
    each task to its generated clips, in the order the rows are drawn."""
    tensors = {f"video_{task}": video for task, video in videos.items()}
    tensors.update(reference=reference, envelope=envelope, real=real)
    save_tensors(
        path,
        tensors,
        kind=STRIPS_KIND,
        metadata={"tasks": list(videos), "captions": list(captions)},
    )


def load_strips(path: str | os.PathLike) -> Strips:
    """Read and check a strips file: every video [K,3,F,H,W] uint8 with the real clips'
    shape, reference [K,3,H,W], envelope [K,F], K captions. Errors name the file."""
    tensors, meta = load_tensors(path, kind=STRIPS_KIND, required=("reference", "envelope", "real"))
    tasks = meta.get("tasks")
    if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
        raise ReproInputError(f"{path}: metadata 'tasks' must be a list of task names")
    missing = [f"video_{t}" for t in tasks if f"video_{t}" not in tensors]
    if missing:
        raise ReproInputError(f"{path}: missing tensors {missing} (metadata tasks {tasks})")
    real = tensors["real"]
    if real.dtype != torch.uint8 or real.ndim != 5 or real.shape[1] != 3:
        raise ReproInputError(
            f"{path}: real must be uint8 [K, 3, F, H, W], got {real.dtype} {list(real.shape)}"
        )
    count, _, frames, height, width = real.shape
    expected = {
        **{f"video_{t}": (torch.uint8, tuple(real.shape)) for t in tasks},
        "reference": (torch.uint8, (count, 3, height, width)),
        "envelope": (torch.float32, (count, frames)),
    }
    for name, (dtype, shape) in expected.items():
        tensor = tensors[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ReproInputError(
                f"{path}: {name} is {tensor.dtype} {list(tensor.shape)}, expected {dtype} "
                f"{list(shape)} (from real {list(real.shape)})"
            )
    captions = meta.get("captions")
    if not isinstance(captions, list) or len(captions) != count:
        raise ReproInputError(f"{path}: metadata 'captions' must list {count} captions")
    return Strips(
        tasks=tasks,
        videos={t: tensors[f"video_{t}"].numpy() for t in tasks},
        reference=tensors["reference"].numpy(),
        envelope=tensors["envelope"].numpy(),
        real=real.numpy(),
        captions=[str(c) for c in captions],
    )


def upscale(image: np.ndarray, scale: int = STRIP_SCALE) -> np.ndarray:
    """uint8 [3, H, W] -> [H * scale, W * scale, 3] (repro.core.figures.upscale)."""
    return figures.upscale(image, scale)


def strips_figure(
    strips: Strips, clips: int = 2, scale: int = STRIP_SCALE
) -> tuple[plt.Figure, pd.DataFrame]:
    """For the first `clips` clips: one row per task and one of the real clip, the
    reference portrait in the first column of the clip's first row, then the frames; the
    audio envelope under the frames. The DataFrame lists the drawn rows: clip, row (task,
    "real" or "envelope"), caption, frames."""
    count = min(clips, len(strips.captions))
    frames = strips.real.shape[2]
    names = [*strips.tasks, "real"]
    # Per clip: a row for its caption, the image rows, then the envelope.
    heights = ([0.5] + [1.0] * len(names) + [0.7]) * max(count, 1)
    per_clip = len(names) + 2
    fig = plt.figure(figsize=(0.75 * (frames + 1) + 0.8, 0.8 * sum(heights) + 0.4))
    grid = fig.add_gridspec(len(heights), frames + 1, height_ratios=heights, hspace=0.15)
    drawn = []
    if count == 0:
        no_data(fig.add_subplot(grid[:, :]), "no clips in the strips file")
    for k in range(count):
        top = k * per_clip
        caption = fig.add_subplot(grid[top, :])
        caption.axis("off")
        caption.text(0.0, 1.0, f"clip {k}: {strips.captions[k]!r}", fontsize=9, va="top")
        for r, name in enumerate(names, start=1):
            video = strips.real if name == "real" else strips.videos[name]
            label = fig.add_subplot(grid[top + r, 0])
            figures.bare_axes(label)
            if r == 1:
                label.imshow(upscale(strips.reference[k], scale), interpolation="nearest")
                label.set_title("reference", fontsize=7)
                label.set_gid(f"reference/{k}")
            label.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
            for f in range(frames):
                ax = fig.add_subplot(grid[top + r, f + 1])
                figures.bare_axes(ax)
                ax.imshow(upscale(video[k, :, f], scale), interpolation="nearest")
                ax.set_gid(f"{name}/{k}/{f}")
                if r == 1:
                    ax.set_title(f"frame {f}" if f == 0 else f"{f}", fontsize=7)
            drawn.append((k, name, strips.captions[k], frames))
        envelope = fig.add_subplot(grid[top + per_clip - 1, 1:])
        (line,) = envelope.plot(np.arange(frames), strips.envelope[k], "o-", color="k", ms=3)
        line.set_gid(f"envelope/{k}")
        envelope.set_xlim(-0.5, frames - 0.5)
        low, high = min(0.0, strips.envelope[k].min()), max(1e-6, strips.envelope[k].max())
        envelope.set_ylim(float(low) * 1.15, float(high) * 1.15)  # loudness: from 0 up
        envelope.set_xticks([])
        envelope.tick_params(axis="y", labelsize=6)
        envelope.set_ylabel("audio\nenvelope", rotation=0, ha="right", va="center", fontsize=8)
        drawn.append((k, "envelope", strips.captions[k], frames))
    return fig, pd.DataFrame(drawn, columns=["clip", "row", "caption", "frames"])


# ---------------------------------------------------------------- the stage


def check_params(params: dict) -> dict:
    """cfg (the main CFG form), variant (whose CFG forms and curves are shown) and clips
    (strips drawn), defaults filled in; errors name the key (humo.plots.<key>)."""
    settings = {
        "cfg": params.get("cfg", "paper"),
        "variant": params.get("variant", "full"),
        "clips": params.get("clips", 2),
    }
    if settings["cfg"] not in GENERATED_FORMS:
        raise ReproInputError(
            f"humo.plots.cfg: unknown CFG form {settings['cfg']!r} (allowed: "
            f"{', '.join(GENERATED_FORMS)})"
        )
    if settings["variant"] not in ABLATION_VARIANTS:
        raise ReproInputError(
            f"humo.plots.variant: unknown variant {settings['variant']!r} (allowed: "
            f"{', '.join(ABLATION_VARIANTS)})"
        )
    clips = settings["clips"]
    if isinstance(clips, bool) or not isinstance(clips, int) or clips < 1:
        raise ReproInputError(f"humo.plots.clips: must be an integer >= 1, got {clips!r}")
    return settings


def main(argv=None) -> None:
    stage = Stage(__doc__, paper="humo")
    add = stage.parser.add_argument
    add("--metrics", required=True, help="results/humo_metrics.csv")
    add("--curves", required=True, help="results/humo_sync_curves.csv")
    add("--strips", required=True, help="results/humo/strips.safetensors")
    add("--out-dir", required=True, help="results/figures")
    args = stage.start(argv)
    settings = check_params(stage.params)
    # Everything is read and checked before any figure is written.
    metrics = read_table(args.metrics, required=COLUMNS)
    curves = read_table(args.curves, required=CURVE_COLUMNS)
    strips = load_strips(args.strips)
    out = Path(args.out_dir)
    cfg, variant = settings["cfg"], settings["variant"]
    save_figure(ablation_figure(metrics, cfg)[0], out / FIGURES["ablation"])
    save_figure(sync_figure(curves, cfg, variant)[0], out / FIGURES["sync"])
    save_figure(cfg_figure(metrics, variant)[0], out / FIGURES["cfg"])
    save_figure(strips_figure(strips, settings["clips"])[0], out / FIGURES["strips"])
    print(f"{len(FIGURES)} figures -> {out}")


if __name__ == "__main__":
    run(main)
