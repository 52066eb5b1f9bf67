"""SLA's quality figures from hand-made tables, loss histories and samples files: the plotted
numbers checked against means computed by hand, empty inputs drawn as "no data" panels,
malformed files and bad settings refused by name."""

import json
import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
from test_sla_quality_claims import quality
from test_sla_quality_table import model_row, real_row

from repro.core.errors import ReproInputError
from repro.core.io import save_tensors
from repro.sla import plots
from repro.sla.table import build_table


def is_png(path):
    data = path.read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000


def table():
    """full and sla over 2 seeds, linear_only over 1 (no FID), the real clips."""
    rows = [
        model_row("full", 0, test_loss=0.1, frame_fid=20.0, attention_flops=3e10),
        model_row("full", 1, test_loss=0.3, frame_fid=24.0, attention_flops=3e10),
        model_row("sla", 0, test_loss=0.2, frame_fid=30.0, attention_flops=1e9),
        model_row("sla", 1, test_loss=0.4, frame_fid=34.0, attention_flops=3e9),
        model_row("linear_only", 0, test_loss=0.9, frame_fid=None, attention_flops=5e8),
        real_row(0, frame_fid=4.0),
        real_row(1, frame_fid=6.0),
    ]
    return build_table(rows)


def points(ax):
    return {line.get_gid(): line for line in ax.lines if line.get_gid()}


def texts(ax):
    return [t.get_text() for t in ax.texts]


def test_quality_data_is_the_mean_and_std_over_seeds():
    data = plots.quality_data(table(), order=["sla", "full"])
    loss = data[data.metric == "test_loss"].set_index("variant")
    assert list(loss.index) == ["sla", "full", "linear_only", "real"]
    assert loss.loc["full", "mean"] == pytest.approx(0.2)
    assert loss.loc["full", "std"] == pytest.approx(0.1 * math.sqrt(2))
    assert loss.loc["sla", "attention_flops"] == pytest.approx(2e9)  # mean of 1e9 and 3e9
    assert (loss.loc["linear_only", "mean"], loss.loc["linear_only", "std"]) == (0.9, 0.0)
    assert list(loss.n_seeds) == [2, 2, 1, 0]  # the real clips have no test loss
    fid = data[data.metric == "frame_fid"].set_index("variant")
    assert fid.loc["sla", "mean"] == pytest.approx(32.0)
    assert fid.loc["sla", "std"] == pytest.approx(2 * math.sqrt(2))
    assert fid.loc["real", "mean"] == pytest.approx(5.0) and math.isnan(
        fid.loc["real", "attention_flops"]
    )
    assert math.isnan(fid.loc["linear_only", "mean"]) and fid.loc["linear_only", "n_seeds"] == 0


def test_quality_figure_draws_those_numbers(tmp_path):
    fig, data = plots.quality_figure(table())
    loss_ax, fid_ax = fig.axes
    assert loss_ax.get_xscale() == "log" and fid_ax.get_xscale() == "log"
    drawn = points(loss_ax)
    assert drawn["sla"].get_xdata()[0] == pytest.approx(2e9)
    assert drawn["sla"].get_ydata()[0] == pytest.approx(0.3)
    assert drawn["linear_only"].get_ydata()[0] == pytest.approx(0.9)
    assert "real" not in drawn  # no point for the real clips
    assert drawn["full"].get_linestyle() == "--"  # full's mean, dashed across
    assert drawn["full"].get_ydata()[0] == pytest.approx(0.2)
    assert {"full", "sla", "linear_only"} <= set(texts(loss_ax))
    fid = points(fid_ax)
    assert "linear_only" not in fid  # no FID measured: no point
    assert fid["sla"].get_ydata()[0] == pytest.approx(32.0)
    assert fid["full"].get_ydata()[0] == pytest.approx(22.0)
    assert fid["real"].get_linestyle() == ":" and fid["real"].get_ydata()[0] == pytest.approx(5.0)
    assert "real" not in points(loss_ax)  # the floor is on the FID panel only
    # error bars: the std over seeds around the mean, sla's FID 32 +- 2 * sqrt(2)
    (bars,) = [c for c in fid_ax.collections if c.get_gid() == "sla/std"]
    (segment,) = bars.get_segments()
    assert sorted(segment[:, 1]) == pytest.approx([32 - 2 * math.sqrt(2), 32 + 2 * math.sqrt(2)])
    assert "linear_only" not in texts(fid_ax)
    out = tmp_path / "figures" / "sla_quality.png"
    plots.save_figure(fig, out)
    assert is_png(out)


