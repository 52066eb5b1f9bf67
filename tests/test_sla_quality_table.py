"""SLA's quality table from plain row dicts: the column contract, the checks (each error
names the row and the key), the order of the rows, and a round trip through the CSV."""

import math

import pandas as pd
import pytest

from repro.core.errors import ReproInputError
from repro.sla import table as sla_table
from repro.sla.table import ATTENTION_KINDS, COLUMNS, KEYS, METRICS

# The settings of each attention kind, as the evaluation stage would write them.
KINDS = {
    "full": {"attention": "full", "k_h": 1.0, "k_l": 0.0, "phi": "none", "sparsity": 0.0},
    "sla": {"attention": "paper", "k_h": 0.05, "k_l": 0.1, "phi": "softmax", "sparsity": 0.95},
    "sla_main": {"attention": "main", "k_h": 0.05, "k_l": 0.1, "phi": "elu", "sparsity": 0.95},
    "sparse_85": {
        "attention": "sparse_only",
        "k_h": 0.15,
        "k_l": 0.0,
        "phi": "softmax",
        "sparsity": 0.85,
    },
    "linear_only": {
        "attention": "linear_only",
        "k_h": 0.0,
        "k_l": 0.0,
        "phi": "relu",
        "sparsity": 1.0,
    },
}


def model_row(variant="sla", seed=0, **values):
    """A valid row of a fine-tuned variant (settings from KINDS); `values` override any key."""
    row = {
        "variant": variant,
        **KINDS.get(variant, KINDS["sla"]),
        "seed": seed,
        "steps": 200,
        "final_train_loss": 0.11,
        "val_loss": 0.12,
        "test_loss": 0.125,
        "frame_fid": 30.5,
        "background_acc": 0.75,
        "block_sparsity": 0.95,
        "attention_flops": 2.0e9,
        "dense_attention_flops": 3.2e10,
        "flops_reduction": 16.0,
        "attention_ms": 1.5,
    }
    row.update(values)
    return row


def real_row(seed=0, **values):
    """The real clips' row: only frame_fid and background_acc (the rest missing)."""
    row = {
        "variant": "real",
        "attention": "real",
        "k_h": None,
        "k_l": math.nan,
        "phi": "none",
        "sparsity": None,
        "seed": seed,
        "steps": 0,
        "frame_fid": 4.0,
        "background_acc": 0.96875,
    }
    row.update(values)
    return row


def test_columns_are_the_contract_in_order():
    assert COLUMNS == [
        "variant",
        "attention",
        "k_h",
        "k_l",
        "phi",
        "sparsity",
        "seed",
        "steps",
        "final_train_loss",
        "val_loss",
        "test_loss",
        "frame_fid",
        "background_acc",
        "block_sparsity",
        "attention_flops",
        "dense_attention_flops",
        "flops_reduction",
        "attention_ms",
    ]
    assert KEYS == ["variant", "seed"]
    assert ATTENTION_KINDS == ("full", "paper", "main", "sparse_only", "linear_only", "real")


def test_every_kind_passes_and_the_values_are_kept():
    rows = [model_row(v) for v in KINDS] + [real_row()]
    table = sla_table.build_table(rows)
    assert list(table.columns) == COLUMNS and len(table) == len(rows)
    sla = table[table.variant == "sla"].iloc[0].to_dict()
    assert sla == model_row("sla")
    assert table.seed.dtype == "int64" and table.steps.dtype == "int64"
    assert all(table[c].dtype == "float64" for c in ("k_h", "sparsity", *METRICS))
    real = table[table.variant == "real"].iloc[0]
    assert (real.frame_fid, real.background_acc, real.steps, real.phi) == (4.0, 0.96875, 0, "none")
    unmeasured = ["k_h", "k_l", "sparsity", *METRICS[:3], *METRICS[5:]]
    assert "frame_fid" not in unmeasured and "background_acc" not in unmeasured
    assert all(math.isnan(real[c]) for c in unmeasured)


def test_missing_or_null_metrics_become_nan():
    row = model_row(attention_ms=None)
    del row["frame_fid"], row["dense_attention_flops"]
    found = sla_table.build_table([row]).iloc[0]
    assert math.isnan(found.attention_ms) and math.isnan(found.frame_fid)
    assert math.isnan(found.dense_attention_flops) and found.test_loss == 0.125


