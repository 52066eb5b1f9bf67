"""HuMo's metrics table gathered from metric-row JSONs: checks (each error names the file),
the deterministic order, the tidy sync curves with their offsets by hand."""

import json
import math

import pandas as pd
import pytest

from repro.core.errors import ReproInputError
from repro.humo import table as humo_table
from repro.humo.table import COLUMNS, CURVE_COLUMNS


def metric_row(task="TIA", variant="full", cfg="paper", seed=0, **values):
    """A valid metric row as repro.humo.evaluate writes it; `values` override any key."""
    row = {
        "task": task,
        "variant": variant,
        "cfg": cfg,
        "seed": seed,
        "n_clips": 16,
        "id_sim": 0.8,
        "sync_c": 0.6,
        "sync_offset": 0.25,
        "sync_c_shuffled": 0.1,
        "motion_acc": 0.75,
        "background_acc": 1.0,
        "text_align": 0.875,
        "fid": 12.5,
    }
    row.update(values)
    return row


def real_row(seed=0, **values):
    return metric_row("real", "real", "none", seed, **values)


def write_rows(tmp_path, *rows):
    """Each row to its own JSON file (named by position), as the evaluate stage writes."""
    paths = []
    for i, row in enumerate(rows):
        path = tmp_path / f"row{i}.json"
        path.write_text(json.dumps(row))
        paths.append(path)
    return paths


def test_columns_are_the_contract_in_order():
    assert COLUMNS == [
        "task",
        "variant",
        "cfg",
        "seed",
        "n_clips",
        "id_sim",
        "sync_c",
        "sync_offset",
        "sync_c_shuffled",
        "motion_acc",
        "background_acc",
        "text_align",
        "fid",
    ]
    assert CURVE_COLUMNS == ["task", "variant", "cfg", "seed", "audio", "offset", "corr"]


def test_rows_are_sorted_by_task_variant_cfg_order_then_seed_whatever_the_file_order(tmp_path):
    rows = [
        real_row(0),
        metric_row("TIA", "no_focus", "paper", 1),
        metric_row("TIA", "full", "fixed", 0),
        metric_row("TIA", "full", "paper", 2),
        metric_row("TIA", "full", "paper", 0),
        metric_row("TA", "full", "paper", 0),
        metric_row("TI", "full_finetune", "code_1_7b", 10),
    ]
    expected = [
        ("TI", "full_finetune", "code_1_7b", 10),
        ("TA", "full", "paper", 0),
        ("TIA", "full", "paper", 0),
        ("TIA", "full", "paper", 2),
        ("TIA", "full", "fixed", 0),
        ("TIA", "no_focus", "paper", 1),
        ("real", "real", "none", 0),
    ]
    for order in (rows, rows[::-1]):
        table, curves = humo_table.gather(write_rows(tmp_path, *order))
        assert list(table.columns) == COLUMNS
        assert list(
            table[["task", "variant", "cfg", "seed"]].itertuples(index=False, name=None)
        ) == (expected)
        assert curves.empty and list(curves.columns) == CURVE_COLUMNS
    assert table.seed.dtype == "int64" and table.n_clips.dtype == "int64"
    assert table.iloc[0].to_dict() == {**metric_row("TI", "full_finetune", "code_1_7b", 10)}


def test_a_duplicate_key_is_refused_naming_both_files(tmp_path):
    paths = write_rows(tmp_path, metric_row(seed=1), real_row(), metric_row(seed=1, id_sim=0.1))
    with pytest.raises(ReproInputError) as err:
        humo_table.gather(paths)
    message = str(err.value)
    assert str(paths[2]) in message and str(paths[0]) in message
    assert "'seed': 1" in message
    # the same key with another seed is fine
    humo_table.gather(write_rows(tmp_path, metric_row(seed=1), metric_row(seed=2)))


@pytest.mark.parametrize("column", COLUMNS)
def test_a_row_missing_a_column_is_refused_naming_the_file_and_column(tmp_path, column):
    row = metric_row()
    del row[column]
    (path,) = write_rows(tmp_path, row)
    with pytest.raises(ReproInputError, match=rf"{path}: missing columns \['{column}'\]"):
        humo_table.gather([path])


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("task", "T2V", "unknown task 'T2V'"),
        ("variant", "no_audio", "unknown variant 'no_audio'"),
        ("cfg", "cfg", "unknown cfg 'cfg'"),
        ("cfg", "none", "together"),  # a generated set with cfg none
        ("seed", -1, "seed is -1, not a whole number >= 0"),
        ("seed", 1.5, "seed is 1.5"),
        ("seed", "1", "seed is '1'"),
        ("seed", True, "seed is True"),
        ("n_clips", 0, "n_clips is 0, not a whole number >= 1"),
        ("id_sim", "0.5", "id_sim is '0.5', not a finite number"),
        ("fid", False, "fid is False"),
    ],
)
def test_bad_keys_are_refused_naming_the_file(tmp_path, key, value, message):
    (path,) = write_rows(tmp_path, metric_row(**{key: value}))
    with pytest.raises(ReproInputError, match=str(path)) as err:
        humo_table.gather([path])
    assert message in str(err.value)


def test_real_rows_go_with_variant_real_and_cfg_none_only(tmp_path):
    for bad in (
        metric_row("real", "full", "none"),
        metric_row("real", "real", "paper"),
        metric_row("TIA", "real", "none"),
    ):
        (path,) = write_rows(tmp_path, bad)
        with pytest.raises(ReproInputError, match="together"):
            humo_table.gather([path])


