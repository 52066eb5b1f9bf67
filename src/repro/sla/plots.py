"""Stage sla_figures: SLA's quality figures, from the quality table, the fine-tuning
summaries and the sampled videos.

- sla_quality.png: the paper's quality table as a figure. Two panels, test loss (left)
  and frame FID (right) against the attention FLOPs per sample (x, log scale): one
  point per variant (the real clips excepted), the mean over seeds with +- std error
  bars, labelled with the variant's name; full attention's mean dashed across each
  panel, the real clips' frame FID dotted across the FID panel (the floor).
- sla_frames.png: one row per variant (in `order`), the frames of the first video of
  its seed-0 samples file (the lowest seed where it has no seed 0), under the video's
  caption; nearest-neighbour upscaled so tiny frames stay sharp.
- sla_loss.png: the fine-tuning loss curves, one line per variant: each seed's loss
  history smoothed by a trailing moving average (window: a twentieth of its steps, at
  least 1), then averaged over seeds; log y.

A figure without data (no rows, no files) is drawn as an empty panel saying so, not
refused. Each drawing function returns (the matplotlib Figure, the DataFrame of what
it drew), so that a test can check the plotted numbers against the inputs.

Inputs: the table (repro.sla.table COLUMNS); the fine-tuning JSONs ({"variant": str,
"seed": int, "loss_history": [float, ...], ...}); the samples files (kind
"sla_samples": tensor "video" uint8 [N, 3, F, H, W], metadata "variant", "seed" and
"captions", N strings).

    python -m repro.sla.plots --table results/sla_quality.csv \
        --finetune results/sla/finetune/*.json \
        --samples results/sla/samples/*.safetensors --out-dir results/figures \
        --params '{"order": ["full", "sla", "sparse_95", "linear_only"], "full": "full"}'
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from repro.core import figures
from repro.core.errors import ReproInputError  # noqa: E402
from repro.core.figures import no_data, save_figure  # noqa: E402
from repro.core.io import load_tensors, read_json  # noqa: E402
from repro.core.results import mean_std  # noqa: E402
from repro.core.stage import Stage, run  # noqa: E402
from repro.sla.table import FULL, REAL, read, variant_order  # noqa: E402

FIGURES = {"quality": "sla_quality.png", "frames": "sla_frames.png", "loss": "sla_loss.png"}
# Where the stage's settings live in the config; errors name their keys under it.
CONFIG = "sla.quality.plots"
QUALITY_METRICS = ("test_loss", "frame_fid")
METRIC_NAME = {
    "test_loss": "test loss (lower is better)",
    "frame_fid": "frame FID (lower is better)",
}
SAMPLES_KIND = "sla_samples"
FRAME_SCALE = 4  # nearest-neighbour upscale of each frame
SMOOTHING = 20  # the moving average spans 1 / SMOOTHING of a curve's steps


def palette(i: int):
    """The i-th of 20 distinct colours (tab10, then tab10's lighter pairs): 11 variants
    and more stay apart."""
    if i < 10:
        return plt.get_cmap("tab10")(i)
    return plt.get_cmap("tab20")((2 * (i - 10) + 1) % 20)


def require(table: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    """Refuse a table that lacks any of `columns`, naming them."""
    missing = [c for c in columns if c not in table]
    if missing:
        raise ReproInputError(f"{what} lacks columns {missing} (has {list(table.columns)})")


def over_seeds(values) -> tuple[float, float, int]:
    """(mean, std (0 for one seed), number of seeds) of per-seed values, NaNs dropped."""
    values = [float(v) for v in values]
    mean, std = mean_std(values)
    return mean, std, sum(not math.isnan(v) for v in values)


def _count(n: int, what: str = "seed") -> str:
    return f"{n} {what}{'s' * (n != 1)}"


# ---------------------------------------------------------------- quality


def quality_data(table: pd.DataFrame, order: Sequence[str] | None = None) -> pd.DataFrame:
    """Per metric of QUALITY_METRICS and variant (`variant_order`, the real clips last):
    the mean attention FLOPs per sample and the metric's mean, std and n over seeds.
    Columns: metric, variant, attention_flops, mean, std, n_seeds (the real clips' row
    has no FLOPs: NaN)."""
    require(table, ["variant", "seed", "attention_flops", *QUALITY_METRICS], "the quality table")
    rows = []
    for metric in QUALITY_METRICS:
        for variant in variant_order(table.variant, order):
            group = table[table.variant == variant]
            flops = math.nan if variant == REAL else over_seeds(group.attention_flops)[0]
            rows.append((metric, variant, flops, *over_seeds(group[metric])))
    columns = ["metric", "variant", "attention_flops", "mean", "std", "n_seeds"]
    return pd.DataFrame(rows, columns=columns)


def quality_figure(
    table: pd.DataFrame, order: Sequence[str] | None = None, full: str = FULL
) -> tuple[plt.Figure, pd.DataFrame]:
    """Test loss and frame FID against attention FLOPs per sample (log x), one point per
    variant, mean +- std over seeds; `full`'s mean dashed, the real clips' FID dotted."""
    data = quality_data(table, order)
    fig, axes = plt.subplots(1, len(QUALITY_METRICS), figsize=(6.0 * len(QUALITY_METRICS), 4.4))
    colors = palette
    for ax, metric in zip(axes, QUALITY_METRICS, strict=True):
        rows = data[data.metric == metric]
        models = rows[rows.variant != REAL].reset_index(drop=True)
        # A log axis has no place for 0 or unmeasured FLOPs, nor a point for an unmeasured metric.
        drawn = models[(models.attention_flops > 0) & models["mean"].notna()]
        if drawn.empty:
            no_data(ax, "no variant with FLOPs and this metric")
        for i, row in drawn.iterrows():
            container = ax.errorbar(
                row.attention_flops,
                row["mean"],
                yerr=row["std"],
                fmt="o",
                ms=6,
                capsize=3,
                color=colors(i),
            )
            container.lines[0].set_gid(row.variant)
            container.lines[2][0].set_gid(f"{row.variant}/std")
            ax.annotate(
                row.variant,
                (row.attention_flops, row["mean"]),
                xytext=(4, 4),
                textcoords="offset points",
                fontsize=8,
            )
        if len(drawn):
            ax.set_xscale("log")
        reference = models[models.variant == full]
        if len(reference) and np.isfinite(reference["mean"].iloc[0]):
            line = ax.axhline(
                reference["mean"].iloc[0], color="0.3", ls="--", lw=1, label=f"{full} (mean)"
            )
            line.set_gid(full)
        real = rows[rows.variant == REAL]
        if metric == "frame_fid" and len(real) and np.isfinite(real["mean"].iloc[0]):
            line = ax.axhline(real["mean"].iloc[0], color="0.3", ls=":", lw=1.2, label="real clips")
            line.set_gid(REAL)
        ax.set_xlabel("attention FLOPs per sample")
        ax.set_ylabel(METRIC_NAME[metric])
        ax.grid(alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
    seeds = int(data.n_seeds.max()) if len(data) else 0
    fig.suptitle(
        f"SLA's quality against attention FLOPs: mean over up to {_count(seeds)}, error bars ± std",
        fontsize=10,
    )
    fig.tight_layout()
    return fig, data


# ---------------------------------------------------------------- frames


@dataclass
class Samples:
    """One samples file: `video` uint8 [N, 3, F, H, W] of `variant` and `seed`, with
    the N captions."""

    path: Path
    variant: str
    seed: int
    video: np.ndarray
    captions: list[str]


def load_samples(path: str | os.PathLike) -> Samples:
    """Read and check a samples file (kind "sla_samples"): video uint8 [N, 3, F, H, W]
    with N >= 1, metadata variant (a non-empty string), seed (an integer >= 0) and N
    captions. Errors name the file."""
    tensors, meta = load_tensors(path, kind=SAMPLES_KIND, required=("video",))
    video = tensors["video"]
    if video.dtype != torch.uint8 or video.ndim != 5 or video.shape[1] != 3 or not len(video):
        raise ReproInputError(
            f"{path}: video must be uint8 [N, 3, F, H, W] with N >= 1, got {video.dtype} "
            f"{list(video.shape)}"
        )
    variant, seed, captions = meta.get("variant"), meta.get("seed"), meta.get("captions")
    if not isinstance(variant, str) or not variant:
        raise ReproInputError(f"{path}: metadata 'variant' must be a variant name, got {variant!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ReproInputError(f"{path}: metadata 'seed' must be an integer >= 0, got {seed!r}")
    if not isinstance(captions, list) or len(captions) != len(video):
        raise ReproInputError(f"{path}: metadata 'captions' must list {len(video)} captions")
    return Samples(Path(path), variant, seed, video.numpy(), [str(c) for c in captions])


def first_samples(samples: Sequence[Samples]) -> dict[str, Samples]:
    """Per variant, its samples file of seed 0 (the lowest seed it has); two files of one
    (variant, seed) are refused, naming both."""
    seen: dict[tuple[str, int], Samples] = {}
    for s in samples:
        key = (s.variant, s.seed)
        if key in seen:
            raise ReproInputError(
                f"{s.path}: variant {s.variant!r} seed {s.seed} is also in {seen[key].path}"
            )
        seen[key] = s
    chosen: dict[str, Samples] = {}
    for (variant, _), s in sorted(seen.items(), key=lambda item: item[0][1]):
        chosen.setdefault(variant, s)
    return chosen


def upscale(image: np.ndarray, scale: int = FRAME_SCALE) -> np.ndarray:
    """uint8 [3, H, W] -> [H * scale, W * scale, 3] (repro.core.figures.upscale)."""
    return figures.upscale(image, scale)


def frames_figure(
    samples: Sequence[Samples], order: Sequence[str] | None = None, scale: int = FRAME_SCALE
) -> tuple[plt.Figure, pd.DataFrame]:
    """One row per variant (`variant_order`): the frames of video 0 of its first samples
    file (`first_samples`), under that video's caption. The DataFrame lists the drawn
    rows: variant, seed, caption, frames, path."""
    chosen = first_samples(samples)
    variants = variant_order(chosen, order)
    frames = max((chosen[v].video.shape[2] for v in variants), default=0)
    # Per variant: a thin row for its caption, then its frames.
    heights = [0.35, 1.0] * max(len(variants), 1)
    fig = plt.figure(figsize=(0.9 * max(frames, 1) + 1.2, 0.9 * sum(heights) + 0.5))
    grid = fig.add_gridspec(
        len(heights), max(frames, 1), height_ratios=heights, hspace=0.1, top=0.96, bottom=0.01
    )
    if not variants:
        no_data(fig.add_subplot(grid[:, :]), "no samples files")
    drawn = []
    for r, variant in enumerate(variants):
        s = chosen[variant]
        caption = fig.add_subplot(grid[2 * r, :])
        caption.axis("off")
        caption.text(0.0, 0.0, f"{variant} (seed {s.seed}): {s.captions[0]!r}", fontsize=8)
        for f in range(s.video.shape[2]):
            ax = fig.add_subplot(grid[2 * r + 1, f])
            figures.bare_axes(ax)
            ax.imshow(upscale(s.video[0, :, f], scale), interpolation="nearest")
            ax.set_gid(f"{variant}/{f}")
            if f == 0:
                ax.set_ylabel(variant, rotation=0, ha="right", va="center", fontsize=9)
        drawn.append((variant, s.seed, s.captions[0], s.video.shape[2], str(s.path)))
    fig.suptitle("one sampled video per variant (sample 0), frame by frame", fontsize=10, y=0.995)
    return fig, pd.DataFrame(drawn, columns=["variant", "seed", "caption", "frames", "path"])


# ---------------------------------------------------------------- loss curves


@dataclass
class Curve:
    """One fine-tuning run's loss per step."""

    path: Path
    variant: str
    seed: int
    loss: np.ndarray


def load_curve(path: str | os.PathLike) -> Curve:
    """A fine-tuning JSON's variant, seed and loss_history (numbers; null -> NaN), checked;
    errors name the file and key."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise ReproInputError(f"{path}: expected a JSON object (a fine-tuning summary)")
    missing = [k for k in ("variant", "seed", "loss_history") if k not in data]
    if missing:
        raise ReproInputError(f"{path}: missing keys {missing}")
    variant, seed, history = data["variant"], data["seed"], data["loss_history"]
    if not isinstance(variant, str) or not variant:
        raise ReproInputError(f"{path}: variant must be a variant name, got {variant!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ReproInputError(f"{path}: seed must be an integer >= 0, got {seed!r}")
    numbers_only = isinstance(history, list) and all(
        x is None or (isinstance(x, numbers.Real) and not isinstance(x, bool)) for x in history
    )
    if not numbers_only:
        raise ReproInputError(f"{path}: loss_history must be a list of numbers")
    loss = np.array([math.nan if x is None else float(x) for x in history], dtype=float)
    return Curve(Path(path), variant, seed, loss)


def window(steps: int) -> int:
    """The moving average's window for a curve of `steps` steps: steps / SMOOTHING, >= 1."""
    return max(1, steps // SMOOTHING)


def moving_average(loss: np.ndarray, size: int) -> np.ndarray:
    """The trailing mean of the last `size` values at each step (fewer at the start; NaN
    values left out, NaN where the whole window is), one value per step."""
    return pd.Series(loss, dtype=float).rolling(size, min_periods=1).mean().to_numpy()


def loss_data(curves: Sequence[Curve], order: Sequence[str] | None = None) -> pd.DataFrame:
    """Per variant (`variant_order`) and step (1 = the first): the mean over seeds of
    each seed's moving average (`window` of its own length) and the number of seeds
    with that step. Two curves of one (variant, seed) are refused, naming both files.
    Columns: variant, step, loss, n_seeds."""
    seen: dict[tuple[str, int], Path] = {}
    for c in curves:
        key = (c.variant, c.seed)
        if key in seen:
            raise ReproInputError(
                f"{c.path}: variant {c.variant!r} seed {c.seed} is also in {seen[key]}"
            )
        seen[key] = c.path
    frames = []
    for variant in variant_order([c.variant for c in curves], order):
        smoothed = [
            pd.Series(moving_average(c.loss, window(len(c.loss))), name=c.seed)
            for c in curves
            if c.variant == variant and len(c.loss)
        ]
        if not smoothed:
            continue
        # Aligned on the step: a seed with fewer steps counts only where it has them.
        steps = pd.concat(smoothed, axis=1)
        frames.append(
            pd.DataFrame(
                {
                    "variant": variant,
                    "step": steps.index + 1,
                    "loss": steps.mean(axis=1, skipna=True).to_numpy(),
                    "n_seeds": steps.notna().sum(axis=1).to_numpy(),
                }
            )
        )
    columns = ["variant", "step", "loss", "n_seeds"]
    if not frames:
        return pd.DataFrame(columns=columns)
    return pd.concat(frames, ignore_index=True)[columns]


def loss_figure(
    curves: Sequence[Curve], order: Sequence[str] | None = None
) -> tuple[plt.Figure, pd.DataFrame]:
    """One line per variant: its smoothed fine-tuning loss, mean over seeds, log y."""
    data = loss_data(curves, order)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colors = palette
    variants = list(dict.fromkeys(data.variant))
    for i, variant in enumerate(variants):
        rows = data[data.variant == variant]
        seeds = int(rows.n_seeds.max())
        (line,) = ax.plot(
            rows.step, rows.loss, color=colors(i), lw=1.2, label=f"{variant} ({_count(seeds)})"
        )
        line.set_gid(variant)
    # A log axis needs a positive loss somewhere; a curve of zeros stays on a linear one.
    if (data.loss > 0).any():
        ax.set_yscale("log")
    if not variants:
        no_data(ax, "no fine-tuning loss histories")
    else:
        ax.legend(fontsize=8, loc="best")
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel(f"training loss (moving average, 1/{SMOOTHING} of the steps)")
    ax.set_title("fine-tuning loss per attention variant, mean over seeds", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return fig, data


# ---------------------------------------------------------------- the stage


def check_params(params: dict) -> dict:
    """order (the variants' order, default: repro.sla.table's) and full (the reference
    variant, default "full"); errors name the key (sla.quality.plots.<key>)."""
    settings = {"order": params.get("order"), "full": params.get("full", FULL)}
    order = settings["order"]
    if order is not None and (
        not isinstance(order, list) or not all(isinstance(v, str) and v for v in order)
    ):
        raise ReproInputError(f"{CONFIG}.order: must be a list of variant names, got {order!r}")
    full = settings["full"]
    if not isinstance(full, str) or not full or full == REAL:
        raise ReproInputError(
            f"{CONFIG}.full: must be a variant name (not {REAL!r}, the real clips), got {full!r}"
        )
    return settings


def main(argv=None) -> None:
    stage = Stage(__doc__, paper="sla")
    add = stage.parser.add_argument
    add("--table", required=True, help="results/sla_quality.csv")
    add("--finetune", nargs="*", default=[], help="the fine-tuning summaries (JSON)")
    add("--samples", nargs="*", default=[], help="the samples files (sla_samples)")
    add("--out-dir", required=True, help="results/figures")
    args = stage.start(argv)
    settings = check_params(stage.params)
    # Everything is read and checked before any figure is written.
    table = read(args.table)
    curves = [load_curve(p) for p in args.finetune]
    samples = [load_samples(p) for p in args.samples]
    out = Path(args.out_dir)
    order = settings["order"]
    figures = {
        "quality": quality_figure(table, order, settings["full"]),
        "frames": frames_figure(samples, order),
        "loss": loss_figure(curves, order),
    }
    for name, (fig, _) in figures.items():
        save_figure(fig, out / FIGURES[name])
    print(f"{len(FIGURES)} figures -> {out}")


if __name__ == "__main__":
    run(main)
