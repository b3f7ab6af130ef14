"""MLflow defaults: where the store lives and what a training run records.

Layout: one MLflow run per `fit`, holding every stage. Metrics are stage-prefixed
(`train/<stage>/loss`, `eval/<stage>/id_similarity`, `data/<stage>/skipped/<reason>`),
so one run can be compared with another per stage in the MLflow UI. The tag
`mm.final_stage` names the stage whose eval metrics stand for the run.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"


def tracking_uri(cfg: DictConfig | None = None) -> str:
    """config > $MLFLOW_TRACKING_URI > ./mlruns/mlflow.db (MLflow 3 refuses a plain file store)."""
    uri = (cfg.tracking.tracking_uri if cfg is not None else None) or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return uri


def ensure_experiment(client: MlflowClient, name: str, uri: str) -> str:
    """Experiment id; a new experiment keeps its artifacts beside a sqlite store."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    if uri.startswith("sqlite:///"):
        artifact_location = (Path(uri[len("sqlite:///"):]).resolve().parent / "artifacts").as_uri()
    return client.create_experiment(name, artifact_location=artifact_location)


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
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_tags(cfg: DictConfig) -> dict[str, str]:
    m = cfg.model
    return {
        "mm.experiment": cfg.experiment,
        "mm.variant": cfg.experiment,
        "mm.profile": cfg.profile,
        "mm.seed": str(cfg.seed),
        "mm.branches": ",".join(m.branches),
        "mm.face_modality": str(m.face_modality),
        "mm.can": str(m.can),
        "mm.stages": ",".join(cfg.curriculum.order),
        "mm.final_stage": cfg.curriculum.order[-1],
        "mm.git_commit": git_commit(),
        "mlflow.runName": f"{cfg.experiment}-seed{cfg.seed}",
    }


def ui_command(uri: str) -> str:
    return f"mlflow ui --backend-store-uri {uri}"


