"""Shared test set-up: one cache of tiny random weights and demo data per session, a
private MLflow store per test, so that tests never touch the user's ./mlruns, and one
finished `fit` that several end-to-end tests read."""

import json
import os
import tempfile
from pathlib import Path

import pytest

from tests.helpers import FINISHED_FIT_STEPS, run_cli

# Before mm_lightning resolves ${oc.env:MM_LIGHTNING_CACHE}: tiny weights and the demo set
# are written once per session into a temporary cache.
_SESSION_CACHE = Path(tempfile.mkdtemp(prefix="mm_lightning_test_cache_"))
os.environ.setdefault("MM_LIGHTNING_CACHE", str(_SESSION_CACHE))


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch) -> str:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(scope="session")
def finished_fit(tmp_path_factory):
    """One `python -m mm_lightning fit --experiment full` with evaluation (and the reliance probe every 4 steps),
    in a fresh folder: (folder, MLflow run id, the final checkpoint, the finished command)."""
    workdir = tmp_path_factory.mktemp("fit_full")
    steps = [f"curriculum.stages.{stage}.max_steps={n}" for stage, n in FINISHED_FIT_STEPS.items()]
    result = run_cli(workdir, "fit", "--experiment", "full", *steps, "eval.reliance_every_n_steps=4")
    (run_dir,) = (workdir / "runs" / "full").iterdir()
    run_id = json.loads((run_dir / "run.json").read_text())["mlflow_run_id"]
    return workdir, run_id, run_dir / "checkpoints" / "video_finetune" / "final.ckpt", result
