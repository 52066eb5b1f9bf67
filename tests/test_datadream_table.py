"""repro.datadream.table: the headline tables, N chosen on validation, bad input."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from repro.core.errors import ReproInputError
from repro.datadream import table as dd_table
from repro.datadream.table import ACCURACY_COLUMNS, FID_COLUMNS, RUN_COLUMNS, mark_selected


@pytest.fixture(autouse=True)
def no_mlflow(monkeypatch):
    monkeypatch.setenv("REPRO_MLFLOW", "0")


def run_row(method, generator, shots, n, seed, val, test, **extra):
    row = dict(
        method=method,
        generator=generator,
        shots=shots,
        n_synthetic_per_class=n,
        seed=seed,
        val_acc=val,
        test_acc=test,
        selected_epoch=3,
        epochs=5,
        train_images=10 * (shots + n),
        trainable_params=0 if method == "zero_shot" else 4096,
    )
    row.update(extra)
    return row


def test_columns_are_the_contract():
    assert RUN_COLUMNS == [
        "method",
        "generator",
        "shots",
        "n_synthetic_per_class",
        "seed",
        "val_acc",
        "test_acc",
        "selected_epoch",
        "epochs",
        "train_images",
        "trainable_params",
    ]
    assert ACCURACY_COLUMNS == RUN_COLUMNS + ["selected"]
    assert FID_COLUMNS == ["generator", "shots", "seed", "fid", "num_images", "n_per_class"]


def test_selected_is_the_best_val_n_ties_to_the_smaller_n():
    rows = [
        # seed 0: N=50 has the best val (0.8); N=100 the best TEST (0.99): val decides.
        run_row("synthetic", "dset", 16, 10, 0, 0.70, 0.70),
        run_row("synthetic", "dset", 16, 50, 0, 0.80, 0.75),
        run_row("synthetic", "dset", 16, 100, 0, 0.75, 0.99),
        # seed 1: a tie on val between N=50 and N=100 (listed first): the smaller N wins.
        run_row("synthetic", "dset", 16, 100, 1, 0.90, 0.91),
        run_row("synthetic", "dset", 16, 10, 1, 0.60, 0.60),
        run_row("synthetic", "dset", 16, 50, 1, 0.90, 0.85),
        # another generator, same seed: its own group.
        run_row("synthetic", "cls", 16, 10, 0, 0.95, 0.5),
        run_row("synthetic", "cls", 16, 50, 0, 0.50, 0.5),
        run_row("real", "none", 16, 0, 0, 0.5, 0.5),
    ]
    table = mark_selected(pd.DataFrame(rows))
    chosen = table[table.selected]
    picks = {(r.generator, r.seed): r.n_synthetic_per_class for r in chosen.itertuples()}
    assert picks == {("dset", 0): 50, ("dset", 1): 50, ("cls", 0): 10, ("none", 0): 0}
    assert len(chosen) == 4  # exactly one per group


def write_runs(path, rows):
    pd.DataFrame(rows)[RUN_COLUMNS].to_csv(path, index=False)
    return str(path)


def write_fid(path, generator, shots, seed, fid):
    record = dict(generator=generator, shots=shots, seed=seed, fid=fid, num_images=1000)
    record["n_per_class"] = 100
    path.write_text(json.dumps(record))
    return str(path)


def test_cli_writes_both_tables(tmp_path):
    a = write_runs(
        tmp_path / "a.csv",
        [
            run_row("synthetic", "dset", 16, 10, 0, 0.7, 0.71),
            run_row("synthetic", "dset", 16, 50, 0, 0.8, 0.79),
        ],
    )
    b = write_runs(tmp_path / "b.csv", [run_row("zero_shot", "none", 0, 0, 0, 0.4, 0.41)])
    fids = [
        write_fid(tmp_path / "u.json", "unadapted", 0, 0, 30.0),
        write_fid(tmp_path / "d.json", "dset", 16, 0, 12.5),
    ]
    out = tmp_path / "out"
    dd_table.main(
        ["--runs", a, b, "--fid", *fids]
        + ["--accuracy-out", str(out / "acc.csv"), "--fid-out", str(out / "fid.csv")]
        + ["--metrics", str(out / "m.json")]
    )
    acc = pd.read_csv(out / "acc.csv")
    assert list(acc.columns) == ACCURACY_COLUMNS
    # zero-shot first (methods in their order), "none" survives the CSV round trip
    assert acc.method.tolist() == ["zero_shot", "synthetic", "synthetic"]
    assert acc.generator.tolist() == ["none", "dset", "dset"]
    assert acc.selected.tolist() == [True, False, True]
    fid = pd.read_csv(out / "fid.csv")
    assert list(fid.columns) == FID_COLUMNS
    assert fid.generator.tolist() == ["unadapted", "dset"] and fid.fid.tolist() == [30.0, 12.5]
    metrics = json.loads((out / "m.json").read_text())
    assert metrics["accuracy/synthetic/dset/16shot"] == pytest.approx(0.79)
    assert metrics["fid/dset/16shot"] == 12.5


@pytest.mark.parametrize(
    "rows, message",
    [
        ([run_row("magic", "none", 16, 0, 0, 0.5, 0.5)], "unknown method 'magic'"),
        ([run_row("real", "dset", 16, 0, 0, 0.5, 0.5)], "generator 'dset'"),
        (
            [
                run_row("real", "none", 16, 0, 0, 0.5, 0.5),
                run_row("real", "none", 16, 0, 0, 0.6, 0.6),
            ],
            "appears 2 times",
        ),
    ],
)
def test_bad_runs_name_the_file_and_write_nothing(tmp_path, rows, message):
    bad = write_runs(tmp_path / "bad.csv", rows)
    out = tmp_path / "out"
    args = ["--runs", bad, "--accuracy-out", str(out / "a.csv"), "--fid-out", str(out / "f.csv")]
    with pytest.raises(ReproInputError, match=rf"bad.csv.*{message}"):
        dd_table.main(args)
    assert not out.exists()


def test_bad_fid_json_names_the_file_and_nothing_is_written(tmp_path):
    runs = write_runs(tmp_path / "r.csv", [run_row("real", "none", 16, 0, 0, 0.5, 0.5)])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"generator": "dset", "shots": 16, "seed": 0}))
    out = tmp_path / "out"
    args = ["--runs", runs, "--fid", str(bad)]
    args += ["--accuracy-out", str(out / "a.csv"), "--fid-out", str(out / "f.csv")]
    with pytest.raises(ReproInputError, match=r"bad.json.*missing keys \['fid'"):
        dd_table.main(args)
    assert not out.exists()  # the accuracy table is not written either
    missing_column = tmp_path / "short.csv"
    pd.DataFrame([run_row("real", "none", 16, 0, 0, 0.5, 0.5)]).drop(columns="val_acc").to_csv(
        missing_column, index=False
    )
    with pytest.raises(ReproInputError, match=r"short.csv.*missing columns \['val_acc'\]"):
        dd_table.accuracy_table([missing_column])
