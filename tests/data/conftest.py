"""Fixtures for the data tests: one demo dataset per session and small hand-made datasets."""

import json
import shutil
from pathlib import Path

import pytest

from mm_lightning.data.demo import ensure_demo_dataset
from mm_lightning.data.formats import METADATA


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    return ensure_demo_dataset(tmp_path_factory.mktemp("demo_cache"))


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
