"""HuMo's figures drawn from hand-made tables and strips: the plotted numbers checked against
means computed by hand, a missing column or a malformed strips file refused by name."""

import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
from test_humo_claims import table

from repro.core.errors import ReproInputError
from repro.core.io import save_tensors
from repro.humo import plots
from repro.humo.table import CURVE_COLUMNS


def is_png(path):
    data = path.read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000


def metrics():
    """TIA full at paper (2 seeds) and fixed (2 seeds), no_focus (1 seed), the real rows;
    a TA row and a no_focus row at fixed that the ablation must not read."""
    return table(
        {
            ("TIA", "full", "paper", 0): {"id_sim": 0.6, "sync_c": 0.5, "fid": 10.0},
            ("TIA", "full", "paper", 1): {"id_sim": 0.8, "sync_c": 0.7, "fid": 14.0},
            ("TIA", "full", "fixed", 0): {"id_sim": 0.7, "sync_c": 0.2},
            ("TIA", "full", "fixed", 1): {"id_sim": 0.5, "sync_c": 0.4},
            ("TIA", "no_focus", "paper", 0): {"id_sim": 0.4, "sync_c": 0.3, "text_align": 0.25},
            ("TIA", "no_focus", "fixed", 0): {"id_sim": 0.0, "sync_c": 0.0},
            ("TA", "full", "paper", 0): {"id_sim": 0.1, "sync_c": 0.9},
            ("real", "real", "none", 0): {"id_sim": 0.9, "sync_c": 0.95, "fid": math.nan},
        }
    )


def bar_heights(ax):
    return {p.get_gid(): p.get_height() for p in ax.patches}


def test_ablation_bars_are_the_means_over_seeds_of_tia_at_the_cfg(tmp_path):
    fig, data = plots.ablation_figure(metrics(), cfg="paper")
    # the returned data, by hand
    full_id = data[(data.metric == "id_sim") & (data.variant == "full")].iloc[0]
    assert full_id["mean"] == pytest.approx(0.7) and full_id["std"] == pytest.approx(0.1 * 2**0.5)
    assert full_id.n_seeds == 2
    assert list(data[data.metric == "sync_c"].variant) == ["full", "no_focus", "real"]
    no_focus = data[(data.metric == "text_align") & (data.variant == "no_focus")].iloc[0]
    assert (no_focus["mean"], no_focus["std"], no_focus.n_seeds) == (0.25, 0.0, 1)
    # the figure draws exactly those numbers: panels id_sim, sync_c, text_align, fid
    id_ax, sync_ax, text_ax, fid_ax = fig.axes
    assert bar_heights(id_ax) == pytest.approx({"full": 0.7, "no_focus": 0.4})
    assert bar_heights(sync_ax) == pytest.approx({"full": 0.6, "no_focus": 0.3})
    assert bar_heights(fid_ax) == pytest.approx({"full": 12.0, "no_focus": 10.0})
    assert [t.get_text() for t in id_ax.get_xticklabels()] == [
        plots.VARIANT_NAME["full"],
        plots.VARIANT_NAME["no_focus"],
    ]
    # the real clips dashed where measured (id_sim 0.9), absent where not (fid NaN)
    (real,) = [line for line in id_ax.lines if line.get_gid() == "real"]
    assert real.get_ydata()[0] == pytest.approx(0.9) and real.get_linestyle() == "--"
    assert not [line for line in fid_ax.lines if line.get_gid() == "real"]
    # the seeds as dots: full's two id_sim values
    (dots,) = [c.get_offsets() for c in id_ax.collections if c.get_gid() == "seeds/full"]
    assert sorted(dots[:, 1]) == pytest.approx([0.6, 0.8])
    out = tmp_path / "figures" / "humo_ablation.png"
    plots.save_figure(fig, out)
    assert is_png(out)


def test_ablation_at_another_cfg_and_without_rows():
    fig, data = plots.ablation_figure(metrics(), cfg="fixed")
    assert bar_heights(fig.axes[1]) == pytest.approx({"full": 0.3, "no_focus": 0.0})
    plt.close(fig)
    fig, data = plots.ablation_figure(metrics(), cfg="code_17b")
    assert list(data.variant.unique()) == ["real"]
    assert "no TIA rows at cfg 'code_17b'" in [t.get_text() for t in fig.axes[0].texts]
    plt.close(fig)


