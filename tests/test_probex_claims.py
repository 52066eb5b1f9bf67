"""ProbeX's claims from hand-made accuracy tables: values computed by hand, bounds just
inside and just outside every threshold."""

import math

import pandas as pd
import pytest

from repro.core.errors import ReproInputError
from repro.probex import claims
from repro.probex.table import ACCURACY_COLUMNS


def rows(method, accuracies, parameters=100, routing=math.nan):
    """accuracies: {(tree, seed): test accuracy}."""
    return [
        {
            "method": method,
            "tree": tree,
            "layer": "blocks.1.attn.proj",
            "seed": seed,
            "val_accuracy": acc,
            "test_accuracy": acc,
            "parameters": parameters,
            "n_train": 90,
            "n_val": 20,
            "n_test": 40,
            "best_epoch": 3,
            "routing_accuracy": routing,
        }
        for (tree, seed), acc in accuracies.items()
    ]


def table(*parts):
    return pd.DataFrame([r for part in parts for r in part], columns=ACCURACY_COLUMNS)


BASE = {
    ("a", 0): 0.80,
    ("b", 0): 0.70,
    ("a", 1): 0.82,
    ("b", 1): 0.72,
    ("a", 2): 0.78,
    ("b", 2): 0.74,
}


def shifted(by):
    """BASE with `by` (a fraction) added to seed s's accuracies: by[s]."""
    return {(tree, seed): acc + by[seed] for (tree, seed), acc in BASE.items()}


def test_per_seed_gain_is_the_mean_over_trees_in_points():
    t = table(rows("probex", BASE), rows("statnn", shifted({0: -0.1, 1: -0.2, 2: -0.3})))
    gains = claims.per_seed_gain(t, "probex", "statnn")
    assert gains.to_dict() == pytest.approx({0: 10.0, 1: 20.0, 2: 30.0})


def test_per_seed_gain_uses_only_trees_both_methods_have():
    other = {k: v - 0.1 for k, v in BASE.items() if k[0] == "a"}
    t = table(rows("probex", BASE), rows("statnn", other))
    assert claims.per_seed_gain(t, "probex", "statnn").to_dict() == pytest.approx(
        {0: 10.0, 1: 10.0, 2: 10.0}
    )


def beats(gains_by_seed, min_seeds=3):
    t = table(
        rows("probex", BASE), rows("statnn", shifted({s: -g for s, g in gains_by_seed.items()}))
    )
    return claims.build_claims(t, min_seeds=min_seeds)[0]


def test_beats_statnn_holds_when_the_spread_lies_above_zero():
    # gains 1, 2, 3 points: mean 2, std 1 -> [1, 3] above 0
    claim = beats({0: 0.01, 1: 0.02, 2: 0.03})
    assert (claim.verdict, claim.n) == ("holds", 3)
    assert claim.measured_mean == pytest.approx(2.0) and claim.measured_std == pytest.approx(1.0)


def test_beats_statnn_straddling_zero_is_inconclusive_and_below_does_not_hold():
    # gains -1, 1, 3 points: mean 1, std 2 -> [-1, 3] straddles 0
    assert beats({0: -0.01, 1: 0.01, 2: 0.03}).verdict == "inconclusive"
    assert beats({0: -0.01, 1: -0.02, 2: -0.03}).verdict == "does not hold"


def test_two_seeds_decide_nothing():
    t = table(
        rows("probex", {k: v for k, v in BASE.items() if k[1] < 2}),
        rows("statnn", {k: v - 0.2 for k, v in BASE.items() if k[1] < 2}),
    )
    claim = claims.build_claims(t)[0]
    assert (claim.verdict, claim.n) == ("inconclusive", 2)
    assert "undecided" in claim.reference


def dense_claim(gains, dense_params=1000, probex_params=250, tolerance=1.0):
    t = table(
        rows("probex", BASE, parameters=probex_params),
        rows("dense", shifted({s: -g for s, g in gains.items()}), parameters=dense_params),
    )
    return claims.build_claims(t, tolerance=tolerance)[1]


