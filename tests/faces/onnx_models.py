"""A test image for the stand-in detector of mm_lightning/faces/stand_ins.py."""

from __future__ import annotations

import numpy as np

from mm_lightning.faces.stand_ins import CELL, CELL_BOX, CELL_KPS, DET_SIZE


def fake_face_image(height: int = DET_SIZE, width: int = DET_SIZE, cell_x: int = 10, cell_y: int = 6, seed: int = 0):
    """Black RGB image with one bright textured patch the fake detector reports as a face.

    The patch covers detection cell (cell_x, cell_y) of the DET_SIZE frame insightface
    letterboxes the image into. Returns (image, box [4], keypoints [5, 2]) in image pixels.
    """
    # SCRFD._detect_candidates: letterbox into DET_SIZE x DET_SIZE, rescale results by new_height / height.
    new_height = DET_SIZE if height > width else int(DET_SIZE * height / width)
    scale = new_height / height
    origin = np.array([cell_x, cell_y], dtype=np.float32) * CELL
    x0, y0 = np.floor(origin / scale).astype(int)
    x1, y1 = np.ceil((origin + CELL) / scale).astype(int)
    image = np.zeros((height, width, 3), dtype=np.uint8)
    # Random texture, warm-tinted (channel means differ) so that colour order changes the embedding.
    low = np.array([220, 190, 160])
    image[y0:y1, x0:x1] = np.random.default_rng(seed).integers(low, 256, (y1 - y0, x1 - x0, 3))
    box = (np.tile(origin, 2) + CELL_BOX * CELL) / scale
    kps = (origin + CELL_KPS * CELL) / scale
    return image, box.astype(np.float32), kps.astype(np.float32)
