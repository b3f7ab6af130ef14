"""Face crops and face-region masks from detected boxes."""

from __future__ import annotations

import math

import cv2
import numpy as np

from .analysis import Face


def face_crop(image: np.ndarray, face: Face, size: int, margin: float = 0.3) -> np.ndarray:
    """Square crop centred on the face box, resized to ``size`` x ``size`` (uint8 RGB).

    The square's side is the box's longer side plus ``margin`` of it on each side; parts
    that fall outside the image are zero-padded so the face stays centred.
    """
    x1, y1, x2, y2 = (float(v) for v in face.box)
    side = max(1, round(max(x2 - x1, y2 - y1) * (1 + 2 * margin)))
    left, top = round((x1 + x2 - side) / 2), round((y1 + y2 - side) / 2)
    height, width = image.shape[:2]
    pad = max(0, -left, -top, left + side - width, top + side - height)
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0))) if pad else image
    crop = padded[top + pad : top + pad + side, left + pad : left + pad + side]
    interpolation = cv2.INTER_AREA if side > size else cv2.INTER_CUBIC
    return cv2.resize(np.ascontiguousarray(crop), (size, size), interpolation=interpolation)


def face_mask(height: int, width: int, box, dilate: float = 0.1) -> np.ndarray:
    """[H, W] float32 mask, 1 inside ``box`` grown by ``dilate`` of its size on each side."""
    x1, y1, x2, y2 = (float(v) for v in box)
    dx, dy = (x2 - x1) * dilate, (y2 - y1) * dilate
    mask = np.zeros((height, width), dtype=np.float32)
    mask[
        max(0, math.floor(y1 - dy)) : max(0, math.ceil(y2 + dy)),
        max(0, math.floor(x1 - dx)) : max(0, math.ceil(x2 + dx)),
    ] = 1.0
    return mask
