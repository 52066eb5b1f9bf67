"""repro.agd.plots: AGD's figures from a synthetic headline table (no Snakemake)."""

from __future__ import annotations

import math

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

from repro.agd import plots
from repro.agd.table import COLUMNS, FIDELITY_COLUMNS, KEYS

SCALES = [1.25, 1.5, 2.0, 3.0]
SEEDS = [0, 1, 2]
TYPES = ["offset", "mlp_gate", "cross_attention", "adaln"]
BASE_PARAMS = 100_000
SAMPLER = {"kind": "ddim", "num_train_timesteps": 1000, "beta_schedule": "linear", "steps": 2}


def _row(method, kind, ckpt, w, seed, fid, trainable=0, fidelity=(math.nan, math.nan)):
    return {
        "method": method,
        "adapter_type": kind,
        "checkpoint": ckpt,
        "guidance_scale": w,
        "steps": 20,
        "nfe": 40 if method == "cfg" else 20,
        "seed": seed,
        "fid": fid,
        "fid_val": fid + 0.5,
        "inception_score": 2.0,
        "images_per_s": 100.0,
        "trainable_params": trainable,
        "base_params": BASE_PARAMS,
        "fidelity_mse": fidelity[0],
        "fidelity_feature": fidelity[1],
    }


def synthetic_table(rng=None) -> pd.DataFrame:
    """Every method of the contract: 4 adapter types on the base, transfer and native
    AGD on the derived checkpoint, 3 seeds, the real-data floor."""
    rng = rng or np.random.default_rng(0)
    rows = []
    for seed in SEEDS:
        noise = lambda: float(rng.normal(0, 0.3))  # noqa: E731
        for ckpt in ("base", "derived"):
            rows.append(_row("none", "-", ckpt, 1.0, seed, 20 + noise()))
            for w in SCALES:
                rows.append(_row("cfg", "-", ckpt, w, seed, 12 + (w - 1.6) ** 2 + noise()))
        for k, kind in enumerate(TYPES):
            for w in SCALES:
                fid = 13 + k + (w - 1.7) ** 2 + noise()
                fidelity = (0.01 * (k + 1) * w, 0.5 * (k + 1) + 0.1 * w)
                rows.append(_row("agd", kind, "base", w, seed, fid, 1000 * (k + 1), fidelity))
        for w in SCALES:
            rows.append(_row("agd_standard", "offset", "base", w, seed, 16 + noise(), 1000))
            rows.append(
                _row("gd", "offset", "base", w, seed, 14 + noise(), BASE_PARAMS + 500, (0.5, 3.0))
            )
            for method in ("agd", "agd_native"):
                fidelity = (0.02 * w, 1.0)
                rows.append(
                    _row(method, "offset", "derived", w, seed, 15 + noise(), 1000, fidelity)
                )
    rows.append(_row("real", "-", "data", math.nan, 0, 3.0))
    table = pd.DataFrame(rows)[COLUMNS]
    return table


def synthetic_fidelity() -> pd.DataFrame:
    """A fidelity table with the "none" baseline compared with CFG at every w."""
    rows = []
    for ckpt in ("base", "derived"):
        for seed in SEEDS:
            for w in SCALES:
                rows.append(
                    {
                        "method": "none",
                        "adapter_type": "-",
                        "checkpoint": ckpt,
                        "guidance_scale": w,
                        "seed": seed,
                        "fidelity_mse": 0.3 * (w - 1) + 0.01 * seed,
                        "fidelity_feature": 1.0 + 2.0 * (w - 1),
                    }
                )
    return pd.DataFrame(rows)[KEYS + FIDELITY_COLUMNS]


def legend_labels(fig) -> list[str]:
    legends = [ax.get_legend() for ax in fig.axes] + list(fig.legends)
    return [text.get_text() for leg in legends if leg is not None for text in leg.get_texts()]


def data_panels(fig) -> list:
    """The axes that plot data (not the legend rows)."""
    return [ax for ax in fig.axes if ax.axison]


def saved_png(fig, path, min_px=300):
    plots.save_figure(fig, path)
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    assert min(image.shape[:2]) >= min_px
    assert max(image.shape[:2]) < 6000
    return image


