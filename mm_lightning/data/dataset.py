"""Training samples: clip (or image) + caption + reference face + identity embedding + face mask.

Face boxes and embeddings come from the face cache (faces_cache.py); loading never runs a
detector. A sample whose files changed since the cache was built comes back as None and
`collate` drops it, so one bad file never stops training.
"""

import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from mm_lightning.data.faces_cache import FaceCache
from mm_lightning.data.formats import Row
from mm_lightning.data.media import (
    crop_boxes,
    crop_geometry,
    open_video,
    read_image,
    resize_center_crop,
    sample_frame_indices,
)
from mm_lightning.faces import face_crop, face_mask

log = logging.getLogger(__name__)


class FaceDataset(Dataset):
    """Usable rows of one kind ("image": stage-1 pairs, frames=1; "video": stage-2 clips).

    Video clips are sampled at `fps` from a random start, falling back to a uniform stride
    over the whole clip when it is too short. Frames are resized to cover height x width and
    center-cropped.
    """

    def __init__(
        self,
        root: str | Path,
        rows: list[Row],
        cache: FaceCache,
        kind: str,
        frames: int,
        height: int,
        width: int,
        clip_image_size: int,
        fps: float = 8.0,
    ):
        self.root, self.cache, self.kind = Path(root), cache, kind
        self.frames = 1 if kind == "image" else frames
        self.height, self.width, self.clip_image_size, self.fps = height, width, clip_image_size, fps
        # (row, index into the cache): rows of this kind that passed the face pass
        self.items = [(row, i) for i, row in enumerate(rows) if row.kind == kind and not cache.reason[i]]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, idx: int) -> dict | None:
        row, i = self.items[idx]
        try:
            return self._load(row, i)
        except Exception as e:  # file replaced, truncated or deleted after the face cache was built
            log.warning("dropping %s (metadata line %d): %s", row.media, row.line, e)
            return None

    def _load(self, row: Row, i: int) -> dict:
        boxes = self.cache.target_boxes(i)  # [n_stored_frames, 4] stored-frame pixels
        landmarks = self.cache.target_landmarks(i)  # [n_stored_frames, 5, 2] stored-frame pixels
        if row.kind == "image":
            frames, ref_image = read_image(self.root / row.media)[None], None  # [1, h, w, 3]
        else:
            video = open_video(self.root / row.media)
            if len(video) != len(boxes):
                raise ValueError(f"{len(video)} frames, the face cache has {len(boxes)}: file changed")
            native_fps = row.fps or video.get_avg_fps()
            idx = sample_frame_indices(len(video), native_fps, self.frames, self.fps, torch.rand(()).item())
            keyframe = [row.keyframe] if self.cache.ref_index[i] < 0 else []
            decoded = video.get_batch(idx + keyframe).asnumpy()  # [F (+1), h, w, 3] uint8
            frames, boxes, landmarks = decoded[: len(idx)], boxes[idx], landmarks[idx]
            ref_image = decoded[-1] if keyframe else None
        if ref_image is None:
            ref_image = read_image(self.root / row.references[self.cache.ref_index[i]])

        h, w = frames.shape[1:3]
        H, W = self.height, self.width
        pixels = np.stack([resize_center_crop(f, H, W) for f in frames])  # [F, H, W, 3] uint8
        boxes = crop_boxes(boxes, h, w, H, W)  # [F, 4] training-frame pixels
        scale, left, top = crop_geometry(h, w, H, W)
        landmarks = landmarks * scale - np.array([left, top], np.float32)  # [F, 5, 2] training-frame pixels
        mask = np.stack([face_mask(H, W, b) for b in boxes])  # [F, H, W]
        ref = face_crop(ref_image, self.cache.reference_face(i), self.clip_image_size)  # [S, S, 3] uint8
        return {
            "pixels": torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1,  # [F, 3, H, W] in [-1, 1]
            "caption": row.caption,
            "ref_pixels": torch.from_numpy(ref).permute(2, 0, 1).float() / 255,  # [3, S, S] in [0, 1]
            "id_embedding": torch.from_numpy(self.cache.embedding[i].copy()),  # [D]
            "face_mask": torch.from_numpy(mask)[:, None],  # [F, 1, H, W]
            "face_boxes": torch.from_numpy(boxes / np.array([W, H, W, H], np.float32)),  # [F, 4] in [0, 1]
            "face_landmarks": torch.from_numpy(landmarks.astype(np.float32)),  # [F, 5, 2] training-frame pixels
        }


def collate(samples: list[dict | None]) -> dict | None:
    """Stack samples into a batch, dropping failed (None) ones.

    The batch has the sample keys stacked (captions as a list) plus "dropped": how many
    samples of this batch failed to load. None when all of them failed: the training step
    should skip such a batch.
    """
    good = [s for s in samples if s is not None]
    if not good:
        return None
    batch = {k: [s[k] for s in good] if k == "caption" else torch.stack([s[k] for s in good]) for k in good[0]}
    batch["dropped"] = len(samples) - len(good)
    return batch
