"""repro.datadream.claims: verdicts from hand-made tables, just inside and just outside
every threshold (0 points of accuracy gain, an FID ratio of 1, the minimum of seeds).

Accuracies are multiples of U = 2**-8, so that differences and spreads are exact in
binary and a spread can sit exactly on a threshold.
"""

from __future__ import annotations

import math

import pandas as pd
import pytest

from repro.core.errors import ReproInputError
from repro.datadream import claims as dd_claims
from repro.datadream.claims import build_claims, fid_claim, gain_claim
from repro.datadream.table import ACCURACY_COLUMNS, FID_COLUMNS

U = 2.0**-8  # accuracy unit: 100 * U = 0.390625 percentage points, exact
E = 2.0**-14  # a nudge, far below a unit
SEEDS = (0, 1, 2)


@pytest.fixture(autouse=True)
def no_mlflow(monkeypatch):
    monkeypatch.setenv("REPRO_MLFLOW", "0")


def row(method, generator, shots, seed, test, n=0, val=0.5, selected=True):
    return dict(
        method=method,
        generator=generator,
        shots=shots,
        n_synthetic_per_class=n,
        seed=seed,
        val_acc=val,
        test_acc=test,
        selected_epoch=1,
        epochs=2,
        train_images=10,
        trainable_params=7,
        selected=selected,
    )


def accuracy_table(per_method: dict, seeds=SEEDS, main_shots=16) -> pd.DataFrame:
    """per_method: (method, generator) -> one test accuracy per seed."""
    rows = []
    for (method, generator), values in per_method.items():
        shots = 0 if (method, generator) in dd_claims.SHOT_FREE else main_shots
        for seed, value in zip(seeds, values, strict=True):
            rows.append(row(method, generator, shots, seed, value, n=0 if shots == 0 else 50))
    return pd.DataFrame(rows, columns=ACCURACY_COLUMNS)


def fid_table(per_generator: dict, seeds=SEEDS) -> pd.DataFrame:
    rows = []
    for generator, values in per_generator.items():
        shots = 0 if generator == "unadapted" else 16
        for seed, value in zip(seeds, values, strict=True):
            rows.append(
                dict(generator=generator, shots=shots, seed=seed, fid=value, num_images=100)
                | dict(n_per_class=10)
            )
    return pd.DataFrame(rows, columns=FID_COLUMNS)


def synthetic_gain(gains_in_units, variant="dset", min_seeds=3):
    """The synthetic-vs-unadapted claim where variant - unadapted = gains (in U) per seed."""
    seeds = tuple(range(len(gains_in_units)))
    table = accuracy_table(
        {
            ("synthetic", "unadapted"): [0.5] * len(seeds),
            ("synthetic", variant): [0.5 + g * U for g in gains_in_units],
        },
        seeds=seeds,
    )
    return gain_claim(
        table, "c", ("synthetic", variant), ("synthetic", "unadapted"), 16, "ref", min_seeds
    )


@pytest.mark.parametrize(
    "gains, verdict",
    [
        ([1, 2, 3], "holds"),  # mean 2U, std U: the spread [U, 3U] is above 0
        ([E / U, 1 + E / U, 2 + E / U], "holds"),  # low = E: just inside
        ([0, 1, 2], "inconclusive"),  # low exactly 0: a tie is no win
        ([-1, 1, 3], "inconclusive"),  # mean 1U > 0 but the spread straddles 0
        ([-2 + E / U, -1 + E / U, E / U], "inconclusive"),  # high = E: just not "does not hold"
        ([-2, -1, 0], "does not hold"),  # high exactly 0
        ([-3, -2, -1], "does not hold"),
        ([0, 0, 0], "does not hold"),  # all ties: never better
    ],
)
def test_gain_verdicts_at_the_threshold(gains, verdict):
    claim = synthetic_gain(gains)
    assert claim.verdict == verdict
    mean = sum(gains) / 3 * 100 * U
    assert claim.measured_mean == pytest.approx(mean)
    assert claim.n == 3


