"""Stage agd_figures: AGD's figures at this scale, drawn from the headline table.

- FID vs guidance scale per method and adapter type (mean +- std over seeds), base
  and derived checkpoint (fid_vs_w);
- fidelity to CFG vs guidance scale: how far each distilled sample lies from the CFG
  sample of the same noise, class and w, with no guidance as the baseline
  (fidelity_vs_w);
- a sample grid: no guidance, CFG and AGD with each adapter type, from the same
  initial noise and classes (sample_grid);
- sampling throughput, CFG vs AGD, against the 2x ceiling (speed).

The drawing functions return the matplotlib Figure; `save_figure` writes it atomically.

    python -m repro.agd.plots --table results/agd_fid.csv \
        --throughput results/agd_throughput.csv --base models/agd/base \
        --adapters models/agd/adapters/base/cfg_offset_s0.safetensors ... \
        --fidelity results/agd/fidelity/base.csv results/agd/fidelity/derived.csv \
        --fid-figure results/figures/agd_fid_vs_w.png \
        --fidelity-figure results/figures/agd_fidelity_vs_w.png \
        --samples-figure results/figures/agd_samples.png \
        --speed-figure results/figures/agd_speed.png --params '{...}'
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: E402

from repro.agd.methods import load_method  # noqa: E402
from repro.agd.table import FIDELITY_COLUMNS, KEYS  # noqa: E402
from repro.core.diffusion import sample, sample_generator, scheduler_from_params  # noqa: E402
from repro.core.figures import save_figure
from repro.core.results import read_table  # noqa: E402
from repro.core.stage import Stage, run  # noqa: E402

# Methods that are not AGD adapter types: one style each, the same in every figure.
STYLE = {
    "none": dict(color="#7f7f7f", marker="o", label="no guidance (1 NFE)"),
    "cfg": dict(color="#1f77b4", marker="s", label="CFG (2 NFEs)"),
    "gd": dict(color="#ff7f0e", marker="^", label="GD, whole model distilled (1 NFE)"),
    "agd_standard": dict(
        color="#bcbd22", marker="v", ls="-.", label="AGD on standard trajectories (1 NFE)"
    ),
    # The AGD bar of the speed figure (the headline type's colour by default).
    "agd": dict(color="#d62728", marker="D", label="AGD (1 NFE)"),
}
# One colour and marker per AGD adapter type, the same in every figure, and where
# each type comes from.
ADAPTER_STYLE = {
    "offset": dict(color="#d62728", marker="D"),
    "mlp_gate": dict(color="#9467bd", marker="P"),
    "cross_attention": dict(color="#2ca02c", marker="X"),
    "adaln": dict(color="#e377c2", marker="*"),
}
ADAPTER_LABEL = {
    "offset": "offset (paper)",
    "mlp_gate": "MLP gate (official code)",
    "cross_attention": "cross-attention (paper)",
    "adaln": "adaLN (this project's)",
}
# For an adapter type this module does not know yet: colours no method above uses.
SPARE_COLORS = ("#8c564b", "#17becf", "#393b79", "#637939")
NO_ADAPTER = "-"
# Table columns the figures read.
TABLE_COLUMNS = [
    *KEYS,
    "fid",
    "trainable_params",
    "base_params",
    *FIDELITY_COLUMNS,
]
FIDELITY_LABEL = {
    "fidelity_mse": "pixel MSE to the CFG sample",
    "fidelity_feature": "feature distance (L2) to the CFG sample",
}
NONE_BASELINE = "no guidance vs CFG (the distance guidance itself makes)"


def adapter_style(kind: str) -> dict:
    """Colour and marker of adapter type `kind` (a spare colour for an unknown type)."""
    if kind in ADAPTER_STYLE:
        return dict(ADAPTER_STYLE[kind])
    index = sum(ord(ch) for ch in str(kind)) % len(SPARE_COLORS)
    return dict(color=SPARE_COLORS[index], marker="h")


def adapter_label(kind: str) -> str:
    """The adapter type as a reader should see it, with where it comes from."""
    return ADAPTER_LABEL.get(kind, str(kind))


def param_fraction(rows: pd.DataFrame) -> str:
    """'x% of the base's parameters' of these rows' trainable parameters, or ''."""
    if rows.empty or not {"trainable_params", "base_params"} <= set(rows.columns):
        return ""
    ratio = (rows.trainable_params / rows.base_params).replace([np.inf, -np.inf], np.nan)
    value = float(ratio.median()) if ratio.notna().any() else math.nan
    if not math.isfinite(value) or value <= 0:
        return ""
    return f"{100 * value:.2g}% of base params"


def adapter_order(types, headline: str | None = None) -> list[str]:
    """Adapter types: the headline first, then the known ones in their order, then the rest."""
    types = [t for t in dict.fromkeys(types) if t != NO_ADAPTER and isinstance(t, str)]
    known = [t for t in ADAPTER_STYLE if t in types]
    order = known + sorted(t for t in types if t not in ADAPTER_STYLE)
    if headline in order:
        order.remove(headline)
        order.insert(0, headline)
    return order


def headline_type(table: pd.DataFrame) -> str | None:
    """The headline adapter type: the one agd_standard, or AGD on the derived checkpoint, uses."""
    for method, ckpt in (("agd_standard", "base"), ("agd", "derived"), ("agd_native", "derived")):
        kinds = table[(table.method == method) & (table.checkpoint == ckpt)].adapter_type
        kinds = [k for k in kinds.unique() if k != NO_ADAPTER]
        if kinds:
            return kinds[0]
    return None


def agd_series(rows: pd.DataFrame, headline: str | None) -> list[tuple[pd.DataFrame, dict]]:
    """One (rows, style) per AGD adapter type on the base checkpoint, the headline first."""
    agd = rows[rows.method == "agd"]
    series = []
    for kind in adapter_order(agd.adapter_type.unique(), headline):
        m = agd[agd.adapter_type == kind]
        fraction = param_fraction(m)
        extra = f", {fraction}" if fraction else ""
        label = f"AGD, {adapter_label(kind)} (1 NFE{extra})"
        series.append((m, dict(adapter_style(kind), label=label)))
    return series


def base_series(rows: pd.DataFrame, headline: str | None) -> list[tuple[pd.DataFrame, dict]]:
    """The guided methods of the base checkpoint: CFG, GD, AGD standard, AGD per type."""
    series = []
    for method in ("cfg", "gd", "agd_standard"):
        m = rows[rows.method == method]
        if not m.empty:
            style = dict(STYLE[method])
            if method == "agd_standard":
                kinds = [k for k in m.adapter_type.unique() if k != NO_ADAPTER]
                if kinds:
                    style["label"] = (
                        f"AGD on standard trajectories, {adapter_label(kinds[0])} (1 NFE)"
                    )
            series.append((m, style))
    return series + agd_series(rows, headline)


def derived_series(rows: pd.DataFrame) -> list[tuple[pd.DataFrame, dict]]:
    """The derived checkpoint: CFG, AGD transferred from the base, AGD trained on it."""
    series = []
    m = rows[rows.method == "cfg"]
    if not m.empty:
        series.append((m, dict(STYLE["cfg"])))
    for method in ("agd", "agd_native"):
        m = rows[rows.method == method]
        for kind in adapter_order(m.adapter_type.unique()):
            style = adapter_style(kind)
            if method == "agd":
                label = f"AGD, {adapter_label(kind)}, adapters trained on the base (transfer)"
            else:
                label = f"AGD, {adapter_label(kind)}, adapters trained on this checkpoint"
                style.update(ls="--", mfc="white")
            series.append((m[m.adapter_type == kind], dict(style, label=label)))
    return series


def scale_stats(rows: pd.DataFrame, column: str) -> pd.DataFrame:
    """Mean and std (0 for one seed) over seeds of `column` per guidance scale, NaNs dropped."""
    finite = rows[np.isfinite(rows[column].astype(float))]
    stats = finite.groupby("guidance_scale")[column].agg(["mean", "std"])
    stats["std"] = stats["std"].fillna(0.0)
    return stats


def dodge(n: int, scales: Sequence[float]) -> np.ndarray:
    """Small sideways offsets for n series, so their error bars at one w do not overlap."""
    scales = sorted(set(float(s) for s in scales))
    gap = min(np.diff(scales)) if len(scales) > 1 else 1.0
    width = 0.2 * gap
    return (np.arange(n) - (n - 1) / 2) * (width / max(n - 1, 1))


def draw_series(ax, series, column: str, scales) -> list[float]:
    """Error-bar lines of `series` (mean +- std over seeds per w); returns the means drawn."""
    offsets = dodge(len(series), scales)
    drawn = []
    for (rows, style), dx in zip(series, offsets, strict=True):
        stats = scale_stats(rows, column)
        if stats.empty:
            continue
        ax.errorbar(
            stats.index.to_numpy(float) + dx,
            stats["mean"],
            yerr=stats["std"],
            capsize=3,
            lw=1.8,
            ms=6,
            **style,
        )
        drawn += stats["mean"].tolist()
    return drawn


def plain_number(value: float, _pos=None) -> str:
    return f"{value:g}"


def log_axis(ax, span: float) -> None:
    """A log y axis labelled in plain numbers (0.02, not 2e-02); over less than ~2.5
    decades the minor ticks at 2x and 5x are labelled too."""
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(plain_number))

    def minor(value: float, _pos=None) -> str:
        mantissa = value / 10 ** math.floor(math.log10(value))
        return f"{value:g}" if round(mantissa) in (2, 5) else ""

    ax.yaxis.set_minor_formatter(FuncFormatter(minor) if span < 10**2.5 else NullFormatter())


def legend_row(data_axes, legend_axes, panel_height: float, width: float) -> None:
    """Each panel's legend in the (axis-less) axes under it, so no legend covers data;
    the figure is sized to the longest legend. Reference lines (the real-data floor)
    are listed after the methods."""
    longest = 0
    for ax, lax in zip(data_axes, legend_axes, strict=True):
        lax.axis("off")
        handles, labels = ax.get_legend_handles_labels()
        order = sorted(range(len(labels)), key=lambda i: "floor" in labels[i])
        if handles:
            lax.legend(
                [handles[i] for i in order],
                [labels[i] for i in order],
                loc="upper center",
                fontsize=8,
                frameon=False,
                borderaxespad=0,
            )
        longest = max(longest, len(handles))
    legend_height = 0.2 * longest + 0.1
    data_axes[0].get_gridspec().set_height_ratios([panel_height, legend_height])
    data_axes[0].figure.set_size_inches(width, panel_height + legend_height + 0.9)


def fid_vs_w(table: pd.DataFrame) -> plt.Figure:
    """FID vs w: the base panel (every method, one line per AGD adapter type) and the
    derived panel (no guidance, CFG, AGD transferred and AGD trained natively)."""
    checkpoints = [c for c in ("base", "derived") if c in set(table.checkpoint)]
    if not checkpoints:
        checkpoints = ["base"]
    headline = headline_type(table)
    fig, axes = plt.subplots(2, len(checkpoints), squeeze=False, layout="constrained")
    floor = table[table.method == "real"].fid.dropna()
    for ax, ckpt in zip(axes[0], checkpoints, strict=True):
        rows = table[table.checkpoint == ckpt]
        guided = rows[~rows.method.isin(["none", "real"])]
        scales = sorted(guided.guidance_scale.dropna().unique())
        none = scale_stats(rows[rows.method == "none"], "fid")
        if not none.empty:  # one scale (w = 1): a band across the grid
            mu, sd = float(none["mean"].iloc[0]), float(none["std"].iloc[0])
            style = STYLE["none"]
            ax.axhline(mu, color=style["color"], lw=1.5, label=style["label"] + ", band ± std")
            ax.axhspan(mu - sd, mu + sd, color=style["color"], alpha=0.15, lw=0)
        series = base_series(rows, headline) if ckpt == "base" else derived_series(rows)
        draw_series(ax, series, "fid", scales)
        if len(floor) and ckpt == "base":
            ax.axhline(
                floor.mean(), color="k", ls=":", lw=1.2, label="real train vs real test (floor)"
            )
        if scales:
            ax.set_xticks(scales, [f"{s:g}" for s in scales])
        ax.set_xlabel("guidance scale w")
        ax.set_ylabel("FID (lower is better)")
        types = rows[rows.method == "agd"].adapter_type.nunique()
        ax.set_title(
            f"base model{', every adapter type' if types > 1 else ''}\n"
            "scored against the real test split"
            if ckpt == "base"
            else "derived (fine-tuned) checkpoint\nscored against its held-out split",
            fontsize=10,
        )
        ax.grid(alpha=0.3)
    legend_row(list(axes[0]), list(axes[1]), panel_height=3.6, width=5.6 * len(checkpoints))
    fig.suptitle("AGD: FID vs guidance scale (mean ± std over seeds)")
    return fig


def fidelity_vs_w(table: pd.DataFrame, fidelity: pd.DataFrame | None = None) -> plt.Figure:
    """Fidelity to CFG vs w on the base: pixel MSE (left) and feature distance (right)
    for each AGD adapter type, AGD on standard trajectories and GD, with no guidance
    (from the fidelity tables) as the baseline. Lower is better."""
    headline = headline_type(table)
    rows = table[table.checkpoint == "base"]
    series = [s for s in base_series(rows, headline) if s[0].method.iloc[0] != "cfg"]
    none = pd.DataFrame(columns=KEYS + FIDELITY_COLUMNS)
    if fidelity is not None and not fidelity.empty:
        none = fidelity[(fidelity.method == "none") & (fidelity.checkpoint == "base")]
    scales = sorted(
        set(rows[rows.method == "cfg"].guidance_scale.dropna())
        | set(s for m, _ in series for s in m.guidance_scale.dropna())
        | set(none.guidance_scale.dropna())
    )
    fig, axes = plt.subplots(1, 2, figsize=(11.2, 4.2), layout="constrained")
    for ax, column in zip(axes, FIDELITY_COLUMNS, strict=True):
        drawn = draw_series(ax, series, column, scales)
        stats = scale_stats(none, column) if not none.empty else pd.DataFrame()
        if not stats.empty:
            ax.errorbar(
                stats.index.to_numpy(float),
                stats["mean"],
                yerr=stats["std"],
                color=STYLE["none"]["color"],
                ls="--",
                marker="o",
                mfc="white",
                capsize=3,
                lw=1.5,
                ms=5,
                label=NONE_BASELINE,
            )
            drawn += stats["mean"].tolist()
        positive = [v for v in drawn if math.isfinite(v) and v > 0]
        if positive and max(positive) > 10 * min(positive):
            log_axis(ax, max(positive) / min(positive))
        elif drawn:
            ax.set_ylim(bottom=0)
        if not drawn:
            ax.text(
                0.5,
                0.5,
                "no fidelity values in the table",
                transform=ax.transAxes,
                ha="center",
                va="center",
                color="0.4",
            )
        if scales:
            ax.set_xticks(scales, [f"{s:g}" for s in scales])
            pad = 0.08 * ((scales[-1] - scales[0]) or 1.0)
            ax.set_xlim(scales[0] - pad, scales[-1] + pad)
        ax.set_xlabel("guidance scale w")
        ax.set_ylabel(FIDELITY_LABEL[column] + "\n(lower is better)")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_title("pixels (images in [-1, 1])", fontsize=10)
    axes[1].set_title("features of the FID network", fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle(
        "AGD on the base model: distance of each sample to the CFG sample "
        "from the same noise, class and w\n(mean ± std over seeds)",
        fontsize=11,
    )
    return fig


def tile(images: torch.Tensor, rows: int, cols: int, gap: int = 1) -> np.ndarray:
    """Images [rows*cols, C, h, w] in [-1, 1] -> one array in [0, 1] with grey gaps:
    [H, W] for one channel, [H, W, 3] for three."""
    h, w = images.shape[-2:]
    pixels = ((images.float().cpu() + 1) / 2).clamp(0, 1).numpy()
    colour = pixels.shape[1] == 3
    shape = (rows * (h + gap) - gap, cols * (w + gap) - gap) + ((3,) if colour else ())
    grid = np.full(shape, 0.5)
    for k in range(rows * cols):
        r, c = divmod(k, cols)
        cell = pixels[k].transpose(1, 2, 0) if colour else pixels[k, 0]
        grid[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = cell
    return grid


@torch.no_grad()
def sample_grid(base, adapters: Sequence, params: dict, device=None) -> plt.Figure:
    """No guidance, CFG, then AGD with each adapter file, all at params'
    grid_guidance_scale from the same noise (sample_generator(0, 0, "figures"),
    re-created for every panel) and the same classes, one row per class."""
    classes = list(params["grid_classes"])
    per_class, scale = params["grid_per_class"], params["grid_guidance_scale"]
    scheduler = scheduler_from_params(params["sampler"])
    labels = torch.tensor(classes).repeat_interleave(per_class)
    panels = []
    for name, path in [("none", None), ("cfg", None)] + [("agd", p) for p in adapters]:
        method = load_method(name, base, adapters=path, device=device)
        result = sample(
            method.denoiser,
            scheduler,
            labels=labels,
            shape=method.image_shape,
            steps=params["sampler"]["steps"],
            guidance=method.guidance(scale),
            generator=sample_generator(0, 0, "figures"),  # the same noise for every panel
        )
        if name == "none":
            title = "no guidance\n1 forward pass / step"
        elif name == "cfg":
            title = "CFG\n2 forward passes / step"
        else:
            fraction = method.trainable_params / max(method.base_params, 1)
            title = (
                f"AGD, {adapter_label(method.adapter_type)}\n"
                f"1 forward pass / step, {100 * fraction:.2g}% of base params"
            )
        panels.append((title, result.images.clamp(-1, 1)))
        del method
    ncols = len(panels) if len(panels) <= 4 else math.ceil(len(panels) / 2)
    nrows = math.ceil(len(panels) / ncols)
    panel_w = max(2.2, 0.45 * per_class + 0.6)
    panel_h = 0.45 * len(classes) + 1.0
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(panel_w * ncols, panel_h * nrows),
        squeeze=False,
        layout="constrained",
    )
    for k, ax in enumerate(axes.flat):
        if k >= len(panels):
            ax.axis("off")
            continue
        title, images = panels[k]
        grid = tile(images, rows=len(classes), cols=per_class)
        ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        h = images.shape[-2] + 1
        ax.set_yticks(np.arange(len(classes)) * h + h / 2 - 0.5, [str(c) for c in classes])
        ax.set_xticks([])
        ax.set_ylabel("class" if k % ncols == 0 else "")
    fig.suptitle(f"Same noise, same classes, w = {scale:g}")
    return fig


def speed(throughput: pd.DataFrame) -> plt.Figure:
    """Images/s of CFG and AGD at the same steps, with the 2x ceiling."""
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
    return fig


def read_fidelity(paths: Sequence) -> pd.DataFrame:
    """The fidelity tables (repro.agd.fidelity) as one frame."""
    columns = KEYS + FIDELITY_COLUMNS
    frames = [read_table(p, required=columns)[columns] for p in paths]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def main(argv=None) -> None:
    stage = Stage(__doc__, paper="agd")
    add = stage.parser.add_argument
    add("--table", required=True, help="the headline table (results/agd_fid.csv)")
    add("--throughput", required=True, help="the throughput table (repro.agd.throughput)")
    add("--base", required=True, help="the base DiT directory")
    add(
        "--adapters",
        nargs="+",
        required=True,
        help="AGD adapters on the base, one file per adapter type (seed 0), headline type first",
    )
    add("--fidelity", nargs="+", required=True, help="fidelity tables (repro.agd.fidelity)")
    add("--fid-figure", required=True, help="output: FID vs w (PNG)")
    add("--fidelity-figure", required=True, help="output: fidelity to CFG vs w (PNG)")
    add("--samples-figure", required=True, help="output: the sample grid (PNG)")
    add("--speed-figure", required=True, help="output: throughput (PNG)")
    args = stage.start(argv)
    table = read_table(args.table, required=TABLE_COLUMNS)
    save_figure(fid_vs_w(table), args.fid_figure)
    save_figure(fidelity_vs_w(table, read_fidelity(args.fidelity)), args.fidelity_figure)
    figure = sample_grid(args.base, args.adapters, stage.params, stage.device)
    save_figure(figure, args.samples_figure)
    throughput = read_table(args.throughput, required=("method", "images_per_s"))
    save_figure(speed(throughput), args.speed_figure)


if __name__ == "__main__":
    run(main)