@pytest.mark.parametrize("column", ["fid", "text_align", "variant"])
def test_ablation_refuses_a_table_without_a_metric_column(column):
    with pytest.raises(ReproInputError, match=rf"the metrics table lacks columns \['{column}'\]"):
        plots.ablation_figure(metrics().drop(columns=column))


def curve_rows(task, variant, cfg, seed, audio, values):
    offsets = range(-(len(values) // 2), len(values) // 2 + 1)
    return [(task, variant, cfg, seed, audio, o, v) for o, v in zip(offsets, values, strict=True)]


def curves():
    rows = (
        curve_rows("TIA", "full", "paper", 0, "matched", [0.1, 0.8, 0.2])
        + curve_rows("TIA", "full", "paper", 1, "matched", [0.3, 0.6, 0.0])
        + curve_rows("TIA", "full", "paper", 0, "shuffled", [0.0, 0.1, -0.1])
        + curve_rows("TIA", "full", "fixed", 0, "matched", [0.9, 0.9, 0.9])  # another form
        + curve_rows("TIA", "no_focus", "paper", 0, "matched", [0.9, 0.9, 0.9])  # other variant
        + curve_rows("TA", "full", "paper", 0, "matched", [0.2, 0.4, 0.2])
        + curve_rows("real", "real", "none", 0, "matched", [0.0, 0.9, 0.1])
        + curve_rows("real", "real", "none", 0, "shuffled", [0.0, 0.05, 0.0])
    )
    return pd.DataFrame(rows, columns=CURVE_COLUMNS)


def test_sync_curves_are_the_mean_over_seeds_per_offset(tmp_path):
    fig, data = plots.sync_figure(curves())
    tia = data[(data.task == "TIA") & (data.audio == "matched")]
    assert list(tia.offset) == [-1, 0, 1]
    assert list(tia["mean"]) == pytest.approx([0.2, 0.7, 0.1])
    assert list(tia["std"]) == pytest.approx([0.1 * 2**0.5] * 3)
    assert set(data.task) == {"TIA", "TA", "real"}
    tia_ax, ta_ax, real_ax = fig.axes
    lines = {line.get_gid(): line for line in tia_ax.lines if line.get_gid()}
    assert list(lines["matched"].get_xdata()) == [-1, 0, 1]
    assert list(lines["matched"].get_ydata()) == pytest.approx([0.2, 0.7, 0.1])
    assert list(lines["shuffled"].get_ydata()) == pytest.approx([0.0, 0.1, -0.1])
    # the band is +- the std over seeds: 0.7 + 0.1414 at offset 0
    band = tia_ax.collections[0].get_paths()[0].vertices
    assert band[:, 1].max() == pytest.approx(0.7 + 0.1 * 2**0.5)
    assert {line.get_gid() for line in ta_ax.lines if line.get_gid()} == {"matched"}
    real = [line for line in real_ax.lines if line.get_gid() == "matched"][0]
    assert list(real.get_ydata()) == pytest.approx([0.0, 0.9, 0.1])
    assert "2 seeds" in tia_ax.get_title() and "real test clips" in real_ax.get_title()
    out = tmp_path / "humo_sync.png"
    plots.save_figure(fig, out)
    assert is_png(out)


def test_sync_figure_with_no_curves_and_a_missing_column():
    fig, data = plots.sync_figure(curves().iloc[0:0])
    assert data.empty
    assert all("no rows in the table" in [t.get_text() for t in ax.texts] for ax in fig.axes)
    plt.close(fig)
    with pytest.raises(ReproInputError, match=r"the sync curves table lacks columns \['corr'\]"):
        plots.sync_figure(curves().drop(columns="corr"))


def test_cfg_tradeoff_points_are_the_means_with_std_error_bars(tmp_path):
    fig, data = plots.cfg_figure(metrics())
    assert list(data.cfg) == ["paper", "fixed", "none"]
    paper = data.iloc[0]
    assert (paper.id_sim_mean, paper.sync_c_mean) == pytest.approx((0.7, 0.6))
    assert (paper.id_sim_std, paper.sync_c_std) == pytest.approx((0.1 * 2**0.5,) * 2)
    fixed = data.iloc[1]
    assert (fixed.id_sim_mean, fixed.sync_c_mean) == pytest.approx((0.6, 0.3))
    ax = fig.axes[0]
    points = {line.get_gid(): line for line in ax.lines if line.get_gid()}
    assert points["paper"].get_xdata()[0] == pytest.approx(0.7)
    assert points["paper"].get_ydata()[0] == pytest.approx(0.6)
    assert points["none"].get_marker() == "*"  # the real clips
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[0] == "time-adaptive (paper, Eq. 4) (2 seeds)"
    assert labels[-1] == "real test clips (1 seed)"
    out = tmp_path / "humo_cfg.png"
    plots.save_figure(fig, out)
    assert is_png(out)
    with pytest.raises(ReproInputError, match=r"lacks columns \['sync_c'\]"):
        plots.cfg_figure(metrics().drop(columns="sync_c"))


def make_strips(clips=2, frames=3, size=4, tasks=("TI", "TA", "TIA")):
    generator = torch.Generator().manual_seed(0)

    def video():
        return torch.randint(0, 256, (clips, 3, frames, size, size), generator=generator).to(
            torch.uint8
        )

    return {
        "videos": {task: video() for task in tasks},
        "reference": torch.randint(0, 256, (clips, 3, size, size), generator=generator).to(
            torch.uint8
        ),
        "envelope": torch.rand(clips, frames, generator=generator),
        "real": video(),
        "captions": [f"a person nodding in front of wall {k}" for k in range(clips)],
    }


def test_upscale_makes_each_pixel_a_block():
    image = np.array([[[1, 2], [3, 4]], [[5, 6], [7, 8]], [[9, 10], [11, 12]]], dtype=np.uint8)
    big = plots.upscale(image, 3)
    assert big.shape == (6, 6, 3)
    assert (big[:3, :3] == [1, 5, 9]).all() and (big[3:, 3:] == [4, 8, 12]).all()
    assert (big[:3, 3:] == [2, 6, 10]).all() and (big[3:, :3] == [3, 7, 11]).all()


def test_strips_draw_every_task_the_real_clip_and_the_envelope(tmp_path):
    parts = make_strips()
    path = tmp_path / "strips.safetensors"
    plots.save_strips(path, **parts)
    strips = plots.load_strips(path)
    assert strips.tasks == ["TI", "TA", "TIA"]
    fig, data = plots.strips_figure(strips, clips=2, scale=4)
    assert list(data["row"]) == ["TI", "TA", "TIA", "real", "envelope"] * 2
    assert list(data["clip"]) == [0] * 5 + [1] * 5
    axes = {ax.get_gid(): ax for ax in fig.axes if ax.get_gid()}
    image = axes["TIA/1/2"].images[0].get_array()
    expected = parts["videos"]["TIA"][1, :, 2].numpy().transpose(1, 2, 0)
    assert image.shape == (16, 16, 3)
    assert (np.asarray(image)[::4, ::4] == expected).all()
    real = np.asarray(axes["real/0/0"].images[0].get_array())
    assert (real[::4, ::4] == parts["real"][0, :, 0].numpy().transpose(1, 2, 0)).all()
    reference = np.asarray(axes["reference/1"].images[0].get_array())
    assert (reference[::4, ::4] == parts["reference"][1].numpy().transpose(1, 2, 0)).all()
    envelope = [line for ax in fig.axes for line in ax.lines if line.get_gid() == "envelope/1"]
    assert list(envelope[0].get_ydata()) == pytest.approx(parts["envelope"][1].tolist())
    assert list(envelope[0].get_xdata()) == [0, 1, 2]
    labels = [ax.get_ylabel() for ax in fig.axes]
    assert [lab for lab in labels if lab in ("TI", "TA", "TIA", "real")] == [
        "TI",
        "TA",
        "TIA",
        "real",
    ] * 2
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert "clip 1: 'a person nodding in front of wall 1'" in texts
    out = tmp_path / "humo_strips.png"
    plots.save_figure(fig, out)
    assert is_png(out)


def test_strips_draw_at_most_the_clips_asked_for():
    parts = make_strips(clips=3, tasks=("TIA",))
    strips = plots.Strips(
        ["TIA"],
        {k: v.numpy() for k, v in parts["videos"].items()},
        parts["reference"].numpy(),
        parts["envelope"].numpy(),
        parts["real"].numpy(),
        parts["captions"],
    )
    fig, data = plots.strips_figure(strips, clips=1)
    assert list(data["row"]) == ["TIA", "real", "envelope"]
    plt.close(fig)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda p: p.update(envelope=p["envelope"][:, :2]), "envelope is torch.float32 [2, 2]"),
        (lambda p: p.update(reference=p["reference"].float()), "reference is torch.float32"),
        (lambda p: p["videos"].update(TA=p["videos"]["TA"][:, :, :2]), "video_TA is"),
        (lambda p: p.update(real=p["real"][:, :1]), "real must be uint8 [K, 3, F, H, W]"),
        (lambda p: p.update(captions=["only one"]), "must list 2 captions"),
    ],
)
def test_malformed_strips_are_refused_naming_the_file(tmp_path, change, message):
    parts = make_strips()
    change(parts)
    path = tmp_path / "strips.safetensors"
    plots.save_strips(path, **parts)
    with pytest.raises(ReproInputError, match=str(path)) as err:
        plots.load_strips(path)
    assert message in str(err.value)