def test_default_order_is_full_first_real_last_then_the_rest_by_name_then_seed():
    rows = [
        real_row(0),
        model_row("sparse_85", 1),
        model_row("sla", 2),
        model_row("full", 1),
        model_row("linear_only", 0),
        model_row("sla", 0),
        model_row("full", 0),
    ]
    expected = [
        ("full", 0),
        ("full", 1),
        ("linear_only", 0),
        ("sla", 0),
        ("sla", 2),
        ("sparse_85", 1),
        ("real", 0),
    ]
    for given in (rows, rows[::-1]):
        table = sla_table.build_table(given)
        assert list(table[KEYS].itertuples(index=False, name=None)) == expected


def test_an_order_puts_its_variants_first_in_first_appearance_order():
    rows = [real_row(), model_row("sla", 1), model_row("full"), model_row("sla"), model_row("x")]
    table = sla_table.build_table(rows, order=["sla", "real", "sla", "absent", "full"])
    assert list(table[KEYS].itertuples(index=False, name=None)) == [
        ("sla", 0),
        ("sla", 1),
        ("real", 0),
        ("full", 0),
        ("x", 0),  # not named in the order: after those that are
    ]
    assert sla_table.variant_order(["b", "real", "a", "full", "b"]) == ["full", "a", "b", "real"]
    with pytest.raises(ReproInputError, match="order must be a list of variant names"):
        sla_table.build_table(rows, order="sla")


def test_no_rows_give_an_empty_table_with_the_columns():
    table = sla_table.build_table([])
    assert table.empty and list(table.columns) == COLUMNS


@pytest.mark.parametrize("key", sla_table.SETTINGS)
def test_a_row_missing_a_setting_is_refused_naming_the_row_and_key(key):
    row = model_row("sla_kl0", seed=3)
    del row[key]
    with pytest.raises(ReproInputError, match=rf"missing columns \['{key}'\]") as err:
        sla_table.build_table([model_row("full"), row])
    message = str(err.value)
    assert "seed=3" in message if key != "seed" else "seed='?'" in message
    assert "variant='sla_kl0'" in message if key != "variant" else "variant='?'" in message


@pytest.mark.parametrize(
    "values, message",
    [
        ({"variant": ""}, "variant is '', not a non-empty string"),
        ({"variant": 3}, "variant is 3, not a non-empty string"),
        ({"attention": "sparse"}, "unknown attention 'sparse'"),
        ({"phi": "gelu"}, "unknown phi 'gelu'"),
        ({"phi": "none"}, "phi is 'none', but 'paper' attention has a linear branch"),
        ({"seed": 1.5}, "seed is 1.5, not a whole number >= 0"),
        ({"seed": -1}, "seed is -1, not a whole number >= 0"),
        ({"seed": True}, "seed is True"),
        ({"steps": "200"}, "steps is '200'"),
        ({"test_loss": "0.1"}, "test_loss is '0.1', not a finite number or null"),
        ({"test_loss": math.inf}, "test_loss is inf"),
        ({"k_h": math.nan}, "k_h is NaN; only the real clips' row has none"),
        ({"sparsity": 0.9}, r"sparsity is 0.9, but 'paper' attention names 1 - k_h = 0.95"),
        ({"variant": "real"}, "variant 'real' with attention 'paper'"),
        ({"attention": "real", "phi": "none"}, "variant 'sla' with attention 'real'"),
    ],
)
def test_bad_settings_are_refused_naming_the_key(values, message):
    with pytest.raises(ReproInputError, match="row variant=") as err:
        sla_table.build_table([model_row(**values)])
    assert message in str(err.value)


@pytest.mark.parametrize(
    "variant, values, message",
    [
        ("full", {"phi": "softmax"}, "phi is 'softmax', must be 'none' for 'full'"),
        ("full", {"sparsity": 0.05}, "but 'full' attention names 0"),
        ("linear_only", {"sparsity": 0.95}, "but 'linear_only' attention names 1"),
        ("linear_only", {"phi": "none"}, "'linear_only' attention has a linear branch"),
        ("sparse_85", {"sparsity": 0.95}, "names 1 - k_h = 0.85"),
    ],
)
def test_each_kinds_phi_and_nominal_sparsity(variant, values, message):
    with pytest.raises(ReproInputError, match=message):
        sla_table.build_table([model_row(variant, **values)])
    # the sparse-only branch needs no feature map: "none" is fine there
    sla_table.build_table([model_row("sparse_85", phi="none")])


