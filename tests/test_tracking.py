"""MLflow logging: flattening, the off switch, and six processes sharing one SQLite store."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from repro.core.errors import ReproInputError
from repro.core.tracking import (
    MAX_PARAM_VALUE_LENGTH,
    SPOOL_ENV,
    flatten_params,
    flush_spool,
    git_commit,
    log_run,
)
from repro.core.tracking import main as tracking_main


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
    os.environ.pop(SPOOL_ENV, None)
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


# ---- the spool: jobs write their runs to files, one process logs them all ----


def _spool_env(monkeypatch, tmp_path) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("REPRO_MLFLOW", raising=False)
    spool = tmp_path / "spool"
    monkeypatch.setenv(SPOOL_ENV, str(spool))
    return spool


def _runs(tmp_path: Path) -> list[tuple]:
    """(rule, status, run_id) of every run in the store under tmp_path, by rule."""
    db = sqlite3.connect(tmp_path / "mlflow.db")
    try:
        rows = db.execute(
            "SELECT t.value, r.status, r.run_uuid FROM runs r JOIN tags t "
            "ON t.run_uuid = r.run_uuid WHERE t.key = 'rule' AND r.lifecycle_stage = 'active'"
        ).fetchall()
    finally:
        db.close()
    return sorted(rows)


def test_spooled_run_is_one_atomic_directory_and_no_store(tmp_path, monkeypatch):
    spool = _spool_env(monkeypatch, tmp_path)
    art = tmp_path / "table.csv"
    art.write_text("a,b\n1,2\n")
    key = log_run(
        paper="p", rule="r", scale="tiny", params={"m": {"w": 3}}, metrics={"x": 2}, artifacts=[art]
    )
    assert [p.name for p in spool.iterdir()] == [key]  # no staging directory left behind
    record = json.loads((spool / key / "run.json").read_text())
    assert record["params"] == {"m.w": "3"}
    assert record["metrics"] == {"x": 2.0}
    assert record["tags"]["rule"] == "r" and record["artifacts"] == ["table.csv"]
    assert (spool / key / "artifacts" / "table.csv").read_text() == "a,b\n1,2\n"
    assert not (tmp_path / "mlflow.db").exists()


def test_a_job_that_spools_never_imports_mlflow(tmp_path):
    code = (
        "import sys\n"
        "from repro.core.tracking import log_run\n"
        "log_run(paper='p', rule='r', scale='tiny', params={}, metrics={'x': 1})\n"
        "print('mlflow' in sys.modules)\n"
    )
    env = {**os.environ, SPOOL_ENV: str(tmp_path / "spool")}
    env.pop("REPRO_MLFLOW", None)
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
    assert len(list((tmp_path / "spool").iterdir())) == 1


def test_flush_logs_every_spooled_run_with_what_the_job_made(tmp_path, monkeypatch):
    spool = _spool_env(monkeypatch, tmp_path)
    art = tmp_path / "table.csv"
    art.write_text("first\n")
    log_run(
        paper="p", rule="r1", scale="tiny", params={"s": 1}, metrics={"x": 1.5}, artifacts=[art]
    )
    # The output is rewritten atomically (a new file renamed over it) after the job spooled.
    fresh = tmp_path / "fresh.csv"
    fresh.write_text("second\n")
    os.replace(fresh, art)
    log_run(paper="q", rule="r2", scale="smoke", params={}, metrics={"y": -1}, tags={"k": 7})

    assert flush_spool(spool) == 2
    assert list(spool.iterdir()) == []
    assert [(rule, status) for rule, status, _ in _runs(tmp_path)] == [
        ("r1", "FINISHED"),
        ("r2", "FINISHED"),
    ]
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_ids = {rule: run_id for rule, _, run_id in _runs(tmp_path)}
    first, second = client.get_run(run_ids["r1"]), client.get_run(run_ids["r2"])
    assert first.data.params == {"s": "1"} and first.data.metrics == {"x": 1.5}
    assert second.data.metrics == {"y": -1.0} and second.data.tags["k"] == "7"
    assert second.data.tags["scale"] == "smoke" and second.data.tags["paper"] == "q"
    logged = tmp_path / "mlartifacts" / "p" / run_ids["r1"] / "artifacts" / "table.csv"
    assert logged.read_text() == "first\n"  # what the job made, not the later rewrite
    assert flush_spool(spool) == 0  # nothing twice


def test_flush_after_a_killed_flush_logs_each_run_once(tmp_path, monkeypatch):
    spool = _spool_env(monkeypatch, tmp_path)
    key = log_run(paper="p", rule="done", scale="tiny", params={}, metrics={"x": 1})
    log_run(paper="p", rule="half", scale="tiny", params={}, metrics={"x": 2})
    saved = tmp_path / "saved"
    shutil.copytree(spool / key, saved)
    assert flush_spool(spool) == 2
    # A flush killed after logging "done" but before removing its record ...
    shutil.copytree(saved, spool / key)
    # ... and one killed while logging "half": its run exists, still RUNNING.
    half = log_run(paper="p", rule="half", scale="tiny", params={}, metrics={"x": 3})
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("p").experiment_id
    client.create_run(experiment, run_name="half", tags={"rule": "half", "spool_key": half})

    assert flush_spool(spool) == 2
    rows = _runs(tmp_path)
    assert [(rule, status) for rule, status, _ in rows] == [
        ("done", "FINISHED"),
        ("half", "FINISHED"),
        ("half", "FINISHED"),
    ]
    metrics = sorted(
        client.get_run(run_id).data.metrics["x"] for r, _, run_id in rows if r == "half"
    )
    assert metrics == [2.0, 3.0]


def test_flush_keeps_an_unreadable_record_and_names_it(tmp_path, monkeypatch):
    spool = _spool_env(monkeypatch, tmp_path)
    log_run(paper="p", rule="good", scale="tiny", params={}, metrics={})
    broken = spool / "0000000000000-broken"
    broken.mkdir()
    (broken / "run.json").write_text("{not json")
    with pytest.raises(ReproInputError, match="0000000000000-broken/run.json"):
        flush_spool(spool)
    assert [rule for rule, _, _ in _runs(tmp_path)] == ["good"]  # the good one still logged
    assert [p.name for p in spool.iterdir()] == ["0000000000000-broken"]


def test_flush_of_an_empty_spool_imports_nothing(tmp_path):
    code = (
        "import sys\n"
        "from repro.core.tracking import flush_spool\n"
        f"print(flush_spool({str(tmp_path / 'none')!r}), 'mlflow' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "False"]


def test_flush_command_line(tmp_path, monkeypatch, capsys):
    spool = _spool_env(monkeypatch, tmp_path)
    log_run(paper="p", rule="r", scale="tiny", params={}, metrics={"x": 1})
    tracking_main(["flush", "--spool", str(spool)])
    assert "logged 1 spooled runs" in capsys.readouterr().out
    assert [rule for rule, _, _ in _runs(tmp_path)] == ["r"]
