"""MLflow defaults: where the store lives and what a training run records.

Layout: one MLflow run per `fit`, holding every stage. Metrics are stage-prefixed
(`train/<stage>/loss`, `eval/<stage>/id_similarity`, `data/<stage>/skipped/<reason>`),
so one run can be compared with another per stage in the MLflow UI. The tag
`mm.final_stage` names the stage whose eval metrics stand for the run.

The store is checked before training (`open_store`: one-line error, exit 2), and a training
run never depends on it staying up: `RunClient` keeps what an outage stops in the run
folder, and `sync_run` (the `sync-run` command) pushes it later.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import requests
from filelock import FileLock
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.store.db.db_types import DATABASE_ENGINES
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME
from omegaconf import DictConfig, OmegaConf

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
SQLITE_PREFIX = "sqlite:///"
BACKLOG_FILE = "tracking_backlog.jsonl"  # in the run folder: tracking calls the store did not take
RUN_DIR_ENV = "MM_LIGHTNING_RUN_DIR"  # names the run folder for every process of one run
RUN_LOCK_FILE = ".fit.lock"  # held by the fit training in a run folder; the OS drops it when the process dies
# MLflow's own HTTP retries, shortened from its defaults (7 retries, up to minutes per call) so
# that a dead server costs a training run seconds, not hours; the user's settings win.
HTTP_RETRY_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


# MLflow's experiment kind: its UI opens an experiment tagged "custom_model_development" in the
# model-training view (metric charts, run comparison); untagged, MLflow 3 opens its GenAI view.
# (values from the UI's ExperimentKind enum in mlflow/server/js, MLflow 3.17)
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
CUSTOM_MODEL_DEVELOPMENT = "custom_model_development"

# Our run tags, one name per constant, so code and MLflow UI filters (tags.mm.variant = 'full') agree.
TAG_EXPERIMENT = "mm.experiment"  # experiment name (a built-in YAML's name or a user YAML's stem)
TAG_VARIANT = "mm.variant"  # the ablation variant; the experiment name
TAG_PROFILE = "mm.profile"
TAG_SEED = "mm.seed"
TAG_BRANCHES = "mm.branches"  # comma-separated model.branches
TAG_FACE_MODALITY = "mm.face_modality"
TAG_CAN = "mm.can"
TAG_STAGES = "mm.stages"  # comma-separated curriculum.order
TAG_FINAL_STAGE = "mm.final_stage"  # the stage whose eval metrics stand for the run
TAG_GIT_COMMIT = "mm.git_commit"
TAG_ROLE = "mm.role"  # what made the run: fit, evaluate, score, ablation summary...
TAG_RUN_DIR = "mm.run_dir"
TAG_COMPLETED = "mm.completed"
TAG_CHECKPOINT = "mm.checkpoint"
TAG_SOURCE = "mm.source"
TAG_MATRIX = "mm.matrix"
TAG_MATRIX_ID = "mm.matrix_id"
TAG_ROW_LABEL = "mm.row_label"
TAG_BUDGET = "mm.budget"
TAG_BUDGET_FRACTION = "mm.budget_fraction"
TAG_TEXT_ALIGNMENT = "mm.text_alignment"  # why text alignment was left out
TAG_INCEPTION_SCORE = "mm.inception_score"  # why the inception score was left out


class TrackingStoreError(Exception):
    """The tracking store cannot be used; the message names the store and why."""


def tracking_uri(cfg: DictConfig | None = None) -> str:
    """config > $MLFLOW_TRACKING_URI > ./mlruns/mlflow.db (MLflow 3 refuses a plain file store)."""
    uri = (
        (cfg.tracking.tracking_uri if cfg is not None else None)
        or os.environ.get("MLFLOW_TRACKING_URI")
        or DEFAULT_TRACKING_URI
    )
    _make_sqlite_folder(uri)
    return uri


def _make_sqlite_folder(uri: str) -> None:
    if uri.startswith(SQLITE_PREFIX):
        try:
            Path(uri[len(SQLITE_PREFIX) :]).parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:  # e.g. a file where the store's folder should be
            raise TrackingStoreError(f"tracking store {uri}: cannot create its folder ({err})") from None


def open_store(uri: str) -> None:
    """Checks that the store takes writes, before any training starts, and creates its schema.

    sqlite: MLflow creates the schema on first use, and two processes doing that at once
    collide in its migrations; a file lock beside the database serialises the first use.
    http(s): the server must answer its /health endpoint."""
    for name, value in HTTP_RETRY_DEFAULTS.items():
        os.environ.setdefault(name, value)
    if uri.startswith(("http://", "https://")):
        try:
            requests.get(uri.rstrip("/") + "/health", timeout=10).raise_for_status()
        except requests.RequestException as err:
            raise TrackingStoreError(
                f"tracking server {uri} is unreachable ({type(err).__name__}); "
                "start it or point MLFLOW_TRACKING_URI elsewhere"
            ) from None
        return
    if not uri.startswith(SQLITE_PREFIX):
        return  # other stores (postgresql://, databricks, ...): MLflow reports their errors itself
    db = Path(uri[len(SQLITE_PREFIX) :])
    _make_sqlite_folder(uri)
    if db.is_dir():
        raise TrackingStoreError(f"tracking store {uri}: {db} is a folder, not a sqlite database file")
    try:
        with FileLock(f"{db}.lock", timeout=300):
            MlflowClient(uri).search_experiments(max_results=1)  # creates or migrates the schema
            with sqlite3.connect(db, timeout=60) as con:  # a write lock: fails on a read-only file
                con.execute("BEGIN IMMEDIATE")
                con.rollback()
    except (MlflowException, sqlite3.Error, OSError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise TrackingStoreError(f"tracking store {uri} is not usable: {message}") from None


def ensure_experiment(client: MlflowClient, name: str, uri: str) -> str:
    """Experiment id; a new experiment keeps its artifacts beside a sqlite store. Ours are tagged as custom
    model development (an older one without a kind gets the tag too), so the UI opens the training view."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if EXPERIMENT_KIND_TAG not in experiment.tags:
            client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, CUSTOM_MODEL_DEVELOPMENT)
        return experiment.experiment_id
    artifact_location = None
    if uri.startswith(SQLITE_PREFIX):
        artifact_location = (Path(uri[len(SQLITE_PREFIX) :]).resolve().parent / "artifacts").as_uri()
    try:
        return client.create_experiment(
            name, artifact_location=artifact_location, tags={EXPERIMENT_KIND_TAG: CUSTOM_MODEL_DEVELOPMENT}
        )
    except MlflowException as err:  # another process created it first
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def flatten_config(cfg: DictConfig) -> dict[str, str]:
    flat: dict[str, str] = {}

    def walk(node, prefix: str):
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = str(node)[:6000]

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return flat


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_tags(cfg: DictConfig) -> dict[str, str]:
    m = cfg.model
    return {
        TAG_EXPERIMENT: cfg.experiment,
        TAG_VARIANT: cfg.experiment,
        TAG_PROFILE: cfg.profile,
        TAG_SEED: str(cfg.seed),
        TAG_BRANCHES: ",".join(m.branches),
        TAG_FACE_MODALITY: str(m.face_modality),
        TAG_CAN: str(m.can),
        TAG_STAGES: ",".join(cfg.curriculum.order),
        TAG_FINAL_STAGE: cfg.curriculum.order[-1],
        TAG_GIT_COMMIT: git_commit(),
        MLFLOW_RUN_NAME: f"{cfg.experiment}-seed{cfg.seed}",
    }


