"""The face cache's per-frame 5-point landmarks reach the batch in training-frame pixels (identity-loss crops)."""

import pytest
import torch

from mm_lightning.data import MagicMirrorDataModule


@pytest.mark.slow  # mostly the face pass over the demo data, shared with the other data tests
def test_landmarks_sit_inside_their_face_box(demo_root):
    for kind, frames in (("image", 1), ("video", 5)):
        dm = MagicMirrorDataModule(
            root=str(demo_root),
            kind=kind,
            frames=frames,
            height=40,
            width=56,
            clip_image_size=32,
            batch_size=2,
        )
        dm.setup()
        batch = next(iter(dm.train_dataloader()))
        landmarks, boxes = batch["face_landmarks"], batch["face_boxes"]  # [B, F, 5, 2] pixels, [B, F, 4] in [0, 1]
        assert landmarks.shape == (*boxes.shape[:2], 5, 2) and landmarks.dtype == torch.float32
        pixel_boxes = boxes * torch.tensor([56, 40, 56, 40])
        low, high = pixel_boxes[..., None, :2], pixel_boxes[..., None, 2:]
        slack = 0.25 * (high - low)  # detectors put eyes and mouth inside the box, up to rounding
        assert ((landmarks >= low - slack) & (landmarks <= high + slack)).all()
        eyes = landmarks[..., :2, 0]
        assert (eyes[..., 0] < eyes[..., 1]).all()  # RetinaFace order: the image-left eye first
