"""MLflow tracking: one run per training/evaluation rule, logged in one go at the end.

Rules run as parallel processes that share one SQLite store. SQLite (and the
alembic migrations MLflow runs when it first opens a store) break under
concurrent writers, so every process does all its MLflow work inside an
exclusive `fcntl.flock` on a lock file beside the database.

Under Snakemake a job does not talk to MLflow at all: importing mlflow and its SQL
store costs ~2 s of CPU, paid by every one of the ~300 jobs of the tiny DAG. The
workflow sets REPRO_MLFLOW_SPOOL (rules/common.smk); `log_run` then writes the run
(tags, params, metrics, hard links of its artifacts) as one directory in the spool,
atomically, and the Snakefile's onsuccess / onerror handlers log every spooled run
in one process (`flush_spool`, or `python -m repro.core.tracking flush`). A record
leaves the spool only once its run is FINISHED in the store; a flush that dies
half-way is finished by the next one without logging a run twice (tag spool_key).

Environment:
    MLFLOW_TRACKING_URI   where to log (default: sqlite:///<cwd>/mlflow.db,
                          artifacts under <cwd>/mlartifacts/<paper>)
    REPRO_MLFLOW=0        turn logging off (log_run returns None)
    REPRO_MLFLOW_SPOOL    a directory: spool runs there instead of logging them
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import subprocess
import time
import uuid
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from repro.core.errors import ReproInputError

log = logging.getLogger(__name__)

# MLflow's limits (mlflow.utils.validation); restated so that importing mlflow stays lazy.
MAX_PARAM_VALUE_LENGTH = 6000
MAX_PARAMS_PER_BATCH = 100

SPOOL_ENV = "REPRO_MLFLOW_SPOOL"
RECORD_FILE = "run.json"
SPOOL_TAG = "spool_key"


def log_run(
    *,
    paper: str,
    rule: str,
    scale: str,
    params: dict,
    metrics: dict[str, float],
    artifacts: Iterable[str | os.PathLike] = (),
    tags: dict | None = None,
) -> str | None:
    """Log one finished run (experiment = `paper`) and return its run id.

    `params` is the rule's config section; nested keys are flattened with dots.
    Returns None when REPRO_MLFLOW=0. With REPRO_MLFLOW_SPOOL set, the run is
    spooled (see the module's docstring) and the returned id is its spool key.
    """
    if os.environ.get("REPRO_MLFLOW", "1") == "0":
        return None
    artifacts = [Path(a) for a in artifacts]
    for path in artifacts:
        if not path.exists():
            raise ReproInputError(f"{path}: artifact to log not found")
    metric_values = {}
    for key, value in metrics.items():
        try:
            metric_values[key] = float(value)
        except (TypeError, ValueError) as err:
            raise ReproInputError(f"metrics.{key}: not a number ({value!r})") from err
    all_tags = {"paper": paper, "rule": rule, "scale": scale, "git_commit": git_commit()}
    all_tags.update({k: str(v) for k, v in (tags or {}).items()})
    record = {
        "paper": paper,
        "rule": rule,
        "tags": all_tags,
        "params": flatten_params(params),
        "metrics": metric_values,
        "time_ms": int(time.time() * 1000),
    }
    spool = os.environ.get(SPOOL_ENV)
    if spool:
        return spool_run(Path(spool), record, artifacts)
    return _log_record(record, artifacts)


def spool_run(spool: Path, record: dict, artifacts: list[Path]) -> str:
    """Write `record` and its artifacts as one new directory of `spool`; return its key.

    Artifacts are hard-linked (copied across file systems): a later atomic rewrite of an
    output replaces its path, not the spooled inode, so the run keeps what the job made.
    """
    key = f"{record['time_ms']:013d}-{uuid.uuid4().hex[:12]}"
    spool.mkdir(parents=True, exist_ok=True)
    staging = spool / f".{key}.part"
    staging.mkdir()
    names = []
    for path in artifacts:
        target = staging / "artifacts" / path.name
        target.parent.mkdir(exist_ok=True)
        if path.is_dir():
            shutil.copytree(path, target, copy_function=_link_or_copy)
        else:
            _link_or_copy(path, target)
        names.append(path.name)
    (staging / RECORD_FILE).write_text(json.dumps({**record, "key": key, "artifacts": names}))
    staging.rename(spool / key)  # a reader sees the whole record or none of it
    log.info("mlflow: spooled run %s (%s/%s) to %s", key, record["paper"], record["rule"], spool)
    return key


def flush_spool(spool: str | os.PathLike) -> int:
    """Log every complete record of `spool` to MLflow (oldest first); return how many.

    Imports mlflow only when there is something to log. A record is removed once its
    run is FINISHED in the store; one already there (a flush killed between logging and
    removing) is removed without a second run.
    """
    spool = Path(spool)
    records = sorted(p for p in spool.glob("*") if not p.name.startswith(".") and p.is_dir())
    if not records:
        return 0
    logged, unreadable = 0, []
    for directory in records:
        try:
            record = json.loads((directory / RECORD_FILE).read_text())
        except (OSError, ValueError):
            unreadable.append(str(directory / RECORD_FILE))  # kept: a person should look
            continue
        artifacts = [directory / "artifacts" / name for name in record.get("artifacts", [])]
        _log_record(record, artifacts)
        shutil.rmtree(directory)
        logged += 1
    log.info("mlflow: logged %d spooled runs from %s", logged, spool)
    if unreadable:
        raise ReproInputError(f"not a spooled run, left in the spool: {', '.join(unreadable)}")
    return logged


def _log_record(record: dict, artifacts: list[Path]) -> str:
    """Log one run described by `record` (see log_run) to the store; return its run id."""
    from_spool = "key" in record
    tags = dict(record["tags"])
    if from_spool:
        tags[SPOOL_TAG] = record["key"]
    uri, artifact_root, lock = _store_locations(record["paper"])
    # Import outside the lock (it takes seconds and touches no store); log inside it.
    with _quiet_mlflow() as mlflow, _flock(lock):
        from mlflow.entities import Metric, Param

        client = mlflow.MlflowClient(tracking_uri=uri)
        experiment_id = _experiment_id(client, record["paper"], artifact_root)
        if from_spool:
            done = client.search_runs(
                [experiment_id], filter_string=f"tags.{SPOOL_TAG} = '{record['key']}'"
            )
            finished = [run for run in done if run.info.status == "FINISHED"]
            if finished:
                return finished[0].info.run_id
            for run in done:  # a flush killed while logging it: start the run again
                client.delete_run(run.info.run_id)
        when = int(record["time_ms"])
        run = client.create_run(experiment_id, start_time=when, run_name=record["rule"], tags=tags)
        run_id = run.info.run_id
        try:
            flat = [Param(k, v) for k, v in record["params"].items()]
            for i in range(0, len(flat), MAX_PARAMS_PER_BATCH):
                client.log_batch(run_id, params=flat[i : i + MAX_PARAMS_PER_BATCH])
            if record["metrics"]:
                client.log_batch(
                    run_id,
                    metrics=[Metric(k, v, when, 0) for k, v in record["metrics"].items()],
                )
            for path in artifacts:
                if path.is_dir():
                    client.log_artifacts(run_id, str(path), artifact_path=path.name)
                else:
                    client.log_artifact(run_id, str(path))
        except BaseException:
            client.set_terminated(run_id, status="FAILED")
            raise
        client.set_terminated(run_id, status="FINISHED", end_time=when)
    log.info("mlflow: logged run %s (%s/%s) to %s", run_id, record["paper"], record["rule"], uri)
    return run_id


def flatten_params(params: Mapping, prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}, "c": [1, 2]} -> {"a.b": "1", "c": "[1, 2]"}, values cut to MLflow's limit."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, prefix=f"{name}."))
            continue
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        flat[name] = text[:MAX_PARAM_VALUE_LENGTH]
    return flat


def git_commit(cwd: str | os.PathLike | None = None) -> str:
    """`git rev-parse HEAD` of the repository holding `cwd`, or "unknown"."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else "unknown"


def _store_locations(paper: str) -> tuple[str, str | None, Path]:
    """(tracking URI, experiment artifact location or None, lock file path)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        uri = f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    match = re.match(r"^sqlite:///(.+)$", uri)
    if match:
        db = Path(match.group(1))
        # A paper's artifacts live beside the database, not in a ./mlruns of whatever cwd.
        artifacts = (db.parent / "mlartifacts" / _safe(paper)).resolve().as_uri()
        return uri, artifacts, db.with_name(db.name + ".lock")
    # A server or other store chooses its own artifact location.
    return uri, None, Path.cwd() / "mlflow.db.lock"


def _experiment_id(client, name: str, artifact_location: str | None) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return client.create_experiment(name, artifact_location=artifact_location)
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    return experiment.experiment_id


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if needed) for the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def _quiet_mlflow() -> Iterator[object]:
    """Import mlflow (slow, so only here) with its and alembic's chatter kept out of rule logs."""
    # No network here: telemetry would only cost time. The user's own setting wins.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import mlflow
        from mlflow.entities import Metric, Param  # noqa: F401

        # The SQL store module (alembic, sqlalchemy) is most of the import time; load it
        # here, outside the lock, rather than inside it on the first store access.
        with contextlib.suppress(ImportError):
            import mlflow.store.tracking.sqlalchemy_store  # noqa: F401

        # After the import: mlflow sets up its own logger when imported.
        for name in ("mlflow", "alembic", "sqlalchemy"):
            logging.getLogger(name).setLevel(logging.WARNING)
        yield mlflow


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "experiment"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="repro.core.tracking",
        description="Log the MLflow runs that Snakemake jobs spooled (REPRO_MLFLOW_SPOOL).",
    )
    parser.add_argument("command", choices=["flush"])
    parser.add_argument(
        "--spool",
        type=Path,
        default=os.environ.get(SPOOL_ENV),
        help=f"the spool directory (default: ${SPOOL_ENV})",
    )
    args = parser.parse_args(argv)
    if args.spool is None:
        parser.error(f"no spool: pass --spool or set {SPOOL_ENV}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(f"logged {flush_spool(args.spool)} spooled runs from {args.spool}")


if __name__ == "__main__":
    from repro.core.stage import run

    run(main)