def ui_command(uri: str, run_id: str | None = None) -> str:
    """How to browse a run: the `mlflow ui` command, then the run's page in the model-training view.

    MLflow 3.17's UI takes its view from a GenAI / Model training toggle (GenAI by default) rather than from
    the experiment's kind tag; `workflowType=machine_learning` in the page's URL sets the toggle."""
    command = f"mlflow ui --backend-store-uri {uri}"
    if run_id is None:
        return command
    try:
        experiment_id = MlflowClient(uri).get_run(run_id).info.experiment_id
    except (MlflowException, OSError):  # the store is down: the command alone still helps
        return command
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{command}\n  then open {base}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


# Error codes of a store that is down or overloaded; any other MlflowException is a real error.
_OUTAGE_CODES = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "ENDPOINT_NOT_FOUND"}


def _is_outage(err: Exception) -> bool:
    if isinstance(err, MlflowException):
        return err.error_code in _OUTAGE_CODES
    return isinstance(err, (OSError, requests.RequestException, sqlite3.Error))


class RunClient(MlflowClient):
    """The MlflowClient of one training run: a store outage never stops training.

    Every write goes to the store (MLflow retries HTTP calls itself). When one still fails
    because the store is down, the client goes offline: that call and the following ones are
    appended to <run_dir>/tracking_backlog.jsonl (artifact files from outside the run folder
    are copied next to it) until a probe, at most every `probe_every_s`, finds the store back.
    `python -m mm_lightning sync-run RUN_DIR` replays the backlog."""

    def __init__(self, uri: str, run_dir: Path, probe_every_s: float = 30.0):
        super().__init__(uri)
        self.run_dir, self.probe_every_s = Path(run_dir), probe_every_s
        self.backlog = self.run_dir / BACKLOG_FILE
        self._offline_until = 0.0  # monotonic time of the next attempt while the store is down
        self.unlogged = 0
        # fit's SIGINT/SIGTERM handlers raise wherever the main thread is. Raised inside MLflow's SQLAlchemy
        # transaction, that left the transaction open: on SQLite the file stayed locked, and the KILLED status fit
        # writes next went to the backlog, the run left RUNNING in the store. Writes to a database store therefore
        # hold those signals until they end (an HTTP request cut short holds no lock, and may retry for minutes).
        self._hold_signals = urllib.parse.urlparse(uri).scheme.split("+")[0] in DATABASE_ENGINES

    def _guard(self, call, record):
        """call() against the store; on an outage, record() goes to the backlog instead."""
        if time.monotonic() < self._offline_until:
            return self._keep(record())
        held = {signal.SIGINT, signal.SIGTERM} if self._hold_signals else set()
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
        try:
            return call()
        except Exception as err:  # noqa: BLE001 - sorted by _is_outage, the rest re-raised
            if not _is_outage(err):
                raise
            if not self.unlogged:
                print(
                    f"tracking store {self.tracking_uri} unreachable ({str(err).splitlines()[0][:200]}); training "
                    f"goes on, tracking calls are kept in {self.backlog}",
                    file=sys.stderr,
                    flush=True,
                )
            self._offline_until = time.monotonic() + self.probe_every_s
            return self._keep(record())
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)  # a held signal's handler runs here, after the write

    def _keep(self, record: dict) -> None:
        self.unlogged += 1
        with open(self.backlog, "a") as f:
            f.write(json.dumps(record) + "\n")

    def _local_copy(self, local_path: str) -> str:
        """A path relative to the run folder for an artifact file or folder, copied there when outside it."""
        path, run_dir = Path(local_path).resolve(), self.run_dir.resolve()
        if path.is_relative_to(run_dir):
            return str(path.relative_to(run_dir))
        target = run_dir / "unsynced_artifacts" / f"{self.unlogged:06d}" / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if path.is_dir() else shutil.copy2)(path, target)
        return str(target.relative_to(run_dir))

    def log_metric(self, run_id, key, value, timestamp=None, step=None, **kwargs):
        timestamp = timestamp or int(time.time() * 1000)
        return self._guard(
            lambda: super(RunClient, self).log_metric(run_id, key, value, timestamp, step, **kwargs),
            lambda: {
                "call": "log_metric",
                "run_id": run_id,
                "key": key,
                "value": value,
                "timestamp": timestamp,
                "step": step or 0,
            },
        )

    def log_batch(self, run_id, metrics=(), params=(), tags=(), **kwargs):
        return self._guard(
            lambda: super(RunClient, self).log_batch(run_id, metrics, params, tags, **kwargs),
            lambda: {
                "call": "log_batch",
                "run_id": run_id,
                "metrics": [[m.key, m.value, m.timestamp, m.step] for m in metrics],
                "params": [[p.key, p.value] for p in params],
                "tags": [[t.key, t.value] for t in tags],
            },
        )

    def set_tag(self, run_id, key, value, **kwargs):
        return self._guard(
            lambda: super(RunClient, self).set_tag(run_id, key, value, **kwargs),
            lambda: {"call": "set_tag", "run_id": run_id, "key": key, "value": str(value)},
        )

    def log_artifact(self, run_id, local_path, artifact_path=None):
        return self._guard(
            lambda: super(RunClient, self).log_artifact(run_id, local_path, artifact_path),
            lambda: {
                "call": "log_artifact",
                "run_id": run_id,
                "path": self._local_copy(local_path),
                "artifact_path": artifact_path,
            },
        )

    def log_artifacts(self, run_id, local_dir, artifact_path=None):
        return self._guard(
            lambda: super(RunClient, self).log_artifacts(run_id, local_dir, artifact_path),
            lambda: {
                "call": "log_artifacts",
                "run_id": run_id,
                "path": self._local_copy(local_dir),
                "artifact_path": artifact_path,
            },
        )

    def update_run(self, run_id, status=None, name=None):
        return self._guard(
            lambda: super(RunClient, self).update_run(run_id, status, name),
            lambda: {"call": "update_run", "run_id": run_id, "status": status},
        )

    def set_terminated(self, run_id, status=None, end_time=None):
        end_time = end_time or int(time.time() * 1000)
        return self._guard(
            lambda: super(RunClient, self).set_terminated(run_id, status, end_time),
            lambda: {"call": "set_terminated", "run_id": run_id, "status": status or "FINISHED", "end_time": end_time},
        )


def sync_run(run_dir: Path, uri: str | None = None) -> int:
    """Replays <run_dir>/tracking_backlog.jsonl into the store; returns the number of calls.

    Calls that went through are dropped from the backlog as it goes, so an interrupted
    sync can simply be run again."""
    run_dir = Path(run_dir)
    backlog = run_dir / BACKLOG_FILE
    if not backlog.exists():
        return 0
    if uri is None:
        uri = json.loads((run_dir / "run.json").read_text()).get("tracking_uri") or tracking_uri()
    open_store(uri)
    client = MlflowClient(uri)
    lines = backlog.read_text().splitlines()
    for done, line in enumerate(lines):
        try:
            _replay(client, run_dir, json.loads(line))
        except Exception:
            backlog.write_text("".join(f"{rest}\n" for rest in lines[done:]))
            raise
    backlog.unlink()
    shutil.rmtree(run_dir / "unsynced_artifacts", ignore_errors=True)
    return len(lines)


def _replay(client: MlflowClient, run_dir: Path, r: dict) -> None:
    call, run_id = r["call"], r["run_id"]
    if call == "log_metric":
        client.log_metric(run_id, r["key"], r["value"], r["timestamp"], r["step"])
    elif call == "log_batch":
        client.log_batch(
            run_id,
            [Metric(*m) for m in r["metrics"]],
            [Param(*p) for p in r["params"]],
            [RunTag(*t) for t in r["tags"]],
        )
    elif call == "set_tag":
        client.set_tag(run_id, r["key"], r["value"])
    elif call == "log_artifact":
        client.log_artifact(run_id, str(run_dir / r["path"]), r["artifact_path"])
    elif call == "log_artifacts":
        client.log_artifacts(run_id, str(run_dir / r["path"]), r["artifact_path"])
    elif call == "update_run":
        client.update_run(run_id, r["status"])
    elif call == "set_terminated":
        client.set_terminated(run_id, r["status"], r["end_time"])
    else:
        raise ValueError(f"{run_dir / BACKLOG_FILE}: unknown call {call!r}")
