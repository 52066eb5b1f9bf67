"""FedRE's tables gathered from the simulation's run files: checks, order, the summary's
numbers computed by hand."""

import pandas as pd
import pytest

from repro.core.errors import ReproInputError
from repro.fedre import table as fedre_table
from repro.fedre.table import ACCURACY_COLUMNS, COMMUNICATION_COLUMNS, SUMMARY_COLUMNS


def accuracy_rows(
    algorithm="fedre",
    seed=0,
    curve=(0.5, 0.6),
    task="glyphs",
    partition="dir",
    clients=2,
    client_accuracy=0.9,
):
    """One run's accuracy rows: `curve[r - 1]` is round r's all-clients accuracy (client
    -1); every client scores `client_accuracy` on its own split (never the summary's)."""
    rows = []
    for round_, overall in enumerate(curve, start=1):
        for client in range(clients):
            arch = f"arch{client}"
            rows.append((task, partition, algorithm, seed, round_, client, arch, 10))
            rows[-1] += (client_accuracy,)
        rows.append((task, partition, algorithm, seed, round_, -1, "all", 10 * clients, overall))
    return pd.DataFrame(rows, columns=ACCURACY_COLUMNS)


def comm_rows(
    algorithm="fedre",
    seed=0,
    rounds=2,
    task="glyphs",
    partition="dir",
    upload=(100,),
    broadcast=1000,
):
    """One run's communication rows; `upload[(r - 1) % len(upload)]` scalars go up in
    round r (4 bytes each), `broadcast` scalars come down."""
    rows = []
    for round_ in range(1, rounds + 1):
        up = upload[(round_ - 1) % len(upload)]
        for direction, scalars in (("upload", up), ("broadcast", broadcast)):
            messages = 0 if scalars == 0 else 4
            rows.append(
                (task, partition, algorithm, seed, round_, direction, messages, messages)
                + (scalars, 4 * scalars)
            )
    return pd.DataFrame(rows, columns=COMMUNICATION_COLUMNS)


def write(tmp_path, name, *frames):
    path = tmp_path / f"{name}.csv"
    pd.concat(frames, ignore_index=True).to_csv(path, index=False)
    return path


def test_accuracy_rows_are_sorted_by_task_partition_algorithm_order_seed_round_client(tmp_path):
    first = write(tmp_path, "s1", accuracy_rows("local", 1), accuracy_rows("fedre", 1))
    second = write(
        tmp_path,
        "s0",
        accuracy_rows("fedre", 0),
        accuracy_rows("fedproto", 0, task="alpha"),
        accuracy_rows("local", 0),
    )
    t = fedre_table.accuracy_table([first, second])
    assert list(t.columns) == ACCURACY_COLUMNS
    runs = t[["task", "algorithm", "seed"]].drop_duplicates().itertuples(index=False)
    # "local" comes before "fedre" in ALGORITHMS, though not alphabetically
    assert [tuple(r) for r in runs] == [
        ("alpha", "fedproto", 0),
        ("glyphs", "local", 0),
        ("glyphs", "local", 1),
        ("glyphs", "fedre", 0),
        ("glyphs", "fedre", 1),
    ]
    one_run = t[(t.algorithm == "fedre") & (t.seed == 0)]
    assert list(zip(one_run["round"], one_run.client, strict=True)) == [
        (1, -1),
        (1, 0),
        (1, 1),
        (2, -1),
        (2, 0),
        (2, 1),
    ]
    assert t["round"].dtype == "int64" and t.client.dtype == "int64"


def test_a_row_seen_twice_is_refused_naming_the_files_and_the_count(tmp_path):
    a = write(tmp_path, "a", accuracy_rows())
    b = write(tmp_path, "b", accuracy_rows())
    with pytest.raises(ReproInputError, match=r"a\.csv, .*b\.csv: the row .* appears 2 times"):
        fedre_table.accuracy_table([a, b])
    three = write(tmp_path, "three", accuracy_rows(), accuracy_rows(), accuracy_rows())
    with pytest.raises(ReproInputError, match="'round': 1, 'client': 0} appears 3 times"):
        fedre_table.accuracy_table([three])