def test_fid_vs_w_draws_every_adapter_type_and_both_checkpoints(tmp_path):
    table = synthetic_table()
    fig = plots.fid_vs_w(table)
    labels = legend_labels(fig)
    for kind in TYPES:
        label = plots.adapter_label(kind)
        # one line per type on the base, with its origin and its parameter fraction
        ones = [x for x in labels if x.startswith(f"AGD, {label}") and "(1 NFE" in x]
        assert len(ones) == 1, (kind, labels)
        assert f"{1000 * (TYPES.index(kind) + 1) / BASE_PARAMS * 100:.2g}% of base" in ones[0]
    assert any("paper" in x for x in labels) and any("official code" in x for x in labels)
    assert any("this project" in x for x in labels)
    assert any("transfer" in x for x in labels)
    assert any("trained on this checkpoint" in x for x in labels)
    assert any("floor" in x for x in labels)
    assert any("standard trajectories" in x for x in labels)
    assert len(data_panels(fig)) == 2
    # the headline type (used by agd_standard and the derived panel) leads the base legend
    base_legend = next(ax.get_legend() for ax in fig.axes if ax.get_legend())
    base_labels = [t.get_text() for t in base_legend.get_texts()]
    agd = [x for x in base_labels if x.startswith("AGD, ") and "(1 NFE" in x]
    assert agd[0].startswith("AGD, offset (paper)")
    saved_png(fig, tmp_path / "fid.png")


def test_adapter_colours_are_the_same_in_every_figure():
    table = synthetic_table()
    colours = {}
    for fig in (plots.fid_vs_w(table), plots.fidelity_vs_w(table, synthetic_fidelity())):
        for ax in fig.axes:
            for bars in ax.containers:  # one ErrorbarContainer per line
                for kind in TYPES:
                    if bars.get_label().startswith(f"AGD, {plots.adapter_label(kind)}"):
                        colours.setdefault(kind, set()).add(bars.lines[0].get_color())
        plots.plt.close(fig)
    assert set(colours) == set(TYPES)
    assert all(len(c) == 1 for c in colours.values()), colours
    assert len({next(iter(c)) for c in colours.values()}) == len(TYPES)


def test_fidelity_figure_has_the_none_baseline_and_log_scale(tmp_path):
    table = synthetic_table()
    fig = plots.fidelity_vs_w(table, synthetic_fidelity())
    labels = legend_labels(fig)
    assert plots.NONE_BASELINE in labels
    for kind in TYPES:
        assert any(x.startswith(f"AGD, {plots.adapter_label(kind)}") for x in labels)
    assert any(x.startswith("GD") for x in labels)
    assert not any(x.startswith("CFG") for x in labels)  # the reference, not a line
    mse, feature = fig.axes[:2]
    # MSE spans 0.0125 .. 0.6: more than a decade, so log; features stay linear
    assert mse.get_yscale() == "log"
    assert feature.get_yscale() == "linear"
    baseline = [c for c in mse.containers if c.get_label() == plots.NONE_BASELINE]
    assert baseline and baseline[0].lines[0].get_linestyle() == "--"
    saved_png(fig, tmp_path / "fidelity.png")


def test_figures_draw_without_fidelity_values(tmp_path):
    table = synthetic_table()
    table[FIDELITY_COLUMNS] = math.nan
    saved_png(plots.fid_vs_w(table), tmp_path / "fid.png")
    fig = plots.fidelity_vs_w(table, None)
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert "no fidelity values in the table" in texts
    saved_png(fig, tmp_path / "fidelity.png")
    # the baseline alone still draws
    fig = plots.fidelity_vs_w(table, synthetic_fidelity())
    assert legend_labels(fig) == [plots.NONE_BASELINE]
    saved_png(fig, tmp_path / "fidelity_none.png")


def test_fid_vs_w_with_one_seed_and_base_only(tmp_path):
    table = synthetic_table()
    table = table[(table.seed == 0) & (table.checkpoint != "derived")]
    fig = plots.fid_vs_w(table)
    assert len(data_panels(fig)) == 1
    saved_png(fig, tmp_path / "fid.png", min_px=200)


