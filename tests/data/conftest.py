"""Fixtures for the data tests: the session's demo dataset and small hand-made datasets."""

import json
import shutil
from pathlib import Path

import pytest

from mm_lightning.config import load_config
from mm_lightning.data.demo import ensure_demo_dataset
from mm_lightning.data.formats import METADATA


@pytest.fixture(scope="session")
def demo_root() -> Path:
    """The session's demo set, the one `fit` trains on: one demo and one face pass (fit's settings) for all."""
    return ensure_demo_dataset(load_config("full").cache_dir)


@pytest.fixture(scope="session")
def write_dataset(demo_root):
    """write_dataset(root, rows): a dataset folder whose rows point at copies of demo files
    (copies, so tests may damage them)."""
    return lambda root, rows: _write_dataset(root, demo_root, rows)


def _write_dataset(root: Path, demo: Path, rows: list[dict]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for row in rows:
        for rel in [row.get("image"), row.get("video"), *row.get("references", [])]:
            if rel and (demo / rel).is_file() and not (root / rel).exists():
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(demo / rel, root / rel)
    (root / METADATA).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root
