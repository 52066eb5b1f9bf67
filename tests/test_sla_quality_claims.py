"""SLA's quality claims from hand-made tables: per-seed values computed by hand, spreads just
inside and just outside every threshold (the tolerance, 0, the ratio, the FLOPs factor),
missing rows, too few seeds, and bad settings named by their config key."""

import math

import pandas as pd
import pytest
from test_sla_quality_table import model_row

from repro.core.errors import ReproInputError
from repro.core.results import CLAIM_COLUMNS
from repro.sla import claims
from repro.sla.table import build_table

PARAMS = {
    "min_seeds": 3,
    "metric": "test_loss",
    "match_tolerance": 0.05,
    "full": "full",
    "sla": "sla",
    "sparse_low": "sparse_85",
    "linear": "linear_only",
    "linear_fails_ratio": 1.5,
    "flops_reduction": 15,
}


def quality(entries):
    """entries: {(variant, seed): {column: value}}; the other columns are model_row's."""
    return build_table([model_row(v, s, **values) for (v, s), values in entries.items()])


def decide(entries, **params):
    return claims.build_claims(quality(entries), {**PARAMS, **params})


def spread(center):
    """Three per-seed values with mean `center` and std exactly 0.01."""
    return [center - 0.01, center, center + 0.01]


def cases(threshold, better):
    """(per-seed values, verdict): mean +- std at 0.001 either side of `threshold`."""
    sign = 1 if better == "higher" else -1
    return [
        (spread(threshold + sign * 0.011), "holds"),  # the whole interval beyond, by 0.001
        (spread(threshold + sign * 0.009), "inconclusive"),  # the near bound 0.001 short
        (spread(threshold - sign * 0.009), "inconclusive"),  # the far bound 0.001 across
        (spread(threshold - sign * 0.011), "does not hold"),  # the whole interval short
        ([threshold] * 3, "does not hold"),  # on the threshold is not beyond it
    ]


FULL = [0.1, 0.2, 0.4]  # full attention's test loss per seed: gaps are relative to each


def match_entries(gaps):
    entries = {}
    for seed, (full, gap) in enumerate(zip(FULL, gaps, strict=True)):
        entries[("full", seed)] = {"test_loss": full}
        entries[("sla", seed)] = {"test_loss": full * (1 + gap)}
    return entries


def check_numbers(found, values):
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    assert found.n == len(values) and found.paper == "SLA"
    assert found.measured_mean == pytest.approx(mean)
    assert found.measured_std == pytest.approx(std)


@pytest.mark.parametrize("gaps, verdict", cases(0.05, "lower") + [(spread(-0.2), "holds")])
def test_sla_matches_full_within_the_relative_tolerance(gaps, verdict):
    found = decide(match_entries(gaps))[0]
    assert found.verdict == verdict
    check_numbers(found, gaps)
    assert found.claim == "SLA at 95 % sparsity matches full attention's quality"
    assert found.metric.startswith("relative test_loss gap (sla - full) / full, per seed")


@pytest.mark.parametrize("gaps, verdict", cases(0.0, "higher"))
def test_sla_beats_sparse_only_at_a_lower_sparsity(gaps, verdict):
    entries = {}
    for seed, gap in enumerate(gaps):
        entries[("sla", seed)] = {"test_loss": 0.3}
        entries[("sparse_85", seed)] = {"test_loss": 0.3 + gap}
    found = decide(entries)[1]
    assert found.verdict == verdict
    check_numbers(found, gaps)
    assert found.claim == "SLA at 95 % sparsity beats sparse-only attention at 85 % sparsity"
    assert "test_loss of sparse_85 - sla" in found.metric


