"""HuMo's claims from hand-made metrics tables: per-seed differences computed by hand,
spreads just inside and just outside zero, missing rows, too few seeds, bad inputs."""

import math

import pandas as pd
import pytest

from repro.core.errors import ReproInputError
from repro.core.results import CLAIM_COLUMNS
from repro.humo import claims
from repro.humo.table import COLUMNS

BASE = {
    "n_clips": 16,
    "id_sim": 0.5,
    "sync_c": 0.5,
    "sync_offset": 0.0,
    "sync_c_shuffled": 0.5,
    "motion_acc": 0.5,
    "background_acc": 0.5,
    "text_align": 0.5,
    "fid": 10.0,
}


def table(entries):
    """entries: {(task, variant, cfg, seed): {metric: value}}; unnamed metrics are BASE's."""
    rows = [
        {"task": t, "variant": v, "cfg": c, "seed": s, **BASE, **values}
        for (t, v, c, s), values in entries.items()
    ]
    return pd.DataFrame(rows, columns=COLUMNS)


# The claims in order: (index, side A, side B, metric); claim 1 compares two columns of
# one row (A's sync_c with its sync_c_shuffled) and claim 6 (index 5) two metrics at once.
FULL = ("TIA", "full", "paper")
DIFFERENCES = [
    (1, FULL, ("TIA", "no_focus", "paper"), "sync_c"),
    (2, FULL, ("TIA", "no_progressive", "paper"), "sync_c"),
    (3, FULL, ("TIA", "full_finetune", "paper"), "id_sim"),
    (4, FULL, ("TIA", "full_finetune", "paper"), "text_align"),
    (6, FULL, ("TA", "full", "paper"), "id_sim"),
    (7, FULL, ("TI", "full", "paper"), "sync_c"),
]


def gap_entries(a, b, metric, gaps):
    """A at 0.5 + gap and B at 0.5 on `metric`, seed by seed."""
    entries = {}
    for seed, gap in enumerate(gaps):
        entries[(*a, seed)] = {metric: 0.5 + gap}
        entries[(*b, seed)] = {metric: 0.5}
    return entries


# (gaps, verdict): mean - std (or mean + std) at +-0.001 around the threshold 0.
JUST = [
    ([0.001, 0.101, 0.201], "holds"),  # mean 0.101, std 0.1: low +0.001
    ([-0.001, 0.099, 0.199], "inconclusive"),  # low -0.001
    ([-0.199, -0.099, 0.001], "inconclusive"),  # high +0.001
    ([-0.201, -0.101, -0.001], "does not hold"),  # high -0.001
    ([0.0, 0.0, 0.0], "does not hold"),  # a tie is not a win
    ([0.05, 0.05, 0.05], "holds"),  # no spread at all
]


@pytest.mark.parametrize("gaps, verdict", JUST)
@pytest.mark.parametrize("index, a, b, metric", DIFFERENCES)
def test_each_difference_claim_just_inside_and_just_outside_zero(
    index, a, b, metric, gaps, verdict
):
    found = claims.build_claims(table(gap_entries(a, b, metric, gaps)))[index]
    assert found.verdict == verdict and found.n == 3
    assert found.paper == "HuMo"
    assert found.measured_mean == pytest.approx(sum(gaps) / 3)
    mean = sum(gaps) / 3
    assert found.measured_std == pytest.approx(math.sqrt(sum((g - mean) ** 2 for g in gaps) / 2))
    assert metric in found.metric and f"{'/'.join(a)} - {'/'.join(b)}" in found.metric


@pytest.mark.parametrize("gaps, verdict", JUST)
def test_matched_audio_beats_shuffled_audio_within_each_row(gaps, verdict):
    entries = {(*FULL, s): {"sync_c": 0.3 + g, "sync_c_shuffled": 0.3} for s, g in enumerate(gaps)}
    found = claims.build_claims(table(entries))[0]
    assert (found.verdict, found.n) == (verdict, 3)
    assert found.measured_mean == pytest.approx(sum(gaps) / 3)
    assert "sync_c - sync_c_shuffled" in found.metric


def test_claims_come_in_order_with_the_papers_numbers():
    found = claims.build_claims(table({}))
    assert len(found) == 8
    assert "shuffled" in found[0].claim
    assert "Focus-by-predicting" in found[1].claim and "5.946" in found[1].reference
    assert "Progressive" in found[2].claim and "6.106" in found[2].reference
    assert "6.252" in found[1].reference and "6.252" in found[2].reference
    assert "identity" in found[3].claim and "text alignment" in found[4].claim
    assert "CFG" in found[5].claim
    assert "TIA vs TA" in found[6].claim and "TIA vs TI" in found[7].claim
    assert {c.verdict for c in found} == {"inconclusive"}