def test_a_tie_computed_in_floating_point_is_still_a_tie():
    """Accuracies k / 360 (the tiny test split): per-seed gains of 2, 0 and 4 images
    have mean == std mathematically, but mean - std is 2e-16 in floating point."""
    table = accuracy_table(
        {
            ("synthetic", "unadapted"): [37 / 360, 36 / 360, 36 / 360],
            ("synthetic", "cls"): [39 / 360, 36 / 360, 40 / 360],
        }
    )
    claim = gain_claim(table, "c", ("synthetic", "cls"), ("synthetic", "unadapted"), 16, "r")
    assert claim.measured_mean - claim.measured_std > 0  # the round-off
    assert claim.verdict == "inconclusive"


def test_gain_numbers_by_hand():
    # gains 1, 2, 3 units = 0.390625, 0.78125, 1.171875 points: mean 0.78125, std 0.390625
    claim = synthetic_gain([1, 2, 3])
    assert claim.measured_mean == 0.78125 and claim.measured_std == 0.390625
    assert claim.measured == "0.78 ± 0.39"
    assert "synthetic[DataDream_dset] - synthetic[unadapted]" in claim.metric


def test_too_few_seeds_decide_nothing():
    assert synthetic_gain([5, 6]).verdict == "inconclusive"  # 2 < 3 seeds
    assert "only 2 paired seeds" in synthetic_gain([5, 6]).reference
    assert synthetic_gain([5, 6, 7]).verdict == "holds"
    assert synthetic_gain([5, 6], min_seeds=2).verdict == "holds"
    assert synthetic_gain([]).verdict == "inconclusive"


def test_only_selected_rows_and_the_main_shots_count():
    table = accuracy_table(
        {("real", "none"): [0.5, 0.5, 0.5], ("real_synthetic", "dset"): [0.6, 0.61, 0.62]}
    )
    # An unselected N with a dazzling test accuracy, and another shots' rows: ignored.
    extra = [row("real", "none", 16, s, 0.99, n=5, selected=False) for s in SEEDS]
    extra += [row("real", "none", 4, s, 0.99) for s in SEEDS]
    table = pd.concat([table, pd.DataFrame(extra)], ignore_index=True)
    claim = gain_claim(
        table, "c", ("real_synthetic", "dset"), ("real", "none"), 16, "ref", min_seeds=3
    )
    assert claim.verdict == "holds"
    assert claim.measured_mean == pytest.approx(100 * 0.11)


def test_seeds_are_paired():
    # The variant has seeds 0-2, the baseline 1-3: only seeds 1 and 2 pair up.
    table = pd.concat(
        [
            accuracy_table({("synthetic", "dset"): [0.9, 0.6, 0.7]}),
            accuracy_table({("synthetic", "unadapted"): [0.5, 0.5, 0.1]}, seeds=(1, 2, 3)),
        ]
    )
    claim = gain_claim(table, "c", ("synthetic", "dset"), ("synthetic", "unadapted"), 16, "r", 2)
    assert claim.n == 2 and claim.measured_mean == pytest.approx(100 * (0.1 + 0.2) / 2)


@pytest.mark.parametrize(
    "ratios, verdict",
    [
        ([0.5, 0.75, 1.0], "inconclusive"),  # high exactly 1: not strictly lower
        ([0.5 - 2**-6, 0.75 - 2**-6, 1 - 2**-6], "holds"),  # high just below 1
        ([1.0, 1.25, 1.5], "does not hold"),  # low exactly 1
        ([1 - 2**-6, 1.25 - 2**-6, 1.5 - 2**-6], "inconclusive"),  # low just below 1
        ([0.25, 0.25, 0.25], "holds"),
    ],
)
def test_fid_ratio_verdicts_at_the_threshold(ratios, verdict):
    fid = fid_table({"unadapted": [8.0] * 3, "cls": [8.0 * r for r in ratios]})
    claim = fid_claim(fid, "cls", 16, 3)
    assert claim.verdict == verdict
    assert claim.measured_mean == pytest.approx(sum(ratios) / 3)
    assert "FID(DataDream_cls, 16 shots) / FID(unadapted)" in claim.metric


def test_fid_of_other_shots_is_not_compared():
    fid = fid_table({"unadapted": [8.0] * 3, "dset": [1.0] * 3})
    fid.loc[fid.generator == "dset", "shots"] = 4
    assert fid_claim(fid, "dset", 16, 3).n == 0
    assert fid_claim(fid, "dset", 16, 3).verdict == "inconclusive"
    assert fid_claim(fid, "dset", 4, 3).verdict == "holds"