@pytest.mark.parametrize("ratios, verdict", cases(1.5, "higher"))
def test_linear_only_fails_above_the_ratio(ratios, verdict):
    entries = {}
    for seed, (full, ratio) in enumerate(zip(FULL, ratios, strict=True)):
        entries[("full", seed)] = {"test_loss": full}
        entries[("linear_only", seed)] = {"test_loss": full * ratio}
    found = decide(entries)[2]
    assert found.verdict == verdict
    check_numbers(found, ratios)
    assert found.claim == "Linear-only attention fails"
    assert "test_loss of linear_only / full" in found.metric


@pytest.mark.parametrize("factors, verdict", cases(15.0, "higher"))
def test_sla_cuts_attention_flops_by_the_factor(factors, verdict):
    entries = {("sla", s): {"flops_reduction": f} for s, f in enumerate(factors)}
    found = decide(entries)[3]
    assert found.verdict == verdict
    check_numbers(found, factors)
    assert found.claim == "SLA cuts attention FLOPs >= 15x"
    assert "flops_reduction of sla" in found.metric


def test_gaps_and_ratios_are_taken_seed_by_seed():
    # full 0.1 / 0.3 and sla 0.11 / 0.3: gaps 10 % and 0 % (mean 5 %), whereas the gap of
    # the means would be 0.41 / 0.4 - 1 = 2.5 %
    entries = {
        ("full", 0): {"test_loss": 0.1},
        ("full", 1): {"test_loss": 0.3},
        ("sla", 0): {"test_loss": 0.11},
        ("sla", 1): {"test_loss": 0.3},
        ("linear_only", 0): {"test_loss": 0.3},
        ("linear_only", 1): {"test_loss": 0.3},
    }
    first, _, linear, _ = decide(entries, min_seeds=2)
    assert first.measured_mean == pytest.approx(0.05)
    assert first.measured_std == pytest.approx(0.1 / math.sqrt(2))
    assert linear.measured_mean == pytest.approx(2.0)  # ratios 3 and 1
    assert linear.measured_std == pytest.approx(math.sqrt(2))


def test_unpaired_nan_and_zero_reference_seeds_are_left_out():
    entries = {
        ("full", 0): {"test_loss": 0.2},
        ("full", 1): {"test_loss": 0.2},
        ("full", 2): {"test_loss": 0.2},
        ("full", 3): {"test_loss": None},  # not measured
        ("full", 4): {"test_loss": 0.0},  # no relative gap to a loss of 0
        ("full", 9): {"test_loss": 0.2},  # no sla partner
        ("sla", 0): {"test_loss": 0.2},
        ("sla", 1): {"test_loss": 0.202},
        ("sla", 2): {"test_loss": 0.204},
        ("sla", 3): {"test_loss": 0.2},
        ("sla", 4): {"test_loss": 0.2},
        ("sla", 5): {"test_loss": 0.9},  # no full partner
    }
    found = decide(entries)[0]
    # gaps 0, 1 %, 2 %: mean 1 %, std 1 %, mean + std 2 % < 5 %
    assert (found.n, found.verdict) == (3, "holds")
    assert found.measured_mean == pytest.approx(0.01)
    assert found.measured_std == pytest.approx(0.01)


def test_sparsities_in_the_sentences_come_from_the_table():
    entries = {
        ("sla", 0): {"k_h": 0.1, "sparsity": 0.9},
        ("sparse_85", 0): {"k_h": 0.25, "sparsity": 0.75},
    }
    first, second, _, fourth = decide(entries)
    assert first.claim == "SLA at 90 % sparsity matches full attention's quality"
    assert second.claim == "SLA at 90 % sparsity beats sparse-only attention at 75 % sparsity"
    assert "sla at 90 % sparsity" in fourth.reference
    odd = decide({("sla", 0): {"k_h": 0.025, "sparsity": 0.975}})[0]
    assert odd.claim.startswith("SLA at 97.5 % sparsity")