def test_quality_figure_uses_the_given_reference_and_survives_no_rows():
    fig, _ = plots.quality_figure(table(), full="sla")
    assert points(fig.axes[0])["sla"].get_ydata()[0] == pytest.approx(0.3)
    lines = [line for line in fig.axes[0].lines if line.get_gid() == "sla"]
    assert [line.get_linestyle() for line in lines].count("--") == 1
    plt.close(fig)
    fig, data = plots.quality_figure(build_table([]))
    assert data.empty
    assert all("no variant with FLOPs and this metric" in texts(ax) for ax in fig.axes)
    plt.close(fig)


def test_quality_refuses_a_table_without_a_column():
    with pytest.raises(ReproInputError, match=r"the quality table lacks columns \['frame_fid'\]"):
        plots.quality_figure(table().drop(columns="frame_fid"))


def write_samples(path, variant, seed, count=2, frames=3, size=4, captions=None, video=None):
    generator = torch.Generator().manual_seed(seed + 7 * len(variant))
    if video is None:
        video = torch.randint(0, 256, (count, 3, frames, size, size), generator=generator)
        video = video.to(torch.uint8)
    if captions is None:
        captions = [f"a red ball bouncing, clip {k}" for k in range(count)]
    metadata = {"variant": variant, "seed": seed, "captions": captions, "steps": 4}
    save_tensors(path, {"video": video}, kind="sla_samples", metadata=metadata)
    return video


def test_frames_show_sample_0_of_each_variants_seed_0_file(tmp_path):
    videos = {}
    paths = []
    for variant, seed in (("sla", 1), ("sla", 0), ("full", 0), ("linear_only", 2)):
        path = tmp_path / f"{variant}_s{seed}.safetensors"
        videos[(variant, seed)] = write_samples(path, variant, seed)
        paths.append(path)
    samples = [plots.load_samples(p) for p in paths]
    fig, data = plots.frames_figure(samples, order=["sla", "full"], scale=3)
    assert list(data.variant) == ["sla", "full", "linear_only"]
    assert list(data.seed) == [0, 0, 2]  # seed 0, else the lowest seed there is
    assert list(data.frames) == [3, 3, 3]
    assert data.caption[0] == "a red ball bouncing, clip 0"
    axes = {ax.get_gid(): ax for ax in fig.axes if ax.get_gid()}
    assert set(axes) == {f"{v}/{f}" for v in ("sla", "full", "linear_only") for f in range(3)}
    image = np.asarray(axes["sla/2"].images[0].get_array())
    expected = videos[("sla", 0)][0, :, 2].numpy().transpose(1, 2, 0)
    assert image.shape == (12, 12, 3) and (image[::3, ::3] == expected).all()
    assert (image[1::3, 2::3] == expected).all()  # each pixel a 3 x 3 block
    labels = [ax.get_ylabel() for ax in fig.axes if ax.get_ylabel()]
    assert labels == ["sla", "full", "linear_only"]
    captions = [t for ax in fig.axes for t in texts(ax)]
    assert "sla (seed 0): 'a red ball bouncing, clip 0'" in captions
    assert "linear_only (seed 2): 'a red ball bouncing, clip 0'" in captions
    out = tmp_path / "sla_frames.png"
    plots.save_figure(fig, out)
    assert is_png(out)


def test_upscale_makes_each_pixel_a_block():
    image = np.arange(12, dtype=np.uint8).reshape(3, 2, 2)
    big = plots.upscale(image, 2)
    assert big.shape == (4, 4, 3)
    assert (big[:2, :2] == [0, 4, 8]).all() and (big[2:, 2:] == [3, 7, 11]).all()


def test_frames_without_samples_and_with_a_duplicate(tmp_path):
    fig, data = plots.frames_figure([])
    assert data.empty and "no samples files" in texts(fig.axes[0])
    plt.close(fig)
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    write_samples(first, "sla", 0)
    write_samples(second, "sla", 0)
    samples = [plots.load_samples(first), plots.load_samples(second)]
    with pytest.raises(
        ReproInputError, match=rf"{second}: variant 'sla' seed 0 is also in {first}"
    ):
        plots.frames_figure(samples)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"video": torch.zeros(2, 3, 3, 4, 4)}, "video must be uint8 [N, 3, F, H, W]"),
        ({"video": torch.zeros(2, 1, 3, 4, 4, dtype=torch.uint8)}, "video must be uint8"),
        ({"video": torch.zeros(0, 3, 3, 4, 4, dtype=torch.uint8)}, "with N >= 1"),
        ({"captions": ["only one"]}, "metadata 'captions' must list 2 captions"),
        ({"variant": ""}, "metadata 'variant' must be a variant name"),
        ({"seed": -1}, "metadata 'seed' must be an integer >= 0"),
    ],
)
def test_malformed_samples_are_refused_naming_the_file(tmp_path, change, message):
    path = tmp_path / "samples.safetensors"
    arguments = {"variant": "sla", "seed": 0, **change}
    write_samples(path, **arguments)
    with pytest.raises(ReproInputError, match=str(path)) as err:
        plots.load_samples(path)
    assert message in str(err.value)


