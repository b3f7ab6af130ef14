"""Shared test set-up: one cache of tiny random weights and demo data per session, and a
private MLflow store per test, so that tests never touch the user's ./mlruns."""

import os
import tempfile
from pathlib import Path

import pytest

# Before mm_lightning resolves ${oc.env:MM_LIGHTNING_CACHE}: tiny weights and the demo set
# are written once per session into a temporary cache.
_SESSION_CACHE = Path(tempfile.mkdtemp(prefix="mm_lightning_test_cache_"))
os.environ.setdefault("MM_LIGHTNING_CACHE", str(_SESSION_CACHE))


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch) -> str:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri
