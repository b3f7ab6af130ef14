"""LightningDataModule for one curriculum stage ("image" pairs or "video" clips)."""

from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from mm_lightning.config import FacesConfig
from mm_lightning.data.dataset import FaceDataset, collate
from mm_lightning.data.demo import ensure_demo_dataset
from mm_lightning.data.faces_cache import load_or_build_face_cache
from mm_lightning.data.formats import read_metadata
from mm_lightning.faces import face_analyzer


class MagicMirrorDataModule(L.LightningDataModule):
    """Reads a dataset folder (formats.py), runs or reuses its face cache, serves batches.

    After `setup`, `self.skipped` counts the rows of this stage's kind that the face pass
    excluded, by reason (for logging), and `self.dataset` holds the usable ones.
    """

    def __init__(
        self,
        root: str | None = None,
        cache_dir: str = ".cache/mm_lightning",
        kind: str = "image",
        frames: int = 1,
        height: int = 64,
        width: int = 64,
        batch_size: int = 2,
        num_workers: int = 0,
        clip_image_size: int = 224,
        faces: FacesConfig | None = None,
        seed: int = 0,
        fps: float = 8.0,
        face_probe_frames: int = 16,
    ):
        super().__init__()
        if kind not in ("image", "video"):
            raise ValueError(f'kind must be "image" or "video", got {kind!r}')
        self.root, self.cache_dir, self.kind = root, cache_dir, kind
        self.frames, self.height, self.width, self.fps = frames, height, width, fps
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.clip_image_size, self.face_probe_frames = clip_image_size, face_probe_frames
        self.faces = faces or FacesConfig()
        self.skipped: dict[str, int] = {}

    def _analyzer(self):
        return face_analyzer(self.faces)

    def setup(self, stage: str | None = None):
        # Every rank runs this: demo generation and the face pass are deterministic and write
        # atomically, so ranks racing each other still end with one complete copy.
        root = Path(self.root) if self.root else ensure_demo_dataset(self.cache_dir)
        rows = read_metadata(root)
        backend = (
            self.faces.backend
            if self.faces.backend == "dlib"
            else f"{self.faces.backend}-{self.faces.insightface_model}"
        )
        cache = load_or_build_face_cache(root, rows, backend, self._analyzer, self.face_probe_frames)
        self.skipped = cache.skipped(rows, self.kind)
        self.dataset = FaceDataset(
            root, rows, cache, self.kind, self.frames, self.height, self.width, self.clip_image_size, self.fps
        )
        if len(self.dataset) == 0:
            raise RuntimeError(f"no usable {self.kind} rows in {root} (skipped: {self.skipped})")

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(self.seed),  # same order for the same seed
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate,
            drop_last=False,
        )
