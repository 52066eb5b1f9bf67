"""FedRE's claims from hand-made summary and communication tables: values computed by
hand, spreads just inside and just outside every threshold."""

import math

import pandas as pd
import pytest
from test_fedre_table import comm_rows

from repro.core.errors import ReproInputError
from repro.fedre import claims
from repro.fedre.table import SUMMARY_COLUMNS


def summary(last_means, task="glyphs", partition="dir", max_accuracy=None, last_rounds=10):
    """last_means: {(algorithm, seed): last_mean_accuracy}; max_accuracy likewise (default:
    the last mean)."""
    rows = []
    for (algorithm, seed), value in last_means.items():
        best = value if max_accuracy is None else max_accuracy.get((algorithm, seed), value)
        rows.append(
            (task, partition, algorithm, seed, 20, value, last_rounds, value, best, 7, True)
        )
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def pair(fedre, baseline, name="fedproto"):
    """A summary of FedRE and one baseline; fedre / baseline: last means, one per seed."""
    values = {("fedre", s): v for s, v in enumerate(fedre)}
    values.update({(name, s): v for s, v in enumerate(baseline)})
    return values


def gain_pair(gains_in_points, name="fedproto", base=0.6):
    """FedRE at `base` on every seed, the baseline `gains_in_points` below it."""
    return pair([base] * len(gains_in_points), [base - g / 100 for g in gains_in_points], name)


def beats(gains_in_points, name="fedproto", min_seeds=3):
    table = summary(gain_pair(gains_in_points, name))
    return claims.accuracy_claims(table, "dir", [name], min_seeds)[0]


NO_COMM = pd.concat(
    [comm_rows("fedre", s, upload=(1,)) for s in range(3)]
    + [comm_rows("fedproto", s, upload=(100,)) for s in range(3)],
    ignore_index=True,
)


def test_per_seed_gain_in_points_on_the_seeds_both_have():
    values = pair([0.80, 0.82, 0.78, 0.9], [0.70, 0.80, 0.79])
    gains = claims.per_seed_gain(summary(values), "glyphs", "dir", "fedre", "fedproto")
    assert gains.to_dict() == pytest.approx({0: 10.0, 1: 2.0, 2: -1.0})


def test_beats_holds_when_the_spread_lies_above_zero():
    claim = beats([1.0, 2.0, 3.0])  # mean 2, std 1: [1, 3]
    assert (claim.verdict, claim.n) == ("holds", 3)
    assert claim.measured_mean == pytest.approx(2.0) and claim.measured_std == pytest.approx(1.0)
    assert claim.claim == "FedRE beats FedProto in accuracy on glyphs (dir)"
    assert claim.paper == "FedRE"


def test_beats_just_inside_and_just_outside_zero():
    assert beats([0.1, 1.0, 1.9]).verdict == "holds"  # mean 1, std 0.9: low 0.1
    assert beats([0.0, 1.0, 2.0]).verdict == "inconclusive"  # low exactly 0
    assert beats([-1.0, 1.0, 3.0]).verdict == "inconclusive"  # [-1, 3]
    assert beats([-0.1, -1.0, -1.9]).verdict == "does not hold"  # high -0.1
    assert beats([0.0, 0.0, 0.0]).verdict == "does not hold"  # a tie is not a win


def test_the_best_round_never_decides_the_verdict():
    values = gain_pair([1.0, 2.0, 3.0])
    # FedProto's best round far above FedRE's: the claim still holds on the last rounds
    best = {("fedproto", s): 0.99 for s in range(3)}
    table = summary(values, max_accuracy=best)
    claim = claims.accuracy_claims(table, "dir", ["fedproto"], 3)[0]
    assert claim.verdict == "holds" and claim.measured_mean == pytest.approx(2.0)
    # and FedRE's best round far above FedProto's cannot rescue a loss
    losing = gain_pair([-1.0, -2.0, -3.0])
    table = summary(losing, max_accuracy={("fedre", s): 0.99 for s in range(3)})
    assert claims.accuracy_claims(table, "dir", ["fedproto"], 3)[0].verdict == "does not hold"


def test_two_seeds_decide_nothing():
    claim = beats([5.0, 6.0])
    assert (claim.verdict, claim.n) == ("inconclusive", 2)
    assert "only 2 seeds" in claim.reference
    assert beats([5.0, 6.0], min_seeds=2).verdict == "holds"