@pytest.mark.parametrize("value", [0.0, 1.0])
def test_accuracies_on_the_bounds_are_fractions(tmp_path, value):
    path = write(tmp_path, "ok", accuracy_rows(curve=(value, value), client_accuracy=value))
    assert set(fedre_table.accuracy_table([path]).accuracy) == {value}


@pytest.mark.parametrize("value", [-0.001, 1.001, 81.0])
def test_accuracies_outside_zero_one_are_refused(tmp_path, value):
    path = write(tmp_path, "pct", accuracy_rows(curve=(0.5, value)))
    with pytest.raises(ReproInputError, match=r"pct\.csv: accuracy of .* not a fraction"):
        fedre_table.accuracy_table([path])


def test_an_unknown_algorithm_is_refused(tmp_path):
    path = write(tmp_path, "u", accuracy_rows("fed_re"))
    with pytest.raises(ReproInputError, match=r"u\.csv: unknown algorithm \['fed_re'\]"):
        fedre_table.accuracy_table([path])


def test_rounds_must_run_from_one_with_no_gap(tmp_path):
    gap = accuracy_rows(curve=(0.1, 0.2, 0.3, 0.4))
    gap = gap[gap["round"] != 3]
    with pytest.raises(ReproInputError, match=r"has rounds \[1, 2, 4\], not 1..R"):
        fedre_table.accuracy_table([write(tmp_path, "gap", gap)])
    late = accuracy_rows(curve=(0.1, 0.2, 0.3))
    late = late[late["round"] != 1]
    with pytest.raises(ReproInputError, match=r"has rounds \[2, 3\]"):
        fedre_table.accuracy_table([write(tmp_path, "late", late)])
    zero = accuracy_rows(curve=(0.1, 0.2))
    zero["round"] -= 1
    with pytest.raises(ReproInputError, match="round of .* is 0, not a whole number >= 1"):
        fedre_table.accuracy_table([write(tmp_path, "zero", zero)])


def test_runs_of_one_task_and_partition_share_their_number_of_rounds(tmp_path):
    short = write(tmp_path, "short", accuracy_rows("fedre", 0, (0.1, 0.2)))
    long = write(tmp_path, "long", accuracy_rows("local", 0, (0.1, 0.2, 0.3)))
    with pytest.raises(ReproInputError, match="has 3 rounds but .* has 2"):
        fedre_table.accuracy_table([short, long])
    # another task (or partition) may run another number of rounds
    other_task = write(tmp_path, "t", accuracy_rows("local", 0, (0.1, 0.2, 0.3), task="other"))
    other_partition = write(tmp_path, "p", accuracy_rows(curve=(0.1,) * 3, partition="pat"))
    assert len(fedre_table.accuracy_table([short, other_task, other_partition])) == 24


def test_every_round_has_the_same_clients_and_the_all_clients_row(tmp_path):
    rows = accuracy_rows(curve=(0.1, 0.2, 0.3))
    no_overall = rows[~((rows["round"] == 2) & (rows.client == -1))]
    with pytest.raises(ReproInputError, match=r"round 2 of the run .* has client \[0, 1\]"):
        fedre_table.accuracy_table([write(tmp_path, "a", no_overall)])
    no_client = rows[~((rows["round"] == 3) & (rows.client == 1))]
    with pytest.raises(
        ReproInputError, match=r"round 3 .* client \[-1, 0\], expected \[-1, 0, 1\]"
    ):
        fedre_table.accuracy_table([write(tmp_path, "b", no_client)])
    never_overall = rows[rows.client != -1]
    with pytest.raises(ReproInputError, match=r"expected \[-1, 0, 1\]"):
        fedre_table.accuracy_table([write(tmp_path, "c", never_overall)])


