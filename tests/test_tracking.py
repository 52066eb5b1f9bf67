"""MLflow logging: flattening, the off switch, and six processes sharing one SQLite store."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from pathlib import Path

import pytest

from repro.core.errors import ReproInputError
from repro.core.tracking import MAX_PARAM_VALUE_LENGTH, flatten_params, git_commit, log_run


def test_flatten_params_dotted_stringified_and_truncated():
    flat = flatten_params({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": "x", "f": None, "g": {}})
    assert flat == {"a.b": "1", "a.c.d": "[1, 2]", "e": "x", "f": "null", "g": "{}"}
    long = flatten_params({"s": "y" * (MAX_PARAM_VALUE_LENGTH + 10)})
    assert len(long["s"]) == MAX_PARAM_VALUE_LENGTH


def test_git_commit_unknown_outside_a_repo(tmp_path):
    assert git_commit(tmp_path) == "unknown"


def test_disabled_logs_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("REPRO_MLFLOW", "0")
    assert log_run(paper="p", rule="r", scale="tiny", params={}, metrics={"m": 1.0}) is None
    assert list(tmp_path.iterdir()) == []


def test_missing_artifact_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("REPRO_MLFLOW", raising=False)
    with pytest.raises(ReproInputError, match="nope.png"):
        log_run(paper="p", rule="r", scale="tiny", params={}, metrics={}, artifacts=["nope.png"])


def _writer(i: int, workdir: str, barrier, queue) -> None:
    """One 'rule': log a run with params, metrics, tags and an artifact."""
    os.chdir(workdir)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.pop("REPRO_MLFLOW", None)
    art = Path(f"artifact_{i}.txt")
    art.write_text(f"rule {i}\n")
    barrier.wait()  # all six hit the fresh store at the same moment
    run_id = log_run(
        paper=f"paper_{i % 2}",
        rule=f"rule_{i}",
        scale="tiny",
        params={"model": {"width": 8 * i, "layers": [1, 2]}, "seed": i},
        metrics={"loss": 0.5 * i, "acc": 1.0 / (i + 1)},
        artifacts=[art],
        tags={"worker": i},
    )
    queue.put(run_id)


def test_six_concurrent_processes_share_one_sqlite_store(tmp_path):
    # Fork after importing mlflow here, so that the six children spend their time on the
    # store (migrations on first use, then writes) rather than on six slow imports.
    import mlflow
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401

    ctx = mp.get_context("fork")
    barrier, queue = ctx.Barrier(6), ctx.Queue()
    start = time.perf_counter()
    procs = [ctx.Process(target=_writer, args=(i, str(tmp_path), barrier, queue)) for i in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    elapsed = time.perf_counter() - start
    assert [p.exitcode for p in procs] == [0] * 6
    run_ids = [queue.get(timeout=5) for _ in range(6)]
    print(f"six concurrent log_run processes took {elapsed:.1f} s")

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        runs = mlflow.search_runs(experiment_names=["paper_0", "paper_1"])
        client = mlflow.MlflowClient(tracking_uri=uri)
        experiments = [client.get_experiment_by_name(f"paper_{k}") for k in (0, 1)]
    finally:
        mlflow.set_tracking_uri(previous)

    assert len(runs) == 6
    runs = runs.set_index("tags.rule").sort_index()
    for i in range(6):
        row = runs.loc[f"rule_{i}"]
        assert row["status"] == "FINISHED"
        assert row["params.model.width"] == str(8 * i)
        assert row["params.model.layers"] == "[1, 2]"
        assert row["params.seed"] == str(i)
        assert row["metrics.loss"] == pytest.approx(0.5 * i)
        assert row["metrics.acc"] == pytest.approx(1.0 / (i + 1))
        assert row["tags.paper"] == f"paper_{i % 2}"
        assert row["tags.scale"] == "tiny"
        assert row["tags.worker"] == str(i)
        assert row["tags.git_commit"] == "unknown"  # tmp_path is not a git repository
        assert row["run_id"] in run_ids
        # Each run's artifact landed under <cwd>/mlartifacts/<paper>/<run id>/artifacts.
        art = tmp_path / "mlartifacts" / f"paper_{i % 2}" / row["run_id"] / "artifacts"
        assert (art / f"artifact_{i}.txt").read_text() == f"rule {i}\n"
    for exp in experiments:
        assert exp.artifact_location == (tmp_path / "mlartifacts" / exp.name).as_uri()
    assert not (tmp_path / "mlruns").exists()
    assert elapsed < 60