def test_references_say_what_is_compared():
    entries = {}
    for seed, loss in enumerate([0.126, 0.128, 0.130]):
        entries[("full", seed)] = {"test_loss": loss}
        entries[("sla", seed)] = {"test_loss": 0.13}
        entries[("sparse_85", seed)] = {"test_loss": 0.2}
        entries[("linear_only", seed)] = {"test_loss": 0.5}
    first, second, third, fourth = decide(entries)
    assert "sla (test_loss 0.13 ± 0) vs full (test_loss 0.1280 ± 0.0020)" in first.reference
    assert first.reference.endswith("tolerance 5 %")
    assert "sparse_85 (test_loss 0.2 ± 0) vs sla (test_loss 0.13 ± 0)" in second.reference
    assert "linear_only (test_loss 0.5 ± 0) vs full" in third.reference
    assert "fails above 1.5x" in third.reference
    assert "target 15x" in fourth.reference
    assert [c.verdict for c in (first, second, third, fourth)] == ["holds"] * 4


def test_a_claim_whose_rows_are_absent_says_which():
    entries = {("full", s): {} for s in range(3)} | {("sla", s): {} for s in range(3)}
    found = decide(entries)
    assert found[0].verdict == "holds"  # equal losses: a gap of 0 < 5 %
    assert found[3].verdict == "holds"  # 16x > 15x
    for index, missing in ((1, "'sparse_85'"), (2, "'linear_only'")):
        assert (found[index].verdict, found[index].n) == ("inconclusive", 0)
        assert f"no rows of variant {missing} in the quality table" in found[index].reference
        assert math.isnan(found[index].measured_mean)
    empty = claims.build_claims(quality({}), PARAMS)
    assert [c.verdict for c in empty] == ["inconclusive"] * 4
    assert "no rows of variant 'full' and 'sla'" in empty[0].reference
    assert "no rows of variant 'sla'" in empty[3].reference
    assert empty[0].claim == "SLA at ? % sparsity matches full attention's quality"


def test_too_few_or_no_common_seeds_decide_nothing():
    entries = match_entries([0.0, 0.0, 0.0])
    del entries[("full", 2)]
    found = decide(entries)[0]
    assert (found.verdict, found.n) == ("inconclusive", 2)
    assert "only 2 seeds (< 3): undecided" in found.reference
    assert decide(entries, min_seeds=2)[0].verdict == "holds"
    disjoint = {("full", s): {} for s in range(3)} | {("sla", s): {} for s in range(3, 6)}
    found = decide(disjoint)[0]
    assert (found.verdict, found.n) == ("inconclusive", 0)
    assert "no seed has every row" in found.reference


def test_the_metric_comes_from_the_params():
    entries = {}
    for seed in range(3):
        entries[("full", seed)] = {"test_loss": 0.1, "frame_fid": 20.0}
        entries[("sla", seed)] = {"test_loss": 0.5, "frame_fid": 20.5}  # FID 2.5 % worse
    first = decide(entries, metric="frame_fid")[0]
    assert first.verdict == "holds" and first.measured_mean == pytest.approx(0.025)
    assert "relative frame_fid gap" in first.metric and "frame_fid 20.5" in first.reference
    assert decide(entries)[0].verdict == "does not hold"  # test loss 5x


def test_the_table_is_checked():
    with pytest.raises(ReproInputError, match=r"lacks columns \['flops_reduction'\]"):
        claims.build_claims(quality({}).drop(columns="flops_reduction"), PARAMS)
    twice = pd.concat([quality({("sla", 0): {}})] * 2, ignore_index=True)
    with pytest.raises(ReproInputError, match=r"the row \{'variant': 'sla', 'seed': 0\}"):
        claims.build_claims(twice, PARAMS)


@pytest.mark.parametrize("key", list(PARAMS))
def test_every_param_is_required(key):
    params = {k: v for k, v in PARAMS.items() if k != key}
    with pytest.raises(ReproInputError, match=rf"missing settings sla\.quality\.claims\.{key}"):
        claims.check_params(params)


