"""Stage agd_figures: AGD's figures at this scale.

- FID vs guidance scale per method (mean +- std over seeds), base and derived checkpoint;
- a sample grid, CFG and AGD from the same initial noise and classes;
- sampling throughput, CFG vs AGD, against the 2x ceiling.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from repro.agd.methods import load_method  # noqa: E402
from repro.core.diffusion import sample, scheduler_from_params  # noqa: E402
from repro.core.io import atomic_write  # noqa: E402
from repro.core.results import read_table  # noqa: E402
from repro.core.stage import Stage, run  # noqa: E402

STYLE = {
    "none": dict(color="#9e9e9e", marker="o", label="no guidance (1 NFE)"),
    "cfg": dict(color="#1f77b4", marker="s", label="CFG (2 NFE)"),
    "gd": dict(color="#ff7f0e", marker="^", label="GD, whole model (1 NFE)"),
    "agd_standard": dict(color="#c49c94", marker="v", label="AGD, standard traj. (1 NFE)"),
    "agd": dict(color="#d62728", marker="D", label="AGD (1 NFE)"),
}


def save_figure(fig, path) -> None:
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=150, bbox_inches="tight", format="png")
    plt.close(fig)


def fid_vs_w(table, path) -> None:
    checkpoints = [c for c in ("base", "derived") if c in set(table.checkpoint)]
    fig, axes = plt.subplots(
        1, len(checkpoints), figsize=(5.2 * len(checkpoints), 4), squeeze=False
    )
    floor = table[table.method == "real"].fid
    for ax, ckpt in zip(axes[0], checkpoints, strict=True):
        rows = table[table.checkpoint == ckpt]
        scales = sorted(rows[rows.method == "cfg"].guidance_scale.unique())
        for method, style in STYLE.items():
            m = rows[rows.method == method]
            if m.empty:
                continue
            stats = m.groupby("guidance_scale").fid.agg(["mean", "std"]).fillna(0)
            if method == "none":  # one scale: draw it as a band across the grid
                mu, sd = stats["mean"].iloc[0], stats["std"].iloc[0]
                ax.axhline(mu, color=style["color"], lw=1.5, label=style["label"])
                ax.axhspan(mu - sd, mu + sd, color=style["color"], alpha=0.15)
                continue
            ax.errorbar(
                stats.index, stats["mean"], yerr=stats["std"], capsize=3, lw=1.8, ms=5, **style
            )
        if len(floor) and ckpt == "base":
            ax.axhline(floor.mean(), color="k", ls="--", lw=1, label="real train vs test (floor)")
        ax.set_xticks(scales)
        ax.set_xlabel("guidance scale w")
        ax.set_ylabel("FID (classifier features), lower is better")
        ax.set_title(
            "base model\nscored against real test digits"
            if ckpt == "base"
            else "derived (glyph-tuned) checkpoint, base's adapters\nscored against held-out glyphs"
        )
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, frameon=False)
    fig.suptitle("AGD: FID vs guidance scale (mean ± std over seeds)", y=1.0)
    fig.tight_layout()
    save_figure(fig, path)


def tile(images: torch.Tensor, rows: int, cols: int, gap: int = 1) -> np.ndarray:
    """Images [rows*cols, 1, h, w] in [-1, 1] -> one array in [0, 1] with grey gaps."""
    h, w = images.shape[-2:]
    grid = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap), 0.5)
    pixels = ((images[:, 0] + 1) / 2).numpy()
    for k in range(rows * cols):
        r, c = divmod(k, cols)
        grid[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = pixels[k]
    return grid


@torch.no_grad()
def sample_grid(base, adapters, params, path, device=None) -> None:
    classes = params["grid_classes"]
    per_class, scale = params["grid_per_class"], params["grid_guidance_scale"]
    scheduler = scheduler_from_params(params["sampler"])
    labels = torch.tensor(classes).repeat_interleave(per_class)
    panels = {}
    for name in ("none", "cfg", "agd"):
        method = load_method(name, base, adapters=adapters, device=device)
        gen = torch.Generator().manual_seed(0)  # the same noise for both
        result = sample(
            method.denoiser,
            scheduler,
            labels=labels,
            shape=method.image_shape,
            steps=params["sampler"]["steps"],
            guidance=method.guidance(scale),
            generator=gen,
        )
        panels[name] = result.images.clamp(-1, 1)
    width = max(7.5, 1.0 + 0.55 * per_class * 3)
    fig, axes = plt.subplots(1, 3, figsize=(width, 0.55 * len(classes) + 1.2))
    titles = {
        "none": "no guidance\n1 forward pass / step",
        "cfg": "CFG\n2 forward passes / step",
        "agd": "AGD\n1 forward pass / step",
    }
    for ax, (name, images) in zip(axes, panels.items(), strict=True):
        grid = tile(images, rows=len(classes), cols=per_class)
        ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(titles[name], fontsize=10)
        h = images.shape[-2] + 1
        ax.set_yticks(np.arange(len(classes)) * h + h / 2 - 0.5, [str(k) for k in classes])
        ax.set_xticks([])
        ax.set_ylabel("class" if name == "none" else "")
    fig.suptitle(f"Same noise, same classes, w = {scale:g}")
    fig.tight_layout()
    save_figure(fig, path)


def speed(throughput, path) -> None:
    stats = throughput.groupby("method").images_per_s.agg(["mean", "std"]).fillna(0)
    order = [m for m in ("cfg", "agd") if m in stats.index]
    fig, ax = plt.subplots(figsize=(4.5, 3.6))
    ax.bar(
        order,
        stats.loc[order, "mean"],
        yerr=stats.loc[order, "std"],
        capsize=4,
        color=[STYLE[m]["color"] for m in order],
    )
    top = float((stats.loc[order, "mean"] + stats.loc[order, "std"]).max())
    if "cfg" in stats.index:
        twice = 2 * stats.loc["cfg", "mean"]
        ax.axhline(twice, color="k", ls="--", lw=1, label="2x CFG (half the forward passes)")
        top = max(top, twice)
        ax.legend(frameon=False, fontsize=8, loc="upper left")
    # Headroom above the bars and the 2x line, so the legend never sits on them.
    ax.set_ylim(0, 1.22 * top)
    # The ratio of each pair timed back to back (what the speed claim is decided on).
    from repro.agd.claims import pair_ratios
    from repro.core.results import Spread

    pairs = Spread.of(pair_ratios(throughput))
    if pairs.n:
        ax.set_title(
            f"AGD / CFG images/s, same steps: median {pairs.median:.2f}x\n"
            f"(range {pairs.low:.2f}x to {pairs.high:.2f}x over {pairs.n} pairs)",
            fontsize=10,
        )
    row = throughput.iloc[0]
    ax.set_ylabel(f"images / s (batch {row.batch_size}, {row.steps} steps)")
    ax.grid(axis="y", alpha=0.3)
    save_figure(fig, path)


def main(argv=None) -> None:
    stage = Stage(__doc__, paper="agd")
    for flag in (
        "--table",
        "--throughput",
        "--base",
        "--adapters",
        "--fid-figure",
        "--samples-figure",
        "--speed-figure",
    ):
        stage.parser.add_argument(flag, required=True)
    args = stage.start(argv)
    fid_vs_w(read_table(args.table, required=("method", "checkpoint", "fid")), args.fid_figure)
    sample_grid(args.base, args.adapters, stage.params, args.samples_figure, stage.device)
    speed(read_table(args.throughput, required=("method", "images_per_s")), args.speed_figure)


if __name__ == "__main__":
    run(main)