def test_the_reference_gives_the_paper_and_both_means():
    claim = beats([1.0, 2.0, 3.0], name="local")
    assert "Local 81.2 / 41.6" in claim.reference and "FedRE 82.6 / 46.4" in claim.reference
    assert "here FedRE 60.0% vs Local 58.0%" in claim.reference
    assert "last 10 rounds" in claim.metric


def test_one_claim_per_baseline_and_task_on_the_partition():
    values = {**gain_pair([1.0, 2.0, 3.0]), **gain_pair([1.0, 2.0, 3.0], "local")}
    table = pd.concat(
        [
            summary(values, task="glyphs"),
            summary(values, task="shapes"),
            # the other partition: FedRE loses there, and it is not the claim's
            summary(gain_pair([-5.0, -5.0, -5.0]), partition="pat"),
        ],
        ignore_index=True,
    )
    made = claims.accuracy_claims(table, "dir", ["fedproto", "local"], 3)
    assert [c.claim for c in made] == [
        "FedRE beats FedProto in accuracy on glyphs (dir)",
        "FedRE beats FedProto in accuracy on shapes (dir)",
        "FedRE beats Local in accuracy on glyphs (dir)",
        "FedRE beats Local in accuracy on shapes (dir)",
    ]
    assert {c.verdict for c in made} == {"holds"}


def test_a_missing_algorithm_task_or_partition_is_inconclusive_and_says_so():
    table = summary(gain_pair([1.0, 2.0, 3.0]))
    claim = claims.accuracy_claims(table, "dir", ["fedgh"], 3)[0]
    assert (claim.verdict, claim.n) == ("inconclusive", 0)
    assert "no rows of FedGH on glyphs (dir)" in claim.reference
    assert "no paper number" not in claim.reference and "FedGH 78.7 / 40.9" in claim.reference
    claim = claims.accuracy_claims(table, "pat", ["fedproto"], 3)[0]
    assert claim.verdict == "inconclusive" and "no rows on partition 'pat'" in claim.reference
    other = pd.concat([table, summary(gain_pair([1.0]), task="shapes", partition="pat")])
    by_task = {c.claim: c for c in claims.accuracy_claims(other, "dir", ["fedproto"], 3)}
    shapes = by_task["FedRE beats FedProto in accuracy on shapes (dir)"]
    assert shapes.verdict == "inconclusive" and "no rows on task 'shapes'" in shapes.reference
    empty = claims.accuracy_claims(table.iloc[0:0], "dir", ["fedproto"], 3)
    assert [c.verdict for c in empty] == ["inconclusive"]
    assert "no rows" in empty[0].reference


def test_a_summary_without_the_columns_or_with_a_run_twice_is_refused():
    with pytest.raises(ReproInputError, match="the summary table lacks columns"):
        claims.build_claims(pd.DataFrame({"task": ["glyphs"]}), NO_COMM)
    table = summary(gain_pair([1.0, 2.0, 3.0]))
    with pytest.raises(ReproInputError, match="appears more than once"):
        claims.build_claims(pd.concat([table, table.iloc[:1]]), NO_COMM)


def upload_table(ratios, task="glyphs", partition="dir"):
    """FedRE uploads 900 then 1100 scalars (mean 1000) on every seed; FedProto 100
    below then 100 above 1000 * ratio, so seed s's ratio of means is ratios[s] (the
    mean of the per-round ratios is not). Broadcasts are large and must not count."""
    parts = []
    for seed, ratio in enumerate(ratios):
        fedproto = (round(1000 * ratio) - 100, round(1000 * ratio) + 100)
        parts.append(comm_rows("fedre", seed, 4, task, partition, (900, 1100), 10**7))
        parts.append(comm_rows("fedproto", seed, 4, task, partition, fedproto, 10**7))
        parts.append(comm_rows("local", seed, 4, task, partition, (0,), 0))
    return pd.concat(parts, ignore_index=True)


def test_upload_ratio_is_the_ratio_of_the_per_round_means_per_seed():
    claim = claims.upload_claim(upload_table([50.1, 50.5, 50.9]), "glyphs", "dir", 50, 3)
    assert claim.measured_mean == pytest.approx(50.5)
    assert claim.measured_std == pytest.approx(0.4)
    assert claim.verdict == "holds"
    assert "here FedRE 1.0k scalars (4.0kB) per round, FedProto 50k" in claim.reference
    assert "257k" in claim.reference


