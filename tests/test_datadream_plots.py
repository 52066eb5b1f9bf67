"""repro.datadream.plots: DataDream's four figures from hand-made tables (no Snakemake)."""

from __future__ import annotations

import json

import matplotlib.image as mpimg
import pandas as pd
import pytest
import torch

from repro.core.data import write_image_dataset
from repro.core.errors import ReproInputError
from repro.datadream import plots
from repro.datadream.table import ACCURACY_COLUMNS, FID_COLUMNS

SEEDS = (0, 1, 2)
SHOTS = (1, 4, 8, 16)
NS = (10, 50, 100)
CLASSNAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# Test accuracy by method at 16 shots (seed s adds s / 100), as the workflow's runs.
BASE = {
    ("zero_shot", "none"): 0.30,
    ("real", "none"): 0.70,
    ("synthetic", "unadapted"): 0.40,
    ("synthetic", "cls"): 0.55,
    ("synthetic", "dset"): 0.60,
    ("real_synthetic", "unadapted"): 0.72,
    ("real_synthetic", "cls"): 0.78,
    ("real_synthetic", "dset"): 0.80,
}


@pytest.fixture(autouse=True)
def no_mlflow(monkeypatch):
    monkeypatch.setenv("REPRO_MLFLOW", "0")


def row(method, generator, shots, n, seed, test, selected):
    return dict(
        method=method,
        generator=generator,
        shots=shots,
        n_synthetic_per_class=n,
        seed=seed,
        val_acc=test,
        test_acc=test,
        selected_epoch=2,
        epochs=10,
        train_images=10 * (shots + n),
        trainable_params=0 if method == "zero_shot" else 4096,
        selected=selected,
    )


def accuracy_table() -> pd.DataFrame:
    rows = []
    for seed in SEEDS:
        bump = seed / 100
        rows.append(row("zero_shot", "none", 0, 0, seed, BASE["zero_shot", "none"], True))
        for shots in SHOTS:  # real-only grows with the shots
            rows.append(row("real", "none", shots, 0, seed, 0.4 + 0.3 * shots / 16 + bump, True))
        for (method, generator), acc in BASE.items():
            if method not in ("synthetic", "real_synthetic"):
                continue
            shots = 0 if (method, generator) == ("synthetic", "unadapted") else 16
            for n in NS:  # N=100 is the best (and selected); smaller N lose 0.1 per step
                penalty = 0.05 * (len(NS) - 1 - NS.index(n))
                rows.append(row(method, generator, shots, n, seed, acc + bump - penalty, n == 100))
    return pd.DataFrame(rows, columns=ACCURACY_COLUMNS)


def fid_table() -> pd.DataFrame:
    rows = []
    for seed in SEEDS:
        for generator, shots, fid in (
            ("unadapted", 0, 30.0),
            ("cls", 16, 12.0),
            ("dset", 16, 15.0),
        ):
            rows.append(
                dict(generator=generator, shots=shots, seed=seed, fid=fid + seed, num_images=1000)
                | dict(n_per_class=100)
            )
    return pd.DataFrame(rows, columns=FID_COLUMNS)


def saved_png(fig, path, min_px=300):
    plots.save_figure(fig, path)
    image = mpimg.imread(path)
    assert image.ndim == 3 and min(image.shape[:2]) >= min_px and max(image.shape[:2]) < 6000
    return image


def bar_widths(ax) -> list[float]:
    return [p.get_width() for p in ax.patches if p.get_height() > 0.5]


def test_main_figure_bars_are_the_seed_means_with_zero_shot_as_a_line(tmp_path):
    fig = plots.main_figure(accuracy_table(), fid_table(), 16)
    ax, fx = fig.axes[:2]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == [plots.entry_label(m, g) for m, g in plots.MAIN_ROWS]
    # bars: mean over seeds (bumps 0, 1, 2 points: +1 point) of the SELECTED N=100 rows
    expected = [100 * BASE[m, g] + 1 for m, g in plots.MAIN_ROWS]
    expected[0] = 100 * (0.4 + 0.3) + 1  # real-only at 16 shots
    assert bar_widths(ax) == pytest.approx(expected)
    zero = [line for line in ax.get_lines() if "zero-shot CLIP" in str(line.get_label())]
    assert len(zero) == 1 and zero[0].get_xdata()[0] == pytest.approx(30.0)
    # FID panel: unadapted (shots 0), cls and dset at 16 shots, seed means
    assert [t.get_text() for t in fx.get_yticklabels()] == [
        "unadapted generator",
        "DataDream_cls",
        "DataDream_dset",
    ]
    assert bar_widths(fx) == pytest.approx([31.0, 13.0, 16.0])
    saved_png(fig, tmp_path / "main.png")


def test_n_synthetic_figure_draws_every_n_per_generator(tmp_path):
    fig = plots.n_synthetic_figure(accuracy_table(), 16)
    synthetic, mixed = fig.axes[:2]
    for ax in (synthetic, mixed):
        labels = ax.get_legend_handles_labels()[1]
        assert [x for x in labels if x in plots.GENERATOR_NAME.values()] == list(
            plots.GENERATOR_NAME.values()
        )
        assert any(x.startswith("real shots only") for x in labels)
        assert any(x.startswith("zero-shot CLIP") for x in labels)
    dset = next(line for line in synthetic.get_lines() if line.get_label() == "DataDream_dset")
    assert list(dset.get_xdata()) == list(NS)
    assert list(dset.get_ydata()) == pytest.approx([51.0, 56.0, 61.0])  # every N, not just the best
    saved_png(fig, tmp_path / "n.png")