def full_table(worst_gain_units):
    """Every method of the main table; the weakest (synthetic unadapted) beats zero-shot
    by worst_gain_units[seed] units, the others by more."""
    zs = 0.25
    return accuracy_table(
        {
            ("zero_shot", "none"): [zs] * 3,
            ("real", "none"): [0.75] * 3,
            ("synthetic", "unadapted"): [zs + g * U for g in worst_gain_units],
            ("synthetic", "cls"): [0.5] * 3,
            ("synthetic", "dset"): [0.5] * 3,
            ("real_synthetic", "cls"): [0.875] * 3,
            ("real_synthetic", "dset"): [0.875] * 3,
        }
    )


def zero_shot(claims):
    return next(c for c in claims if "zero-shot" in c.claim)


@pytest.mark.parametrize(
    "worst, verdict",
    [
        ([E / U, 1 + E / U, 2 + E / U], "holds"),
        ([0, 1, 2], "inconclusive"),
        ([-2 + E / U, -1 + E / U, E / U], "inconclusive"),
        ([-2, -1, 0], "does not hold"),
    ],
)
def test_all_beat_zero_shot_is_decided_by_the_weakest(worst, verdict):
    fid = fid_table({"unadapted": [8.0] * 3, "cls": [4.0] * 3, "dset": [4.0] * 3})
    claim = zero_shot(build_claims(full_table(worst), fid, 16))
    assert claim.verdict == verdict
    assert "weakest synthetic[unadapted]" in claim.reference
    assert claim.measured_mean == pytest.approx(100 * U * sum(worst) / 3)


def test_zero_shot_of_one_seed_stands_for_every_seed():
    table = full_table([5, 6, 7])
    table = table[~((table.method == "zero_shot") & (table.seed > 0))]
    claim = zero_shot(build_claims(table, fid_table({}), 16))
    assert claim.n == 3 and claim.verdict == "holds"


def test_build_claims_rows_and_the_paper_scale_story():
    fid = fid_table({"unadapted": [8.0] * 3, "cls": [4.0] * 3, "dset": [2.0, 3.0, 4.0]})
    claims = build_claims(full_table([5, 6, 7]), fid, 16)
    # synthetic beats unadapted (cls, dset), real+synthetic beats real (cls, dset),
    # lower FID (cls, dset), all beat zero-shot.
    assert len(claims) == 7
    assert [c.verdict for c in claims] == ["holds"] * 7
    assert {c.paper for c in claims} == {"DataDream"}
    assert "DataDream_cls" in claims[0].claim and "DataDream_dset" in claims[1].claim
    # dset FID ratios 0.25, 0.375, 0.5: mean 0.375, std 0.125
    assert claims[5].measured_mean == 0.375 and claims[5].measured_std == 0.125
    empty = build_claims(full_table([5, 6, 7]).iloc[0:0], fid.iloc[0:0], 16)
    assert len(empty) == 7 and {c.verdict for c in empty} == {"inconclusive"}
    assert all(math.isnan(c.measured_mean) for c in empty)


def test_cli_writes_the_claims_csv(tmp_path):
    acc = tmp_path / "acc.csv"
    full_table([5, 6, 7]).to_csv(acc, index=False)
    fid = tmp_path / "fid.csv"
    fid_table({"unadapted": [8.0] * 3, "cls": [4.0] * 3, "dset": [6.0] * 3}).to_csv(
        fid, index=False
    )
    out = tmp_path / "claims.csv"
    args = ["--accuracy", str(acc), "--fid", str(fid), "--out", str(out)]
    dd_claims.main([*args, "--params", '{"main_shots": 16}'])
    written = pd.read_csv(out)
    assert list(written.columns)[:4] == ["paper", "claim", "metric", "measured"]
    assert written.verdict.tolist() == ["holds"] * 7
    with pytest.raises(ReproInputError, match="datadream.main_shots"):
        dd_claims.main([*args, "--params", "{}"])
    with pytest.raises(ReproInputError, match="datadream.min_seeds"):
        dd_claims.main([*args, "--params", '{"main_shots": 16, "min_seeds": 0}'])
    acc.write_text("method,seed\nreal,0\n")
    with pytest.raises(ReproInputError, match=r"acc.csv.*missing columns"):
        dd_claims.main([*args, "--params", '{"main_shots": 16}'])