def test_foreign_or_incomplete_samples_files_are_refused(tmp_path):
    foreign = tmp_path / "foreign.safetensors"
    save_tensors(foreign, {"video": torch.zeros(1, 3, 1, 2, 2, dtype=torch.uint8)}, kind="x")
    with pytest.raises(ReproInputError, match="expected a 'sla_samples' file"):
        plots.load_samples(foreign)
    lacking = tmp_path / "lacking.safetensors"
    save_tensors(lacking, {"frames": torch.zeros(1)}, kind="sla_samples")
    with pytest.raises(ReproInputError, match=r"missing tensors \['video'\]"):
        plots.load_samples(lacking)


def write_curve(path, variant, seed, history, **extra):
    path.write_text(
        json.dumps({"variant": variant, "seed": seed, "loss_history": history, **extra})
    )
    return path


def test_the_window_is_a_twentieth_of_the_steps_at_least_1():
    assert [plots.window(n) for n in (1, 19, 20, 39, 40, 100)] == [1, 1, 1, 1, 2, 5]


def test_the_moving_average_is_trailing_by_hand():
    loss = np.array([4.0, 2.0, 6.0, math.nan, 1.0])
    assert list(plots.moving_average(loss, 2)) == [4.0, 3.0, 4.0, 6.0, 1.0]
    assert list(plots.moving_average(loss, 1)[[0, 1, 2, 4]]) == [4.0, 2.0, 6.0, 1.0]


def test_loss_curves_are_the_mean_over_seeds_of_the_smoothed_histories(tmp_path):
    # 40 steps: a window of 2
    a = [float(i) for i in range(1, 41)]  # 1, 2, ..., 40
    b = [3.0] * 40
    curves = [
        plots.load_curve(write_curve(tmp_path / "sla0.json", "sla", 0, a)),
        plots.load_curve(write_curve(tmp_path / "sla1.json", "sla", 1, b)),
        plots.load_curve(write_curve(tmp_path / "full0.json", "full", 0, [0.5, None, 0.25])),
    ]
    fig, data = plots.loss_figure(curves, order=["sla"])
    sla = data[data.variant == "sla"]
    assert list(sla.step) == list(range(1, 41))
    # seed 0 smoothed: 1, 1.5, 2.5, ..., 39.5; seed 1: 3 throughout; then their mean
    assert sla.loss.iloc[0] == pytest.approx((1 + 3) / 2)
    assert sla.loss.iloc[1] == pytest.approx((1.5 + 3) / 2)
    assert sla.loss.iloc[-1] == pytest.approx((39.5 + 3) / 2)
    assert (sla.n_seeds == 2).all()
    full = data[data.variant == "full"]
    # window 1: the unmeasured step stays a gap in the line, counted for no seed
    assert full.loss.iloc[0] == 0.5 and math.isnan(full.loss.iloc[1]) and full.loss.iloc[2] == 0.25
    assert list(full.n_seeds) == [1, 0, 1]
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["sla (2 seeds)", "full (1 seed)"]
    line = points(ax)["sla"]
    assert list(line.get_ydata()) == pytest.approx(list(sla.loss))
    out = tmp_path / "sla_loss.png"
    plots.save_figure(fig, out)
    assert is_png(out)


def test_seeds_of_unequal_length_average_where_they_have_steps(tmp_path):
    curves = [
        plots.Curve(tmp_path / "a", "sla", 0, np.array([2.0, 2.0, 2.0])),
        plots.Curve(tmp_path / "b", "sla", 1, np.array([4.0])),
        plots.Curve(tmp_path / "c", "full", 0, np.array([])),  # no steps: no line
    ]
    data = plots.loss_data(curves)
    assert list(data.variant) == ["sla"] * 3
    assert list(data.loss) == pytest.approx([3.0, 2.0, 2.0])
    assert list(data.n_seeds) == [2, 1, 1]


def test_loss_figure_without_histories_and_with_a_duplicate(tmp_path):
    fig, data = plots.loss_figure([])
    assert data.empty and "no fine-tuning loss histories" in texts(fig.axes[0])
    plt.close(fig)
    first = write_curve(tmp_path / "a.json", "sla", 0, [1.0])
    second = write_curve(tmp_path / "b.json", "sla", 0, [1.0])
    curves = [plots.load_curve(first), plots.load_curve(second)]
    with pytest.raises(
        ReproInputError, match=rf"{second}: variant 'sla' seed 0 is also in {first}"
    ):
        plots.loss_data(curves)