def test_matches_dense_inside_and_outside_the_tolerance():
    # ProbeX 0.9 points below Dense on every seed (std 0): above -1, holds; 1.1 below: not.
    assert dense_claim({0: -0.009, 1: -0.009, 2: -0.009}).verdict == "holds"
    assert dense_claim({0: -0.011, 1: -0.011, 2: -0.011}).verdict == "does not hold"
    # mean -1, std 0.5: straddles -1
    assert dense_claim({0: -0.005, 1: -0.01, 2: -0.015}).verdict == "inconclusive"


def test_matches_dense_needs_far_fewer_parameters_on_every_tree():
    better = {0: 0.02, 1: 0.02, 2: 0.02}
    assert dense_claim(better, dense_params=1000, probex_params=250).verdict == "holds"  # 0.25
    assert dense_claim(better, dense_params=1000, probex_params=251).verdict == "does not hold"
    claim = dense_claim(better, dense_params=1000, probex_params=100)
    assert "a 0.100" in claim.reference and "at most 0.100" in claim.reference


def test_experts_claim_reports_routing_accuracy():
    t = table(
        rows("probex_experts", BASE, routing=0.95),
        rows("probex_single", shifted({0: -0.05, 1: -0.04, 2: -0.06})),
    )
    claim = claims.build_claims(t)[2]
    assert claim.verdict == "holds"
    assert claim.measured_mean == pytest.approx(5.0)
    assert "routing accuracy 95.0%" in claim.reference


def zeroshot(accuracies, chance=1 / 3, dense=0.4):
    """accuracies: {seed: ProbeX's zero-shot accuracy}; Dense at `dense` on every seed."""
    rows_ = []
    for seed, acc in accuracies.items():
        for method, value in (("probex", acc), ("dense", dense)):
            rows_.append(
                {
                    "method": method,
                    "seed": seed,
                    "layer": "to_q",
                    "heldout": f"held{seed}",
                    "seen_val_accuracy": 0.9,
                    "seen_test_accuracy": 0.9,
                    "zeroshot_accuracy": value,
                    "chance": chance,
                    "parameters": 10,
                    "best_epoch": 1,
                    "n_train": 70,
                    "n_zeroshot": 60,
                }
            )
    return pd.DataFrame(rows_)


def test_zeroshot_far_above_chance_inside_and_outside_the_margin():
    base = table(rows("probex", BASE), rows("statnn", BASE), rows("dense", BASE))
    chance = 0.25
    # 10.5 points above chance on every seed (std 0): above the 10-point margin
    claim = claims.build_claims(base, zeroshot({0: 0.355, 1: 0.355, 2: 0.355}, chance))[3]
    assert claim.verdict == "holds" and claim.measured_mean == pytest.approx(10.5)
    # 9.5 above: not far enough; 5, 10, 15 (mean 10, std 5): straddles
    assert (
        claims.build_claims(base, zeroshot({0: 0.345, 1: 0.345, 2: 0.345}, chance))[3].verdict
        == "does not hold"
    )
    assert (
        claims.build_claims(base, zeroshot({0: 0.30, 1: 0.35, 2: 0.40}, chance))[3].verdict
        == "inconclusive"
    )
    # the margin comes from the caller
    loose = claims.build_claims(base, zeroshot({0: 0.345, 1: 0.345, 2: 0.345}, chance), margin=5)
    assert loose[3].verdict == "holds"
    assert "Dense aligned the same way 40.0%" in claim.reference
    assert "held0, held1, held2" in claim.reference


def test_a_table_without_the_columns_is_refused():
    with pytest.raises(ReproInputError, match="lacks columns"):
        claims.build_claims(pd.DataFrame({"method": ["probex"]}))


def test_the_stage_writes_three_claims(tmp_path):
    t = table(
        rows("probex", BASE, parameters=10),
        rows("statnn", shifted({0: -0.1, 1: -0.1, 2: -0.1})),
        rows("dense", BASE, parameters=1000),
        rows("probex_single", BASE),
        rows("probex_experts", BASE, routing=1.0),
    )
    src = tmp_path / "acc.csv"
    t.to_csv(src, index=False)
    out = tmp_path / "claims.csv"
    claims.main(["--accuracy", str(src), "--out", str(out), "--params", '{"match_tolerance": 1}'])
    written = pd.read_csv(out)
    assert list(written.verdict) == ["holds", "holds", "does not hold"]
    assert set(written.paper) == {"ProbeX"}
