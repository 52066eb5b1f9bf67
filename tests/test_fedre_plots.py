"""FedRE's figures: drawn from small tables, the plotted numbers checked against means
computed by hand, and an empty table says so."""

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from test_fedre_table import accuracy_rows, comm_rows

from repro.fedre import plots
from repro.fedre.table import summary_table


def texts(fig):
    return [t.get_text() for ax in fig.axes for t in ax.texts]


def accuracy():
    return pd.concat(
        [
            # clients at 0.99: the curves read the all-clients rows only
            accuracy_rows("fedre", 0, (0.2, 0.4, 0.6), client_accuracy=0.99),
            accuracy_rows("fedre", 1, (0.4, 0.6, 0.6), client_accuracy=0.99),
            accuracy_rows("local", 0, (0.1, 0.1, 0.1)),
            accuracy_rows("local", 0, (0.3, 0.3, 0.3), partition="pat"),
        ],
        ignore_index=True,
    )


def lines_by_algorithm(ax):
    return {line.get_gid(): line for line in ax.lines}


def test_curves_are_the_mean_over_seeds_in_percent(tmp_path):
    fig = plots.curves_figure(accuracy())
    assert [ax.get_title() for ax in fig.axes] == ["glyphs (dir), 2 seeds", "glyphs (pat), 1 seed"]
    dir_lines = lines_by_algorithm(fig.axes[0])
    assert list(dir_lines) == ["local", "fedre"]
    fedre = dir_lines["fedre"]
    assert list(fedre.get_xdata()) == [1, 2, 3]
    assert np.allclose(fedre.get_ydata(), [30.0, 50.0, 60.0])  # (20+40)/2, (40+60)/2, 60
    assert np.allclose(dir_lines["local"].get_ydata(), [10.0, 10.0, 10.0])
    assert np.allclose(lines_by_algorithm(fig.axes[1])["local"].get_ydata(), [30.0] * 3)
    # FedRE thick and on top of the others
    assert fedre.get_linewidth() > dir_lines["local"].get_linewidth()
    assert fedre.get_zorder() > max(c.get_zorder() for c in fig.axes[0].collections)
    # the shaded band is +- the std over seeds: 14.14 points on rounds 1 and 2, 0 on 3
    band = fig.axes[0].collections[-1].get_paths()[0].vertices
    assert band[:, 1].max() == pytest.approx(50.0 + 10 * np.sqrt(2))
    # one legend for the figure, each algorithm once
    assert len(fig.legends) == 1
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["Local", "FedRE"]
    assert plots.CURVES_TITLE in fig._suptitle.get_text()
    out = tmp_path / "figures" / "curves.png"
    plots.save_figure(fig, out)
    data = out.read_bytes()
    assert data[:4] == b"\x89PNG" and 10_000 < len(data) < 2_000_000


def communication():
    return pd.concat(
        [
            comm_rows("fedre", 0, 2, upload=(500, 700)),  # seed means 600 and 800: 700
            comm_rows("fedre", 1, 2, upload=(800,)),
            comm_rows("fedproto", 0, 2, upload=(60000,)),
            comm_rows("fedproto", 1, 2, upload=(40000, 80000)),
            comm_rows("local", 0, 2, upload=(0,), broadcast=0),
            comm_rows("local", 1, 2, upload=(0,), broadcast=0),
        ],
        ignore_index=True,
    )


def test_upload_bars_are_the_mean_over_rounds_and_seeds_and_local_reads_none(tmp_path):
    table = communication()
    summary = summary_table(accuracy(), last_rounds=1)
    fig = plots.communication_figure(table, summary)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    widths = [round(p.get_width(), 6) for p in ax.patches]
    assert widths == [60000.0, 700.0]  # FedProto, FedRE; Local has no bar
    assert "none" in texts(fig)
    assert "700 scalars, 2.8kB" in texts(fig) and "60k scalars, 240kB" in texts(fig)
    diamonds = [line.get_xdata()[0] for line in ax.lines]
    assert diamonds == [240000.0, 2800.0]  # bytes: 4 per scalar here
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == ["Local\n10.0% accuracy", "FedProto", "FedRE\n60.0% accuracy"]
    out = tmp_path / "comm.png"
    plots.save_figure(fig, out)
    assert out.read_bytes()[:4] == b"\x89PNG" and out.stat().st_size > 10_000


def test_only_local_uploads_still_draws():
    table = pd.concat([comm_rows("local", 0, upload=(0,), broadcast=0)], ignore_index=True)
    fig = plots.communication_figure(table)
    assert texts(fig) == ["none"] and not fig.axes[0].patches
    plt.close(fig)


def test_figures_survive_empty_tables():
    empty_acc = accuracy_rows().iloc[0:0]
    empty_comm = comm_rows().iloc[0:0]
    for fig in (plots.curves_figure(empty_acc), plots.communication_figure(empty_comm)):
        assert texts(fig) == ["no rows in the table"]
        plt.close(fig)


def test_the_stage_writes_both_figures(tmp_path):
    acc, comm, summary = tmp_path / "acc.csv", tmp_path / "comm.csv", tmp_path / "summary.csv"
    accuracy().to_csv(acc, index=False)
    communication().to_csv(comm, index=False)
    summary_table(accuracy(), 2).to_csv(summary, index=False)
    curves_out, comm_out = tmp_path / "f" / "curves.png", tmp_path / "f" / "comm.png"
    plots.main(
        ["--accuracy", str(acc), "--communication", str(comm), "--summary", str(summary)]
        + ["--curves-out", str(curves_out), "--communication-out", str(comm_out)]
    )
    assert curves_out.read_bytes()[:4] == b"\x89PNG" and comm_out.read_bytes()[:4] == b"\x89PNG"
    # header-only tables (an empty run) still give figures
    for path, frame in ((acc, accuracy_rows()), (comm, comm_rows()), (summary, None)):
        (frame.iloc[0:0] if frame is not None else summary_table(accuracy(), 2).iloc[0:0]).to_csv(
            path, index=False
        )
    plots.main(
        ["--accuracy", str(acc), "--communication", str(comm), "--summary", str(summary)]
        + ["--curves-out", str(curves_out), "--communication-out", str(comm_out)]
    )
    assert curves_out.stat().st_size > 1000