@pytest.mark.parametrize(
    "ratios, verdict",
    [
        ([50.1, 50.5, 50.9], "holds"),  # 50.5 +- 0.4: low 50.1
        ([49.85, 49.9, 49.95], "does not hold"),  # 49.9 +- 0.05: high 49.95
        ([48.0, 50.0, 52.0], "inconclusive"),  # 50 +- 2
        ([50.0, 50.0, 50.0], "does not hold"),  # on the threshold is not above it
    ],
)
def test_upload_ratio_just_inside_and_outside_the_threshold(ratios, verdict):
    assert claims.upload_claim(upload_table(ratios), "glyphs", "dir", 50, 3).verdict == verdict


def test_upload_ratio_is_taken_on_the_many_class_task_and_partition_only():
    table = pd.concat(
        [upload_table([60.0] * 3), upload_table([2.0] * 3, task="digits")], ignore_index=True
    )
    made = claims.build_claims(
        summary(gain_pair([1.0, 2.0, 3.0])),
        table,
        partition="dir",
        many_class_task="glyphs",
        min_upload_ratio=50,
        baselines=["fedproto"],
        min_seeds=3,
    )
    assert made[-1].verdict == "holds" and made[-1].measured_mean == pytest.approx(60.0)
    assert made[-1].claim == (
        "FedRE uploads >= 50x fewer scalars than FedProto on the many-class task (glyphs, dir)"
    )
    digits = claims.upload_claim(table, "digits", "dir", 50, 3)
    assert digits.verdict == "does not hold" and digits.measured_mean == pytest.approx(2.0)


def test_upload_claim_without_its_algorithm_or_task_is_inconclusive():
    table = upload_table([60.0] * 3)
    no_fedre = claims.upload_claim(table[table.algorithm != "fedre"], "glyphs", "dir", 50, 3)
    assert no_fedre.verdict == "inconclusive" and "no rows of FedRE" in no_fedre.reference
    no_task = claims.upload_claim(table, "cifar", "dir", 50, 3)
    assert no_task.verdict == "inconclusive" and "no rows on task 'cifar'" in no_task.reference
    no_partition = claims.upload_claim(table, "glyphs", "pat", 50, 3)
    assert "no rows on partition 'pat'" in no_partition.reference


def test_a_seed_where_fedre_uploads_nothing_has_no_ratio():
    table = upload_table([60.0] * 3)
    silent = (table.algorithm == "fedre") & (table.seed == 0) & (table.direction == "upload")
    table.loc[silent, "scalars"] = 0
    claim = claims.upload_claim(table, "glyphs", "dir", 50, 3)
    assert (claim.n, claim.verdict) == (2, "inconclusive")
    assert "FedRE uploads nothing on 1 seeds" in claim.reference
    assert not math.isinf(claim.measured_mean)


@pytest.mark.parametrize(
    "value, text",
    [(5120, "5.1k"), (257000, "257k"), (1.2e6, "1.2M"), (512, "512"), (0, "0"), (999, "999")],
)
def test_count_text(value, text):
    assert claims.count_text(value) == text


def test_the_stage_writes_the_claims_and_checks_its_params(tmp_path):
    src = tmp_path / "summary.csv"
    values = {**gain_pair([1.0, 2.0, 3.0]), **gain_pair([-1.0, -2.0, -3.0], "local")}
    summary(values).to_csv(src, index=False)
    comm = tmp_path / "comm.csv"
    upload_table([60.0] * 3).to_csv(comm, index=False)
    out = tmp_path / "claims.csv"
    argv = ["--summary", str(src), "--communication", str(comm), "--out", str(out)]
    params = '{"partition": "dir", "many_class_task": "glyphs", "min_upload_ratio": 50,'
    claims.main([*argv, "--params", params + ' "baselines": ["fedproto", "fedgh", "local"]}'])
    written = pd.read_csv(out)
    assert list(written.verdict) == ["holds", "inconclusive", "does not hold", "holds"]
    assert set(written.paper) == {"FedRE"}
    for bad, key in (
        ('"baselines": ["fedavg"]}', "fedre.claims.baselines: unknown algorithm 'fedavg'"),
        ('"baselines": ["fedre"]}', "fedre.claims.baselines: unknown algorithm 'fedre'"),
        ('"baselines": [], "min_seeds": 3}', "fedre.claims.baselines: must be a non-empty"),
    ):
        with pytest.raises(ReproInputError, match=key):
            claims.main([*argv, "--params", params + bad])
    with pytest.raises(ReproInputError, match="fedre.claims.min_upload_ratio"):
        claims.main([*argv, "--params", '{"min_upload_ratio": 0}'])
    with pytest.raises(ReproInputError, match="fedre.claims.min_seeds"):
        claims.main([*argv, "--params", '{"min_seeds": 0}'])
