"""Result tables, mean/std, compare() verdicts and the claims CSV."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from repro.core.errors import ReproInputError
from repro.core.results import (
    CLAIM_COLUMNS,
    Claim,
    Spread,
    compare,
    format_mean_std,
    interval_verdict,
    mean_std,
    merge_claims,
    read_table,
    spread_verdict,
    strict_verdict,
    verdict_from,
    write_claims,
    write_table,
)


def test_table_round_trip(tmp_path):
    df = pd.DataFrame(
        {"method": ["a", "b", "c"], "seed": [0, 1, 2], "fid": [12.5, 0.1 + 0.2, 1e-9]}
    )
    path = tmp_path / "sub" / "table.csv"
    write_table(df, path)
    assert path.read_text().splitlines()[0] == "method,seed,fid"  # no index column
    back = read_table(path, required=["method", "fid"])
    pd.testing.assert_frame_equal(back, df, check_dtype=False)
    assert back["fid"].tolist() == df["fid"].tolist()  # floats round-trip exactly
    assert [p.name for p in path.parent.iterdir()] == ["table.csv"]  # no temp files left


def test_read_table_errors_name_the_file(tmp_path):
    path = tmp_path / "t.csv"
    write_table(pd.DataFrame({"a": [1]}), path)
    with pytest.raises(ReproInputError, match=r"t\.csv.*missing columns \['b', 'c'\]"):
        read_table(path, required=["a", "b", "c"])
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(ReproInputError, match="empty.csv"):
        read_table(empty)
    bad = tmp_path / "bad.csv"
    bad.write_text('a,b\n1,"unterminated\n')
    with pytest.raises(ReproInputError, match="bad.csv"):
        read_table(bad)
    with pytest.raises(ReproInputError, match="absent.csv"):
        read_table(tmp_path / "absent.csv")


def test_mean_std():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)  # sample std, ddof=1
    assert mean_std([4.0]) == (4.0, 0.0)
    assert mean_std([1.0, float("nan"), 3.0]) == (2.0, math.sqrt(2.0))
    m, s = mean_std([])
    assert math.isnan(m) and math.isnan(s)
    m, s = mean_std([float("nan")])
    assert math.isnan(m) and math.isnan(s)


def test_verdict_from():
    assert verdict_from(True) == "holds"
    assert verdict_from(False) == "does not hold"
    assert verdict_from(None) == "inconclusive"


@pytest.mark.parametrize(
    "a, b, better, margin, expected",
    [
        ([1.0, 1.2], [2.0, 2.2], "lower", 0.0, "holds"),
        ([2.0, 2.2], [1.0, 1.2], "lower", 0.0, "does not hold"),
        ([0.9], [0.8], "higher", 0.0, "holds"),
        ([0.8], [0.9], "higher", 0.0, "does not hold"),
        ([1.0], [1.0], "lower", 0.0, "holds"),  # equal counts as "at least as good"
        ([1.04], [1.0], "lower", 0.05, "holds"),  # within 5% of B
        ([1.06], [1.0], "lower", 0.05, "does not hold"),
        ([0.96], [1.0], "higher", 0.05, "holds"),
        ([0.97], [1.0], "lower", -0.05, "does not hold"),  # must beat B by 5%
        ([0.94], [1.0], "lower", -0.05, "holds"),
        ([], [1.0], "lower", 0.0, "inconclusive"),
        ([1.0], [float("nan")], "higher", 0.0, "inconclusive"),
    ],
)
def test_compare(a, b, better, margin, expected):
    assert compare(a, b, better, margin) == expected


def test_compare_rejects_unknown_direction():
    with pytest.raises(ValueError, match="better"):
        compare([1.0], [2.0], "smaller")


@pytest.mark.parametrize(
    "mean, std, text",
    [
        (12.3456, 0.0123, "12.346 ± 0.012"),
        (0.91234, 0.0051, "0.9123 ± 0.0051"),
        (1234.5, 56.0, "1234 ± 56"),  # 1234.5 rounds half to even
        (250.0, 1234.0, "250 ± 1234"),
        (0.5, 0.0, "0.5 ± 0"),
        (3e-7, 2e-8, "3e-07 ± 2e-08"),
        (float("nan"), 0.0, "nan"),
    ],
)
def test_format_mean_std(mean, std, text):
    assert format_mean_std(mean, std) == text


def _claim(paper: str, verdict: str = "holds") -> Claim:
    return Claim(
        paper=paper,
        claim="The method lowers FID compared with the baseline.",
        metric="fid",
        measured_mean=12.3456,
        measured_std=0.0123,
        n=3,
        reference="baseline 13.1 ± 0.2 (paper: 10.2 vs 11.0)",
        verdict=verdict,
    )


def test_claim_rejects_unknown_verdict():
    with pytest.raises(ValueError, match="verdict"):
        _claim("p", verdict="maybe")


def test_claims_csv_columns_and_merge(tmp_path):
    a, b = tmp_path / "a" / "claims.csv", tmp_path / "b" / "claims.csv"
    write_claims([_claim("paper_a"), _claim("paper_a", "does not hold")], a)
    write_claims([_claim("paper_b", "inconclusive")], b)
    df = read_table(a)
    assert list(df.columns) == CLAIM_COLUMNS
    assert df["measured"].tolist() == ["12.346 ± 0.012"] * 2
    assert df["n"].tolist() == [3, 3]

    merged = merge_claims([a, b], tmp_path / "results" / "claims.csv")
    back = read_table(tmp_path / "results" / "claims.csv", required=CLAIM_COLUMNS)
    assert list(back.columns) == CLAIM_COLUMNS
    assert back["paper"].tolist() == ["paper_a", "paper_a", "paper_b"]
    assert back["verdict"].tolist() == ["holds", "does not hold", "inconclusive"]
    assert len(merged) == 3

    bad = tmp_path / "bad.csv"
    write_table(pd.DataFrame({"paper": ["x"], "claim": ["y"]}), bad)
    with pytest.raises(ReproInputError, match=r"bad\.csv.*missing columns"):
        merge_claims([a, bad], tmp_path / "out.csv")
    assert not (tmp_path / "out.csv").exists()


# The threshold 1.9 (AGD's speed claim); "just inside / outside" is 1e-9 away.
EPS = 1e-9


@pytest.mark.parametrize(
    "low, high, better, expected",
    [
        # at least 1.9: the whole interval must be at or above it
        (1.9, 2.0, "higher", "holds"),  # low on the threshold: inside
        (1.9 + EPS, 2.0, "higher", "holds"),
        (1.9 - EPS, 2.0, "higher", "inconclusive"),  # low just outside: straddles
        (1.5, 1.9 - EPS, "higher", "does not hold"),  # high just below: wholly outside
        (1.5, 1.9, "higher", "inconclusive"),  # high on the threshold: touches it
        (1.5, 1.9 + EPS, "higher", "inconclusive"),
        (1.7 - 1.3, 1.7 + 1.3, "higher", "inconclusive"),  # 1.7 +- 1.3x on a busy machine
        (1.95, 1.95, "higher", "holds"),  # a point interval
        (1.85, 1.85, "higher", "does not hold"),
        # at most 1.9: mirrored
        (1.8, 1.9, "lower", "holds"),
        (1.8, 1.9 - EPS, "lower", "holds"),
        (1.8, 1.9 + EPS, "lower", "inconclusive"),
        (1.9 + EPS, 2.0, "lower", "does not hold"),
        (1.9, 2.0, "lower", "inconclusive"),
        (1.9 - EPS, 2.0, "lower", "inconclusive"),
        # nothing measured
        (math.nan, math.nan, "higher", "inconclusive"),
        (1.5, math.nan, "lower", "inconclusive"),
    ],
)
def test_interval_verdict(low, high, better, expected):
    assert interval_verdict(low, high, 1.9, better) == expected


def test_interval_verdict_rejects_bad_arguments():
    with pytest.raises(ValueError, match="better"):
        interval_verdict(1.0, 2.0, 1.5, "more")
    with pytest.raises(ValueError, match="low"):
        interval_verdict(2.0, 1.0, 1.5)


def test_spread():
    assert Spread.of([2.0, 1.8, 1.9]) == Spread(1.9, 1.8, 2.0, 3)  # odd n: the middle value
    assert Spread.of([1.0, 4.0, 2.0, 3.0]) == Spread(2.5, 1.0, 4.0, 4)  # even n: the mean of two
    assert Spread.of([1.2, float("nan")]) == Spread(1.2, 1.2, 1.2, 1)
    empty = Spread.of([])
    assert empty.n == 0 and math.isnan(empty.median) and str(empty) == "nan"
    assert str(Spread.of([1.8, 2.01, 1.95])) == "median 1.95, range 1.8 to 2.01 over 3"


def test_claim_with_spread_shows_median_range_and_mean():
    claim = _claim("p")
    claim.spread = Spread(1.95, 1.8, 2.01, 3)
    assert claim.measured == "median 1.95, range 1.8 to 2.01 over 3 (mean 12.346 ± 0.012)"
    assert claim.row()["measured"] == claim.measured
    assert list(claim.row()) == CLAIM_COLUMNS  # the spread is no column of its own


def test_strict_verdict_directions():
    assert strict_verdict(0.1, 0.2, 0.0, "higher") == "holds"
    assert strict_verdict(0.0, 0.2, 0.0, "higher") == "inconclusive"
    assert strict_verdict(-0.2, 0.0, 0.0, "higher") == "does not hold"
    assert strict_verdict(0.5, 0.99, 1.0, "lower") == "holds"
    assert strict_verdict(0.5, 1.0, 1.0, "lower") == "inconclusive"
    assert strict_verdict(1.0, 1.5, 1.0, "lower") == "does not hold"
    assert strict_verdict(math.nan, 1.0, 1.0, "lower") == "inconclusive"
    # within the rounding of the threshold = on it; just beyond the rounding = beyond it
    assert strict_verdict(1e-12, 0.2, 0.0, "higher") == "inconclusive"
    assert strict_verdict(2e-9, 0.2, 0.0, "higher") == "holds"
    assert strict_verdict(-0.2, 1e-12, 0.0, "higher") == "does not hold"
    assert strict_verdict(0.5, 1 - 1e-12, 1.0, "lower") == "inconclusive"
    assert strict_verdict(0.5, 1 - 2e-9, 1.0, "lower") == "holds"
    assert strict_verdict(1 - 1e-12, 1.5, 1.0, "lower") == "does not hold"
    with pytest.raises(ValueError):
        strict_verdict(0, 1, 0, "sideways")


def test_spread_verdict_needs_min_seeds_and_reads_mean_minus_std():
    # mean 2, std 1 (ddof 1): [1, 3] lies above 0; against 1.5 it straddles.
    assert spread_verdict([1.0, 2.0, 3.0], 0.0, "higher", 3) == (2.0, 1.0, 3, "holds")
    assert spread_verdict([1.0, 2.0, 3.0], 1.5, "higher", 3)[3] == "inconclusive"
    assert spread_verdict([1.0, 2.0, 3.0], 3.0, "higher", 3)[3] == "does not hold"
    # two seeds decide nothing when three are asked for; NaNs do not count
    assert spread_verdict([1.0, 2.0, math.nan], 0.0, "higher", 3)[2:] == (2, "inconclusive")


def test_check_keyed_table_names_missing_columns_and_a_repeated_key():
    from repro.core.results import check_keyed_table

    table = pd.DataFrame({"variant": ["a", "a", "b"], "seed": [0, 1, 0], "x": [1.0, 2.0, 3.0]})
    check_keyed_table(table, ["variant", "seed", "x"], ["variant", "seed"], "t")  # passes
    with pytest.raises(ReproInputError, match=r"t lacks columns \['y'\]"):
        check_keyed_table(table, ["x", "y"], ["variant", "seed"], "t")
    twice = pd.concat([table, table.iloc[[1]]])
    with pytest.raises(ReproInputError, match=r"the row \{'variant': 'a', 'seed': 1\} appears"):
        check_keyed_table(twice, ["x"], ["variant", "seed"], "t")