def test_summary_numbers_by_hand():
    acc = pd.concat(
        [
            # clients at 0.99 on every round: the summary reads client -1 only
            accuracy_rows("fedre", 0, (0.1, 0.5, 0.4, 0.3), client_accuracy=0.99),
            accuracy_rows("local", 0, (0.5, 0.2, 0.5, 0.1)),
        ],
        ignore_index=True,
    )
    s = fedre_table.summary_table(acc, last_rounds=2)
    assert list(s.columns) == SUMMARY_COLUMNS
    assert list(s.algorithm) == ["local", "fedre"]
    fedre = s[s.algorithm == "fedre"].iloc[0]
    assert fedre["rounds"] == 4 and fedre["last_rounds"] == 2
    assert fedre.final_accuracy == pytest.approx(0.3)
    assert fedre.last_mean_accuracy == pytest.approx(0.35)  # (0.4 + 0.3) / 2
    assert (fedre.max_accuracy, fedre.max_round) == (pytest.approx(0.5), 2)
    assert bool(fedre.max_selected_on_test) is True
    local = s[s.algorithm == "local"].iloc[0]
    assert local.max_round == 1  # equal bests at rounds 1 and 3: the earliest
    assert local.last_mean_accuracy == pytest.approx(0.3)  # (0.5 + 0.1) / 2


def test_summary_uses_every_round_when_there_are_fewer_than_last_rounds():
    acc = accuracy_rows(curve=(0.1, 0.5, 0.4, 0.3))
    s4 = fedre_table.summary_table(acc, last_rounds=4).iloc[0]
    s10 = fedre_table.summary_table(acc, last_rounds=10).iloc[0]
    s3 = fedre_table.summary_table(acc, last_rounds=3).iloc[0]
    s1 = fedre_table.summary_table(acc, last_rounds=1).iloc[0]
    assert (s4["last_rounds"], s10["last_rounds"], s3["last_rounds"]) == (4, 4, 3)
    assert s10.last_mean_accuracy == pytest.approx(0.325)
    assert s4.last_mean_accuracy == pytest.approx(0.325)
    assert s3.last_mean_accuracy == pytest.approx(0.4)
    assert s1.last_mean_accuracy == pytest.approx(s1.final_accuracy)


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "10"])
def test_last_rounds_must_be_a_whole_number_of_at_least_one(bad):
    with pytest.raises(ReproInputError, match="fedre.last_rounds: must be an integer >= 1"):
        fedre_table.summary_table(accuracy_rows(), last_rounds=bad)


def test_summary_refuses_a_run_without_all_clients_rows():
    acc = accuracy_rows()
    with pytest.raises(ReproInputError, match="has no all-clients rows"):
        fedre_table.summary_table(acc[acc.client != -1], last_rounds=2)


def test_empty_runs_give_empty_tables():
    assert fedre_table.accuracy_table([]).empty
    assert list(fedre_table.summary_table(fedre_table.accuracy_table([]), 3).columns) == (
        SUMMARY_COLUMNS
    )
    assert list(fedre_table.communication_table([]).columns) == COMMUNICATION_COLUMNS


def test_communication_rows_are_checked_and_ordered(tmp_path):
    path = write(tmp_path, "c", comm_rows("fedre", 1), comm_rows("local", 0, upload=(0,)))
    t = fedre_table.communication_table([path])
    assert list(t.columns) == COMMUNICATION_COLUMNS
    assert list(zip(t.algorithm, t["round"], t.direction, strict=True))[:3] == [
        ("local", 1, "upload"),
        ("local", 1, "broadcast"),
        ("local", 2, "upload"),
    ]
    assert t.scalars.dtype == "int64"


@pytest.mark.parametrize(
    "column, value, message",
    [
        ("scalars", -1, "scalars of .* is -1, not a whole number >= 0"),
        ("bytes", 2.5, "bytes of .* is 2.5, not a whole number >= 0"),
        ("messages", "many", "messages of .* 'many'"),
        ("direction", "download", r"unknown direction \['download'\]"),
        ("algorithm", "fedavg", r"unknown algorithm \['fedavg'\]"),
    ],
)
def test_bad_communication_values_are_refused(tmp_path, column, value, message):
    rows = comm_rows()
    rows[column] = rows[column].astype(object)
    rows.loc[1, column] = value
    with pytest.raises(ReproInputError, match=message):
        fedre_table.communication_table([write(tmp_path, "bad", rows)])