@pytest.mark.parametrize(
    "content, message",
    [
        ([1, 2], "expected a JSON object"),
        ({"variant": "sla", "seed": 0}, "missing keys ['loss_history']"),
        ({"variant": "", "seed": 0, "loss_history": []}, "variant must be a variant name"),
        ({"variant": "sla", "seed": 0.5, "loss_history": []}, "seed must be an integer >= 0"),
        ({"variant": "sla", "seed": 0, "loss_history": [1.0, "x"]}, "loss_history must be a list"),
        ({"variant": "sla", "seed": 0, "loss_history": 1.0}, "loss_history must be a list"),
    ],
)
def test_malformed_finetune_summaries_are_refused_naming_the_file(tmp_path, content, message):
    path = tmp_path / "finetune.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ReproInputError, match=str(path)) as err:
        plots.load_curve(path)
    assert message in str(err.value)


def stage_inputs(tmp_path, finetune=True, samples=True):
    table_path = tmp_path / "sla_quality.csv"
    table().to_csv(table_path, index=False)
    args = ["--table", str(table_path)]
    if finetune:
        paths = [
            write_curve(tmp_path / f"{v}_{s}.json", v, s, list(np.linspace(1.0, 0.1, 60)))
            for v in ("full", "sla")
            for s in (0, 1)
        ]
        args += ["--finetune", *map(str, paths)]
    if samples:
        paths = []
        for variant in ("full", "sla"):
            paths.append(tmp_path / f"{variant}.safetensors")
            write_samples(paths[-1], variant, 0, frames=6, size=16)
        args += ["--samples", *map(str, paths)]
    return args


def test_the_stage_writes_the_three_figures(tmp_path):
    out = tmp_path / "figures"
    params = '{"order": ["sla", "full"], "full": "full"}'
    plots.main([*stage_inputs(tmp_path), "--out-dir", str(out), "--params", params])
    assert sorted(p.name for p in out.iterdir()) == sorted(plots.FIGURES.values())
    for name in plots.FIGURES.values():
        assert is_png(out / name), name


def test_the_stage_draws_missing_data_as_empty_figures(tmp_path):
    out = tmp_path / "figures"
    args = stage_inputs(tmp_path, finetune=False, samples=False)
    quality({}).to_csv(tmp_path / "sla_quality.csv", index=False)  # no rows either
    plots.main([*args, "--finetune", "--samples", "--out-dir", str(out)])
    for name in plots.FIGURES.values():
        assert (out / name).stat().st_size > 0, name


def test_the_stage_refuses_bad_inputs_before_writing(tmp_path):
    args = stage_inputs(tmp_path)
    out = tmp_path / "figures"
    table().drop(columns="attention_flops").to_csv(tmp_path / "sla_quality.csv", index=False)
    with pytest.raises(ReproInputError, match=r"sla_quality.csv: missing columns"):
        plots.main([*args, "--out-dir", str(out)])
    table().to_csv(tmp_path / "sla_quality.csv", index=False)
    (tmp_path / "sla_1.json").write_text("{")
    with pytest.raises(ReproInputError, match=r"sla_1.json: not valid JSON"):
        plots.main([*args, "--out-dir", str(out)])
    assert not out.exists()


@pytest.mark.parametrize(
    "params, key",
    [
        ('{"order": "sla"}', "sla.quality.plots.order"),
        ('{"order": ["sla", ""]}', "sla.quality.plots.order"),
        ('{"full": ""}', "sla.quality.plots.full"),
        ('{"full": "real"}', "sla.quality.plots.full"),
        ('{"full": 3}', "sla.quality.plots.full"),
    ],
)
def test_bad_params_name_their_key(tmp_path, params, key):
    out = tmp_path / "figures"
    with pytest.raises(ReproInputError, match=key):
        plots.main([*stage_inputs(tmp_path), "--out-dir", str(out), "--params", params])
    assert not out.exists()


def test_params_defaults():
    assert plots.check_params({}) == {"order": None, "full": "full"}
    assert plots.check_params({"order": ["a"], "full": "a"}) == {"order": ["a"], "full": "a"}


def test_quality_table_rows_can_come_from_the_csv(tmp_path):
    # NaN metrics and the "none" feature map survive the CSV: the figure reads the file
    path = tmp_path / "sla_quality.csv"
    table().to_csv(path, index=False)
    data = plots.quality_data(pd.read_csv(path))
    assert data[data.variant == "real"]["mean"].tolist()[1] == pytest.approx(5.0)