def test_foreign_or_incomplete_strips_files_are_refused(tmp_path):
    parts = make_strips()
    foreign = tmp_path / "foreign.safetensors"
    save_tensors(foreign, {"real": parts["real"]}, kind="humo_generated")
    with pytest.raises(ReproInputError, match="expected a 'humo_strips' file"):
        plots.load_strips(foreign)
    lacking = tmp_path / "lacking.safetensors"
    tensors = {"reference": parts["reference"], "envelope": parts["envelope"]}
    save_tensors(
        lacking,
        {**tensors, "real": parts["real"]},
        kind="humo_strips",
        metadata={"tasks": ["TIA"], "captions": parts["captions"]},
    )
    with pytest.raises(ReproInputError, match=r"missing tensors \['video_TIA'\]"):
        plots.load_strips(lacking)
    no_tasks = tmp_path / "no_tasks.safetensors"
    save_tensors(no_tasks, {**tensors, "real": parts["real"]}, kind="humo_strips")
    with pytest.raises(ReproInputError, match="metadata 'tasks'"):
        plots.load_strips(no_tasks)


def stage_inputs(tmp_path):
    metrics_path, curves_path = tmp_path / "humo_metrics.csv", tmp_path / "curves.csv"
    metrics().to_csv(metrics_path, index=False)
    curves().to_csv(curves_path, index=False)
    strips_path = tmp_path / "strips.safetensors"
    plots.save_strips(strips_path, **make_strips(frames=9, size=16))
    return [
        *("--metrics", str(metrics_path), "--curves", str(curves_path)),
        *("--strips", str(strips_path)),
    ]


def test_the_stage_writes_the_four_figures(tmp_path):
    out = tmp_path / "figures"
    plots.main([*stage_inputs(tmp_path), "--out-dir", str(out), "--params", '{"clips": 1}'])
    for name in plots.FIGURES.values():
        assert is_png(out / name), name
    assert sorted(p.name for p in out.iterdir()) == sorted(plots.FIGURES.values())


def test_the_stage_refuses_bad_inputs_before_writing(tmp_path):
    args = stage_inputs(tmp_path)
    out = tmp_path / "figures"
    metrics().drop(columns="fid").to_csv(tmp_path / "humo_metrics.csv", index=False)
    with pytest.raises(ReproInputError, match=r"humo_metrics.csv: missing columns \['fid'\]"):
        plots.main([*args, "--out-dir", str(out)])
    assert not out.exists()
    metrics().to_csv(tmp_path / "humo_metrics.csv", index=False)
    for params, key in (
        ('{"cfg": "none"}', "humo.plots.cfg"),
        ('{"variant": "real"}', "humo.plots.variant"),
        ('{"clips": 0}', "humo.plots.clips"),
    ):
        with pytest.raises(ReproInputError, match=key):
            plots.main([*args, "--out-dir", str(out), "--params", params])
    assert not out.exists()