def test_a_claim_whose_rows_are_absent_says_which():
    # full and no_focus only: claim 2 is decided, every other lacks a row
    entries = gap_entries(FULL, ("TIA", "no_focus", "paper"), "sync_c", [0.1, 0.2, 0.3])
    found = claims.build_claims(table(entries))
    assert found[1].verdict == "holds"
    assert found[0].verdict == "holds"  # its own row is all it needs: sync_c 0.7 vs 0.5
    for index, missing in (
        (2, "TIA/no_progressive/paper"),
        (3, "TIA/full_finetune/paper"),
        (4, "TIA/full_finetune/paper"),
        (5, "TIA/full/fixed"),
        (6, "TA/full/paper"),
        (7, "TI/full/paper"),
    ):
        assert found[index].verdict == "inconclusive" and found[index].n == 0
        assert f"no rows of {missing}" in found[index].reference
        assert math.isnan(found[index].measured_mean)
    empty = claims.build_claims(table({}))
    assert "no rows of TIA/full/paper and TIA/no_focus/paper" in empty[1].reference


def test_too_few_seeds_decide_nothing():
    entries = gap_entries(FULL, ("TIA", "no_focus", "paper"), "sync_c", [0.3, 0.3])
    found = claims.build_claims(table(entries))[1]
    assert (found.verdict, found.n) == ("inconclusive", 2)
    assert "only 2 seeds (< 3)" in found.reference
    assert claims.build_claims(table(entries), min_seeds=2)[1].verdict == "holds"


def test_differences_pair_seeds_and_drop_unpaired_or_nan_ones():
    b = ("TIA", "no_focus", "paper")
    entries = {
        (*FULL, 0): {"sync_c": 0.9},
        (*FULL, 1): {"sync_c": 0.8},
        (*FULL, 2): {"sync_c": 0.7},
        (*FULL, 3): {"sync_c": math.nan},  # not measured: dropped
        (*FULL, 9): {"sync_c": 0.0},  # no partner: dropped
        (*b, 0): {"sync_c": 0.6},
        (*b, 1): {"sync_c": 0.6},
        (*b, 2): {"sync_c": 0.6},
        (*b, 3): {"sync_c": 0.1},
        (*b, 4): {"sync_c": 0.9},  # no partner: dropped
    }
    found = claims.build_claims(table(entries))[1]
    # gaps 0.3, 0.2, 0.1: mean 0.2, std 0.1
    assert found.n == 3 and found.verdict == "holds"
    assert found.measured_mean == pytest.approx(0.2) and found.measured_std == pytest.approx(0.1)
    assert claims.paired(
        table(entries), claims.Side(*FULL), claims.Side(*b), "sync_c"
    ).index.tolist() == [
        0,
        1,
        2,
        3,
    ]
    disjoint = {(*FULL, s): {} for s in range(3)} | {(*b, s): {} for s in range(3, 6)}
    found = claims.build_claims(table(disjoint))[1]
    assert (found.verdict, found.n) == ("inconclusive", 0)
    assert "no seed has both rows" in found.reference


def cfg_entries(sync_gaps, id_gaps, fixed="fixed"):
    entries = {}
    for seed, (sync, ident) in enumerate(zip(sync_gaps, id_gaps, strict=True)):
        entries[(*FULL, seed)] = {"sync_c": 0.5 + sync, "id_sim": 0.5 + ident}
        entries[("TIA", "full", fixed, seed)] = {}
    return entries


HOLDS, INSIDE, JUST_NOT, NOT = (JUST[0][0], JUST[1][0], JUST[3][0], JUST[4][0])


@pytest.mark.parametrize(
    "sync, ident, verdict",
    [
        (HOLDS, HOLDS, "holds"),
        (HOLDS, INSIDE, "inconclusive"),
        (INSIDE, HOLDS, "inconclusive"),
        (HOLDS, JUST_NOT, "does not hold"),
        (JUST_NOT, HOLDS, "does not hold"),
        (INSIDE, NOT, "does not hold"),
        (INSIDE, INSIDE, "inconclusive"),
    ],
)
def test_time_adaptive_cfg_needs_both_sync_and_identity(sync, ident, verdict):
    found = claims.build_claims(table(cfg_entries(sync, ident)))[5]
    assert (found.verdict, found.n) == (verdict, 3)
    assert found.measured_mean == pytest.approx(sum(sync) / 3)
    assert found.second_mean == pytest.approx(sum(ident) / 3)
    assert found.measured.startswith("sync_c ") and "; id_sim " in found.measured
    assert found.row()["measured"] == found.measured