FRACTIONS = ["k_h", "k_l", "block_sparsity", "background_acc"]
NON_NEGATIVE = [
    "final_train_loss",
    "val_loss",
    "test_loss",
    "frame_fid",
    "attention_flops",
    "dense_attention_flops",
    "attention_ms",
]


@pytest.mark.parametrize(
    "key, bad",
    [(k, v) for k in FRACTIONS for v in (-0.01, 1.01)]
    + [(k, -0.01) for k in NON_NEGATIVE]
    + [("flops_reduction", 0.0), ("flops_reduction", -2.0)],
)
def test_values_outside_their_range_are_refused(key, bad):
    values = {key: bad}
    if key == "k_h":  # keep the nominal sparsity consistent: the range is what fails
        values["sparsity"] = min(max(1 - bad, 0.0), 1.0)
    with pytest.raises(ReproInputError, match=rf"{key} is {bad!r}, outside its range"):
        sla_table.build_table([model_row("sla", **values)])


@pytest.mark.parametrize(
    "key, edge",
    [(k, v) for k in FRACTIONS for v in (0.0, 1.0)]
    + [(k, 0.0) for k in NON_NEGATIVE]
    + [("flops_reduction", 1e-3), ("background_acc", 1 + 1e-9)],
)
def test_values_on_their_bounds_pass(key, edge):
    values = {key: edge}
    if key == "k_h":
        values["sparsity"] = 1.0 - edge
    assert sla_table.build_table([model_row("sla", **values)])[key].iloc[0] == edge


def test_attention_flops_may_exceed_the_dense_count():
    # linear attention over short sequences can cost more than dense: not checked
    row = model_row("linear_only", attention_flops=4e10, dense_attention_flops=3.2e10)
    assert sla_table.build_table([row]).attention_flops.iloc[0] == 4e10


@pytest.mark.parametrize(
    "values, message",
    [
        ({"test_loss": 0.1}, "the real clips' row has ['test_loss']"),
        ({"k_h": 0.5, "attention_ms": 2.0}, "has ['k_h', 'attention_ms']"),
        ({"steps": 10}, "steps is 10, must be 0 for the real clips"),
        ({"phi": "softmax"}, "must be 'none' for 'real'"),
        ({"attention": "full"}, "variant 'real' with attention 'full'"),
    ],
)
def test_the_real_row_carries_only_what_real_clips_have(values, message):
    with pytest.raises(ReproInputError) as err:
        sla_table.build_table([real_row(**values)])
    assert message in str(err.value) and "variant='real'" in str(err.value)


def test_a_duplicate_variant_and_seed_is_refused():
    rows = [model_row("sla", 1), model_row("full", 1), model_row("sla", 1, test_loss=0.2)]
    with pytest.raises(ReproInputError, match="row variant='sla' seed=1: appears more than once"):
        sla_table.build_table(rows)
    # another seed is another row; 2.0 is the whole number 2
    assert list(sla_table.build_table([model_row("sla", 1), model_row("sla", 2.0)]).seed) == [1, 2]


def test_a_row_that_is_no_dict_is_refused():
    with pytest.raises(ReproInputError, match="must be a dict, got list"):
        sla_table.build_table([list(model_row().items())])


def test_write_and_read_round_trip(tmp_path):
    rows = [model_row("sla"), model_row("full", attention_ms=None), real_row()]
    path = tmp_path / "results" / "sla_quality.csv"
    written = sla_table.write(rows, path, order=["sla"])
    assert list(written.variant) == ["sla", "full", "real"]
    back = sla_table.read(path)
    pd.testing.assert_frame_equal(back, written, check_dtype=False)
    assert list(back.phi) == ["softmax", "none", "none"]  # "none" stays a string
    assert [p.name for p in path.parent.iterdir()] == ["sla_quality.csv"]  # no temporary left


def test_write_writes_nothing_when_a_row_fails(tmp_path):
    path = tmp_path / "sla_quality.csv"
    with pytest.raises(ReproInputError, match="test_loss"):
        sla_table.write([model_row(), model_row("full", test_loss=-1.0)], path)
    assert not path.exists()


def test_read_refuses_a_table_without_the_contract(tmp_path):
    path = tmp_path / "partial.csv"
    sla_table.build_table([model_row()]).drop(columns="flops_reduction").to_csv(path, index=False)
    with pytest.raises(ReproInputError, match=rf"{path}: missing columns \['flops_reduction'\]"):
        sla_table.read(path)
    with pytest.raises(ReproInputError, match="file not found"):
        sla_table.read(tmp_path / "absent.csv")