def test_zero_counts_are_fine_and_each_round_needs_both_directions(tmp_path):
    assert len(fedre_table.communication_table([write(tmp_path, "z", comm_rows(upload=(0,)))]))
    rows = comm_rows(rounds=3)
    one_way = rows[~((rows["round"] == 2) & (rows.direction == "broadcast"))]
    with pytest.raises(ReproInputError, match=r"round 2 .* direction \['upload'\]"):
        fedre_table.communication_table([write(tmp_path, "w", one_way)])
    with pytest.raises(ReproInputError, match="appears 2 times"):
        fedre_table.communication_table([write(tmp_path, "d", rows, rows.iloc[:1])])


def stage_args(tmp_path, runs, comm_runs, last_rounds=2):
    outs = {name: tmp_path / f"out_{name}.csv" for name in ("accuracy", "summary", "comm")}
    argv = ["--runs", *map(str, runs), "--comm-runs", *map(str, comm_runs)]
    argv += ["--accuracy-out", str(outs["accuracy"]), "--summary-out", str(outs["summary"])]
    argv += ["--communication-out", str(outs["comm"])]
    argv += ["--params", f'{{"last_rounds": {last_rounds}}}']
    return argv, outs


def test_the_stage_writes_the_three_tables(tmp_path):
    runs = [
        write(tmp_path, f"acc{seed}", accuracy_rows("fedre", seed), accuracy_rows("local", seed))
        for seed in (0, 1)
    ]
    comm = [
        write(tmp_path, f"comm{seed}", comm_rows("fedre", seed), comm_rows("local", seed))
        for seed in (0, 1)
    ]
    argv, outs = stage_args(tmp_path, runs, comm, last_rounds=1)
    fedre_table.main(argv)
    assert len(pd.read_csv(outs["accuracy"])) == 4 * 2 * 3  # runs x rounds x rows
    summary = pd.read_csv(outs["summary"])
    assert len(summary) == 4 and set(summary.last_mean_accuracy) == {0.6}
    assert summary.max_selected_on_test.all()
    assert len(pd.read_csv(outs["comm"])) == 4 * 2 * 2


def test_the_stage_writes_nothing_when_the_runs_do_not_match(tmp_path):
    runs = [write(tmp_path, "acc", accuracy_rows("fedre"), accuracy_rows("local"))]
    comm = [write(tmp_path, "comm", comm_rows("fedre"))]
    argv, outs = stage_args(tmp_path, runs, comm)
    with pytest.raises(ReproInputError, match="'local'.* 2 rounds in the accuracy runs but no"):
        fedre_table.main(argv)
    longer = [write(tmp_path, "comm3", comm_rows("fedre", rounds=3), comm_rows("local", rounds=3))]
    argv, outs = stage_args(tmp_path, runs, longer)
    with pytest.raises(ReproInputError, match="2 rounds in the accuracy runs but 3 rounds"):
        fedre_table.main(argv)
    assert not any(path.exists() for path in outs.values())
    bad_params = stage_args(tmp_path, runs, comm, last_rounds=0)[0]
    with pytest.raises(ReproInputError, match="fedre.last_rounds"):
        fedre_table.main(bad_params)
    assert not any(path.exists() for path in outs.values())


@pytest.mark.parametrize(
    "column, value, message",
    [
        ("client", -2, "client of .* is -2, not a whole number >= -1"),
        ("test_samples", -1, "test_samples of .* is -1, not a whole number >= 0"),
        ("seed", 0.5, "seed of .* is 0.5, not a whole number >= 0"),
    ],
)
def test_bad_keys_and_counts_of_the_accuracy_runs_are_refused(tmp_path, column, value, message):
    rows = accuracy_rows()
    rows[column] = rows[column].astype(object)
    rows.loc[1, column] = value
    with pytest.raises(ReproInputError, match=message):
        fedre_table.accuracy_table([write(tmp_path, "bad", rows)])