@pytest.mark.parametrize(
    "key, inside, outside",
    [
        ("id_sim", -1.0, -1.001),
        ("id_sim", 1.0, 1.001),
        ("sync_c", 1.0 + 1e-9, 1.01),  # round-off past a bound is tolerated, more is not
        ("sync_c_shuffled", -1.0 - 1e-9, -1.01),
        ("fid", -1e-9, -1e-3),
        ("sync_c_shuffled", -1.0, -1.5),
        ("motion_acc", 0.0, -0.01),
        ("background_acc", 1.0, 1.01),
        ("text_align", 1.0, 100.0),  # a percentage, not a fraction
        ("sync_offset", 0.0, -0.5),
        ("fid", 0.0, -1.0),
    ],
)
def test_metric_ranges_just_inside_and_just_outside(tmp_path, key, inside, outside):
    (path,) = write_rows(tmp_path, metric_row(**{key: inside}))
    table, _ = humo_table.gather([path])
    assert table[key].iloc[0] == pytest.approx(inside)
    (path,) = write_rows(tmp_path, metric_row(**{key: outside}))
    with pytest.raises(ReproInputError, match=rf"{key} is .* outside its range"):
        humo_table.gather([path])


def test_null_metrics_become_nan_and_infinities_are_refused(tmp_path):
    (path,) = write_rows(tmp_path, metric_row(fid=None, sync_offset=None))
    table, _ = humo_table.gather([path])
    assert math.isnan(table.fid.iloc[0]) and math.isnan(table.sync_offset.iloc[0])
    path.write_text(json.dumps(metric_row()).replace("12.5", "Infinity"))
    with pytest.raises(ReproInputError, match="fid is inf"):
        humo_table.gather([path])


def test_foreign_and_missing_files_are_refused(tmp_path):
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(ReproInputError, match=f"{listed}: expected a JSON object"):
        humo_table.gather([listed])
    broken = tmp_path / "broken.json"
    broken.write_text('{"task": ')
    with pytest.raises(ReproInputError, match=f"{broken}: not valid JSON"):
        humo_table.gather([broken])
    with pytest.raises(ReproInputError, match="file not found"):
        humo_table.gather([tmp_path / "absent.json"])


def test_curves_are_tidy_with_offsets_from_minus_to_plus_max_offset(tmp_path):
    rows = [
        metric_row(
            seed=3,
            max_offset=2,
            sync_curve=[0.1, 0.2, 0.9, 0.3, 0.0],
            sync_curve_shuffled=[0.0, -0.1, 0.05, 0.0, 0.1],
        ),
        real_row(max_offset=1, sync_curve=[0.2, 0.95, 0.1]),  # no shuffled curve: fine
        metric_row(seed=0),  # no curve at all: adds nothing
    ]
    table, curves = humo_table.gather(write_rows(tmp_path, *rows))
    assert len(table) == 3
    assert list(curves.columns) == CURVE_COLUMNS
    tia = curves[curves.task == "TIA"]
    assert set(tia.seed) == {3}
    matched = tia[tia.audio == "matched"]
    assert list(matched.offset) == [-2, -1, 0, 1, 2]
    assert list(matched["corr"]) == pytest.approx([0.1, 0.2, 0.9, 0.3, 0.0])
    shuffled = tia[tia.audio == "shuffled"]
    assert list(shuffled["corr"]) == pytest.approx([0.0, -0.1, 0.05, 0.0, 0.1])
    real = curves[curves.task == "real"]
    assert list(zip(real.audio, real.offset, real["corr"], strict=True)) == [
        ("matched", -1, 0.2),
        ("matched", 0, 0.95),
        ("matched", 1, 0.1),
    ]
    # TIA before real; matched before shuffled within a row
    assert list(curves.task) == ["TIA"] * 10 + ["real"] * 3
    assert list(tia.audio) == ["matched"] * 5 + ["shuffled"] * 5


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"sync_curve": [0.1, 0.2, 0.3]}, "no max_offset"),
        ({"max_offset": 1, "sync_curve": [0.1, 0.2]}, "3 correlations, got 2"),
        ({"max_offset": 1, "sync_curve_shuffled": [0.1, 0.2, 0.3, 0.4]}, "got 4"),
        ({"max_offset": 1, "sync_curve": "0.1"}, "got str"),
        ({"max_offset": -1, "sync_curve": []}, "max_offset is -1"),
        ({"max_offset": 0, "sync_curve": [1.5]}, "sync_c is 1.5, outside its range"),
    ],
)
def test_bad_curves_are_refused_naming_the_file(tmp_path, extra, message):
    (path,) = write_rows(tmp_path, metric_row(**extra))
    with pytest.raises(ReproInputError, match=str(path)) as err:
        humo_table.gather([path])
    assert message in str(err.value)


def test_the_stage_writes_the_table_and_the_curves(tmp_path):
    rows = [metric_row(seed=1, max_offset=1, sync_curve=[0.0, 0.5, 0.1]), real_row()]
    paths = write_rows(tmp_path, *rows)
    out, curves = tmp_path / "out" / "humo_metrics.csv", tmp_path / "out" / "curves.csv"
    humo_table.main(["--rows", *map(str, paths), "--out", str(out), "--curves", str(curves)])
    table = pd.read_csv(out)
    assert list(table.columns) == COLUMNS and list(table.task) == ["TIA", "real"]
    assert table.id_sim.tolist() == pytest.approx([0.8, 0.8])
    tidy = pd.read_csv(curves)
    assert list(tidy.columns) == CURVE_COLUMNS and tidy["corr"].tolist() == [0.0, 0.5, 0.1]


def test_the_stage_writes_nothing_when_a_row_is_bad(tmp_path):
    paths = write_rows(tmp_path, metric_row(), metric_row(task="bad"))
    out = tmp_path / "humo_metrics.csv"
    with pytest.raises(ReproInputError, match=str(paths[1])):
        humo_table.main(["--rows", *map(str, paths), "--out", str(out)])
    assert not out.exists()