def test_speed_figure(tmp_path):
    throughput = pd.DataFrame(
        {
            "method": ["cfg", "agd"] * 3,
            "images_per_s": [100.0, 190.0, 102.0, 195.0, 98.0, 185.0],
            "repeat": [0, 0, 1, 1, 2, 2],
            "batch_size": 64,
            "steps": 5,
        }
    )
    fig = plots.speed(throughput)
    # The title reports the pair ratios the claim reads: 1.90, 1.91, 1.89 -> median 1.90.
    title = fig.axes[0].get_title()
    assert "median 1.90x" in title and "1.89x to 1.91x over 3 pairs" in title
    saved_png(fig, tmp_path / "speed.png", min_px=200)


@pytest.fixture
def base_and_adapters(tmp_path, tiny_dit):
    from repro.agd.distill import adapters_for
    from repro.agd.model import save_adapters
    from repro.core.modelio import save_dit

    base = tiny_dit(seed=0)
    save_dit(base, tmp_path / "base")
    paths = []
    for kind in ("offset", "adaln", "mlp_gate"):
        params = {"adapter_type": kind, "adapter_dim": 4, "w_scale": 1.0, "seed": 0}
        path = tmp_path / f"cfg_{kind}_s0.safetensors"
        save_adapters(path, adapters_for(base, params))
        paths.append(path)
    return tmp_path / "base", paths


GRID = {
    "grid_classes": [0, 3, 7],
    "grid_per_class": 2,
    "grid_guidance_scale": 2.0,
    "sampler": SAMPLER,
}


def test_sample_grid_one_panel_per_adapter_file(tmp_path, base_and_adapters):
    base, adapters = base_and_adapters
    fig = plots.sample_grid(base, adapters, GRID)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert len(titles) == 2 + len(adapters)
    assert titles[0].startswith("no guidance") and titles[1].startswith("CFG")
    assert titles[2].startswith("AGD, offset (paper)")
    assert titles[3].startswith("AGD, adaLN (this project's)")
    assert titles[4].startswith("AGD, MLP gate (official code)")
    # zero-initialised adapters: AGD is the base, so from the same noise the no-guidance
    # panel and every AGD panel are the same pixels
    images = [ax.get_images()[0].get_array() for ax in fig.axes if ax.get_images()]
    assert len(images) == 5
    for agd in images[2:]:
        np.testing.assert_allclose(agd, images[0], atol=1e-5)
    assert not np.allclose(images[1], images[0], atol=1e-5)  # CFG at w = 2 differs
    saved_png(fig, tmp_path / "samples.png", min_px=150)


def test_main_writes_every_figure(tmp_path, base_and_adapters):
    import json

    base, adapters = base_and_adapters
    table_path, fidelity_path = tmp_path / "agd_fid.csv", tmp_path / "base.csv"
    synthetic_table().to_csv(table_path, index=False)
    synthetic_fidelity().to_csv(fidelity_path, index=False)
    throughput = tmp_path / "throughput.csv"
    pd.DataFrame(
        {
            "method": ["cfg", "agd"] * 2,
            "images_per_s": [100.0, 190.0, 102.0, 195.0],
            "repeat": [0, 0, 1, 1],
            "batch_size": 64,
            "steps": 5,
        }
    ).to_csv(throughput, index=False)
    out = {name: tmp_path / "figures" / f"{name}.png" for name in ("fid", "fi", "samples", "sp")}
    plots.main(
        [
            "--table", str(table_path),
            "--throughput", str(throughput),
            "--base", str(base),
            "--adapters", *map(str, adapters[:2]),
            "--fidelity", str(fidelity_path),
            "--fid-figure", str(out["fid"]),
            "--fidelity-figure", str(out["fi"]),
            "--samples-figure", str(out["samples"]),
            "--speed-figure", str(out["sp"]),
            "--device", "cpu",
            "--params", json.dumps(GRID),
        ]
    )  # fmt: skip
    for path in out.values():
        assert mpimg.imread(path).shape[0] > 100
    assert not list((tmp_path / "figures").glob(".*.tmp"))