def test_shots_figure_has_real_only_at_every_size(tmp_path):
    fig = plots.shots_figure(accuracy_table())
    ax = fig.axes[0]
    real = next(line for line in ax.get_lines() if line.get_label() == "real shots only")
    assert list(real.get_xdata()) == list(SHOTS)
    expected = [100 * (0.4 + 0.3 * s / 16) + 1 for s in SHOTS]
    assert list(real.get_ydata()) == pytest.approx(expected)
    labels = ax.get_legend_handles_labels()[1]
    assert "real + synthetic: DataDream_dset" in labels
    assert any(x.startswith("synthetic: unadapted generator, no real shot") for x in labels)
    saved_png(fig, tmp_path / "shots.png")


def test_figures_survive_an_empty_table(tmp_path):
    """An empty table still gives a readable figure that says so, in every panel."""
    empty, no_fid = accuracy_table().iloc[0:0], fid_table().iloc[0:0]
    figures = {
        "a": plots.main_figure(empty, no_fid, 16),
        "b": plots.n_synthetic_figure(empty, 16),
        "c": plots.shots_figure(empty),
    }
    for name, fig in figures.items():
        for ax in fig.axes:
            texts = [t.get_text() for t in ax.texts]
            assert any(t.startswith("no ") and "rows" in t for t in texts), (name, texts)
        saved_png(fig, tmp_path / f"{name}.png", min_px=100)


def dataset(path, kind, per_class, value_of_class, generator=None):
    labels = torch.arange(10).repeat_interleave(per_class)
    images = torch.stack([torch.full((1, 8, 8), value_of_class(int(y))) for y in labels])
    meta = {"shots": per_class, "classnames": CLASSNAMES}
    if generator:
        meta["generator"] = generator
    write_image_dataset(path, images, labels, kind, meta)
    return str(path)


def test_the_cli_writes_four_figures_and_the_grid_shows_each_class_per_row(tmp_path):
    acc, fid = tmp_path / "acc.csv", tmp_path / "fid.csv"
    accuracy_table().to_csv(acc, index=False)
    fid_table().to_csv(fid, index=False)
    fewshot = dataset(
        tmp_path / "fewshot.safetensors", "datadream_fewshot", 16, lambda c: -1 + c / 5
    )
    synthetic = [
        f"{g}=" + dataset(tmp_path / f"{g}.safetensors", "datadream_synthetic", 6, lambda c: 1.0, g)
        for g in ("dset", "unadapted", "cls")  # any order: the grid orders them
    ]
    outs = {k: tmp_path / "figures" / f"{k}.png" for k in ("main", "n", "shots", "samples")}

    def args(synthetic, params):
        return (
            ["--accuracy", str(acc), "--fid", str(fid), "--fewshot", fewshot]
            + ["--synthetic", *synthetic, "--main-out", str(outs["main"])]
            + ["--n-synthetic-out", str(outs["n"]), "--shots-out", str(outs["shots"])]
            + ["--samples-out", str(outs["samples"]), "--params", json.dumps(params)]
        )

    plots.main(args(synthetic, {"main_shots": 16, "classnames": CLASSNAMES}))
    for path in outs.values():
        assert mpimg.imread(path).shape[0] >= 300

    # The grid itself: panel order and one class per row (class c's real shots have value c).
    from repro.core.data import load_image_dataset

    panels = [("real", load_image_dataset(fewshot))]
    panels += [(g, load_image_dataset(tmp_path / f"{g}.safetensors")) for g in ("unadapted", "cls")]
    fig = plots.samples_figure(panels, CLASSNAMES, 4)
    grid = fig.axes[0].get_images()[0].get_array()
    assert grid.shape == (10 * 9 - 1, 4 * 9 - 1)
    row_values = [float(grid[r * 9 + 3, 3]) for r in range(10)]  # a pixel of each class row
    assert row_values == pytest.approx([(-1 + c / 5 + 1) / 2 for c in range(10)])
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == CLASSNAMES
    import matplotlib.pyplot as plt

    plt.close(fig)

    with pytest.raises(ReproInputError, match="--synthetic: 'photo=x'"):
        plots.main(args(["photo=x"], {"main_shots": 16}))
    with pytest.raises(ReproInputError, match="datadream.main_shots"):
        plots.main(args(synthetic, {}))


def test_a_synthetic_set_of_another_kind_names_the_file(tmp_path):
    acc, fid = tmp_path / "acc.csv", tmp_path / "fid.csv"
    accuracy_table().to_csv(acc, index=False)
    fid_table().to_csv(fid, index=False)
    fewshot = dataset(tmp_path / "fewshot.safetensors", "datadream_fewshot", 2, lambda c: 0.0)
    out = tmp_path / "figures"
    args = ["--accuracy", str(acc), "--fid", str(fid), "--fewshot", fewshot]
    args += ["--synthetic", f"cls={fewshot}", "--main-out", str(out / "a.png")]
    args += ["--n-synthetic-out", str(out / "b.png"), "--shots-out", str(out / "c.png")]
    args += ["--samples-out", str(out / "d.png"), "--params", '{"main_shots": 16}']
    with pytest.raises(ReproInputError, match=r"fewshot.safetensors.*datadream_synthetic"):
        plots.main(args)
    assert not out.exists()  # nothing drawn before every input is read
