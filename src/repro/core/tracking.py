"""MLflow tracking: one run per training/evaluation rule, logged in one go at the end.

Rules run as parallel processes that share one SQLite store. SQLite (and the
alembic migrations MLflow runs when it first opens a store) break under
concurrent writers, so every process does all its MLflow work inside an
exclusive `fcntl.flock` on a lock file beside the database.

Environment:
    MLFLOW_TRACKING_URI   where to log (default: sqlite:///<cwd>/mlflow.db,
                          artifacts under <cwd>/mlartifacts/<paper>)
    REPRO_MLFLOW=0        turn logging off (log_run returns None)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import subprocess
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from repro.core.errors import ReproInputError

log = logging.getLogger(__name__)

# MLflow's limits (mlflow.utils.validation); restated so that importing mlflow stays lazy.
MAX_PARAM_VALUE_LENGTH = 6000
MAX_PARAMS_PER_BATCH = 100


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
    Returns None when REPRO_MLFLOW=0.
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

    uri, artifact_root, lock = _store_locations(paper)
    # Import outside the lock (it takes seconds and touches no store); log inside it.
    with _quiet_mlflow() as mlflow, _flock(lock):
        from mlflow.entities import Metric, Param

        client = mlflow.MlflowClient(tracking_uri=uri)
        experiment_id = _experiment_id(client, paper, artifact_root)
        run = client.create_run(experiment_id, run_name=rule, tags=all_tags)
        run_id = run.info.run_id
        try:
            flat = [Param(k, v) for k, v in flatten_params(params).items()]
            for i in range(0, len(flat), MAX_PARAMS_PER_BATCH):
                client.log_batch(run_id, params=flat[i : i + MAX_PARAMS_PER_BATCH])
            now = int(time.time() * 1000)
            if metric_values:
                client.log_batch(
                    run_id, metrics=[Metric(k, v, now, 0) for k, v in metric_values.items()]
                )
            for path in artifacts:
                if path.is_dir():
                    client.log_artifacts(run_id, str(path), artifact_path=path.name)
                else:
                    client.log_artifact(run_id, str(path))
        except BaseException:
            client.set_terminated(run_id, status="FAILED")
            raise
        client.set_terminated(run_id, status="FINISHED")
    log.info("mlflow: logged run %s (%s/%s) to %s", run_id, paper, rule, uri)
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


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "experiment"
