"""ProbeX's figures: drawn from small tables, and an empty table says so."""

import matplotlib.pyplot as plt
import pandas as pd
from test_probex_table import accuracy_rows, layer_rows, zeroshot_rows

from repro.probex import plots


def texts(fig):
    return [t.get_text() for ax in fig.axes for t in ax.texts]


def test_figures_draw_every_method_and_layer(tmp_path):
    acc = pd.concat([accuracy_rows(0), accuracy_rows(1, acc=0.9)], ignore_index=True)
    layers = pd.concat([layer_rows(0), layer_rows(1, ("a",))], ignore_index=True)
    fig = plots.accuracy_figure(acc)
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert {plots.METHOD_NAME[m] for m in ("probex", "dense", "probex_experts")} <= set(labels)
    # bars start at chance: the probex bar's height is its mean minus 50 points
    heights = sorted(round(p.get_height(), 6) for p in fig.axes[0].patches)
    assert heights == [35.0] * 3
    plt.close(fig)
    fig = plots.layers_figure(layers)
    assert "chosen on val (1 of 2 seeds)" in fig.axes[0].get_legend_handles_labels()[1]
    plt.close(fig)
    fig = plots.zeroshot_figure(pd.concat([zeroshot_rows(0), zeroshot_rows(1, acc=0.9)]))
    # two groups x two methods; each zero-shot bar is the mean of 70 % and 90 %
    heights = sorted(round(p.get_height(), 6) for p in fig.axes[0].patches)
    assert heights == [80.0, 80.0, 85.0, 85.0]
    plt.close(fig)
    out = tmp_path / "p.png"
    plots.save_figure(plots.parameters_figure(acc), out)
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_figures_survive_an_empty_table():
    empty_acc = accuracy_rows(0).iloc[0:0]
    empty_layers = layer_rows(0).iloc[0:0]
    for fig in (
        plots.accuracy_figure(empty_acc),
        plots.layers_figure(empty_layers),
        plots.parameters_figure(empty_acc),
        plots.zeroshot_figure(zeroshot_rows(0).iloc[0:0]),
    ):
        assert texts(fig) == ["no rows in the table"]
        plt.close(fig)