@pytest.mark.parametrize(
    "values, key, message",
    [
        ({"min_seeds": 0}, "min_seeds", "integer >= 1"),
        ({"min_seeds": 2.0}, "min_seeds", "integer >= 1"),
        ({"min_seeds": True}, "min_seeds", "integer >= 1"),
        ({"metric": "loss"}, "metric", "'loss' is unknown"),
        ({"metric": "background_acc"}, "metric", "a table column, but not a quality metric"),
        ({"metric": "attention_ms"}, "metric", "not a quality metric"),
        ({"match_tolerance": -0.01}, "match_tolerance", "finite number >= 0"),
        ({"match_tolerance": "5%"}, "match_tolerance", "finite number >= 0"),
        ({"linear_fails_ratio": 0}, "linear_fails_ratio", "finite number > 0"),
        ({"flops_reduction": math.nan}, "flops_reduction", "finite number > 0"),
        ({"flops_reduction": True}, "flops_reduction", "finite number > 0"),
        ({"full": ""}, "full", "must be a variant name"),
        ({"sla": 95}, "sla", "must be a variant name"),
        ({"linear": "real"}, "linear", "not 'real'"),
        ({"sla": "full"}, "sla", "'full' is sla.quality.claims.full too"),
        ({"linear": "sparse_85"}, "linear", "is sla.quality.claims.sparse_low too"),
    ],
)
def test_bad_params_name_their_key(values, key, message):
    with pytest.raises(ReproInputError, match=rf"sla\.quality\.claims\.{key}: ") as err:
        claims.check_params({**PARAMS, **values})
    assert message in str(err.value)


def test_params_are_checked_and_typed():
    settings = claims.check_params({**PARAMS, "match_tolerance": 0})
    assert settings["match_tolerance"] == 0.0 and settings["flops_reduction"] == 15.0
    assert settings["sparse_low"] == "sparse_85" and settings["min_seeds"] == 3


def test_the_stage_writes_the_claims(tmp_path):
    table, out = tmp_path / "sla_quality.csv", tmp_path / "claims" / "sla.csv"
    gaps = spread(0.02)  # mean + std 3 % < 5 %
    quality(match_entries(gaps)).to_csv(table, index=False)
    params = pd.Series(PARAMS).to_json()
    claims.main(["--table", str(table), "--out", str(out), "--params", params])
    written = pd.read_csv(out)
    assert list(written.columns) == CLAIM_COLUMNS and len(written) == 4
    assert list(written.verdict) == ["holds", "inconclusive", "inconclusive", "holds"]
    assert (written.paper == "SLA").all()
    assert written.measured[0] == "0.020 ± 0.010"


def test_the_stage_refuses_bad_inputs_naming_them(tmp_path):
    out = tmp_path / "sla.csv"
    params = pd.Series(PARAMS).to_json()
    partial = tmp_path / "partial.csv"
    quality({("sla", 0): {}}).drop(columns="test_loss").to_csv(partial, index=False)
    with pytest.raises(ReproInputError, match=rf"{partial}: missing columns \['test_loss'\]"):
        claims.main(["--table", str(partial), "--out", str(out), "--params", params])
    twice = tmp_path / "twice.csv"
    pd.concat([quality({("sla", 0): {}})] * 2).to_csv(twice, index=False)
    with pytest.raises(ReproInputError, match=f"{twice}: the row"):
        claims.main(["--table", str(twice), "--out", str(out), "--params", params])
    with pytest.raises(ReproInputError, match="file not found"):
        claims.main(
            ["--table", str(tmp_path / "absent.csv"), "--out", str(out), "--params", params]
        )
    # a bad setting is named even before the table is read
    with pytest.raises(ReproInputError, match="sla.quality.claims.metric"):
        bad = pd.Series({**PARAMS, "metric": "fid"}).to_json()
        claims.main(["--table", str(tmp_path / "absent.csv"), "--out", str(out), "--params", bad])
    assert not out.exists()