def test_cfg_forms_come_from_the_params():
    entries = {}
    for seed in range(3):
        entries[("TIA", "full", "code_17b", seed)] = {"sync_c": 0.9, "id_sim": 0.9}
        entries[("TIA", "full", "code_1_7b", seed)] = {}
        entries[("TIA", "no_focus", "code_17b", seed)] = {"sync_c": 0.4 + 0.1 * seed}
        entries[("TA", "full", "code_17b", seed)] = {"id_sim": 0.85 - 0.1 * seed}
        entries[("TI", "full", "code_17b", seed)] = {"sync_c": 0.9}  # a tie
        entries[("TA", "full", "paper", seed)] = {"id_sim": 0.0}  # another form: not read
        entries[("TI", "full", "paper", seed)] = {"sync_c": 0.0}
    found = claims.build_claims(table(entries), cfg="code_17b", fixed_cfg="code_1_7b")
    assert found[5].verdict == "holds" and "code_17b vs code_1_7b" in found[5].reference
    assert found[1].verdict == "holds"  # gaps 0.5, 0.4, 0.3
    assert found[1].measured_mean == pytest.approx(0.4)
    assert found[6].verdict == "holds" and found[6].measured_mean == pytest.approx(0.15)
    assert found[7].verdict == "does not hold" and found[7].measured_mean == pytest.approx(0.0)
    assert "TA/full/code_17b" in found[6].metric and "TI/full/code_17b" in found[7].metric
    # the default forms (paper, fixed) have no rows here
    assert claims.build_claims(table(entries))[1].verdict == "inconclusive"


def test_the_table_is_checked():
    with pytest.raises(ReproInputError, match=r"lacks columns \['fid'\]"):
        claims.build_claims(table({}).drop(columns="fid"))
    twice = pd.concat([table({(*FULL, 0): {}})] * 2, ignore_index=True)
    with pytest.raises(ReproInputError, match="appears more than once"):
        claims.build_claims(twice)


@pytest.mark.parametrize(
    "params, key",
    [
        ({"min_seeds": 0}, "humo.claims.min_seeds"),
        ({"min_seeds": 2.0}, "humo.claims.min_seeds"),
        ({"min_seeds": True}, "humo.claims.min_seeds"),
        ({"cfg": "none"}, "humo.claims.cfg"),
        ({"fixed_cfg": "constant"}, "humo.claims.fixed_cfg"),
        ({"cfg": "fixed"}, "humo.claims.fixed_cfg"),  # compared with itself
    ],
)
def test_bad_params_name_their_key(params, key):
    with pytest.raises(ReproInputError, match=key):
        claims.check_params(params)


def test_params_defaults():
    assert claims.check_params({}) == {"min_seeds": 3, "cfg": "paper", "fixed_cfg": "fixed"}


def test_the_stage_writes_the_claims(tmp_path):
    metrics, out = tmp_path / "humo_metrics.csv", tmp_path / "claims" / "humo.csv"
    entries = gap_entries(FULL, ("TIA", "no_focus", "paper"), "sync_c", [0.1, 0.2, 0.3])
    table(entries).to_csv(metrics, index=False)
    claims.main(["--metrics", str(metrics), "--out", str(out), "--params", '{"min_seeds": 3}'])
    written = pd.read_csv(out)
    assert list(written.columns) == CLAIM_COLUMNS and len(written) == 8
    assert written.verdict[1] == "holds" and (written.paper == "HuMo").all()
    assert written.measured[1] == "0.20 ± 0.10"


def test_the_stage_refuses_bad_files_naming_them(tmp_path):
    out = tmp_path / "humo.csv"
    partial = tmp_path / "partial.csv"
    table({}).drop(columns="sync_c").to_csv(partial, index=False)
    with pytest.raises(ReproInputError, match=rf"{partial}: missing columns \['sync_c'\]"):
        claims.main(["--metrics", str(partial), "--out", str(out)])
    twice = tmp_path / "twice.csv"
    pd.concat([table({(*FULL, 0): {}})] * 2).to_csv(twice, index=False)
    with pytest.raises(ReproInputError, match=f"{twice}: the row"):
        claims.main(["--metrics", str(twice), "--out", str(out)])
    with pytest.raises(ReproInputError, match="file not found"):
        claims.main(["--metrics", str(tmp_path / "absent.csv"), "--out", str(out)])
    assert not out.exists()
