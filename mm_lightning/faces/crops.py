"""Face crops and face-region masks from detected boxes; ArcFace-aligned crops from 5 landmarks."""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
from torch.nn import functional as F

from mm_lightning.faces.analysis import Face


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


# insightface's ArcFace template: where the 5 points (RetinaFace order) sit in a 112 x 112 crop.
ARCFACE_TEMPLATE = ((38.2946, 51.6963), (73.5318, 51.5014), (56.0252, 71.7366), (41.5493, 92.3655), (70.7299, 92.2041))


def aligned_face_crops(images: torch.Tensor, landmarks: torch.Tensor, size: int = 112) -> torch.Tensor:
    """ArcFace-aligned crops, differentiable in the images (torch; for the identity loss).

    images [B, 3, H, W]; landmarks [B, 5, 2] in pixels of those images (RetinaFace order)
    -> [B, 3, size, size]. As insightface's `norm_crop`: the least-squares similarity that
    maps the landmarks onto ARCFACE_TEMPLATE (scaled to `size`), applied here through
    `affine_grid` / `grid_sample` so the gradient reaches the pixels. Pixel centres sit at
    integer coordinates, as in OpenCV.
    """
    batch, _, height, width = images.shape
    dtype = torch.float64  # the 4-parameter fit is tiny; double keeps it exact
    dst = torch.tensor(ARCFACE_TEMPLATE, dtype=dtype, device=images.device) * (size / 112)
    src = landmarks.to(dtype)
    # Similarity crop -> image: src = [[a, -b], [b, a]] dst + t, fitted by least squares.
    x, y = dst[:, 0].expand(batch, 5), dst[:, 1].expand(batch, 5)
    one, zero = torch.ones_like(x), torch.zeros_like(x)
    rows = torch.cat([torch.stack([x, -y, one, zero], -1), torch.stack([y, x, zero, one], -1)], 1)  # [B, 10, 4]
    target = torch.cat([src[..., 0], src[..., 1]], 1).unsqueeze(-1)  # [B, 10, 1]
    a, b, tx, ty = torch.linalg.lstsq(rows, target).solution.squeeze(-1).unbind(-1)
    crop_to_image = torch.zeros(batch, 3, 3, dtype=dtype, device=images.device)
    crop_to_image[:, 0] = torch.stack([a, -b, tx], -1)
    crop_to_image[:, 1] = torch.stack([b, a, ty], -1)
    crop_to_image[:, 2, 2] = 1

    def from_normalised(w: int, h: int) -> torch.Tensor:  # [-1, 1] coords (align_corners=False) -> pixels
        matrix = [[w / 2, 0, (w - 1) / 2], [0, h / 2, (h - 1) / 2], [0, 0, 1]]
        return torch.tensor(matrix, dtype=dtype, device=images.device)

    theta = torch.linalg.inv(from_normalised(width, height)) @ crop_to_image @ from_normalised(size, size)
    grid = F.affine_grid(theta[:, :2].to(images.dtype), [batch, 3, size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
