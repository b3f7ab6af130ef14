"""Datasets for MagicMirror training: the on-disk format, the face cache, the demo data."""

from mm_lightning.data.datamodule import MagicMirrorDataModule
from mm_lightning.data.dataset import FaceDataset, collate
from mm_lightning.data.demo import ensure_demo_dataset
from mm_lightning.data.faces_cache import FaceCache, load_or_build_face_cache
from mm_lightning.data.formats import Row, read_metadata

__all__ = [
    "MagicMirrorDataModule",
    "FaceDataset",
    "collate",
    "ensure_demo_dataset",
    "FaceCache",
    "load_or_build_face_cache",
    "Row",
    "read_metadata",
]
