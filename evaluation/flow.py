"""Optical flow estimators for dynamic degree.

An estimator is any callable (frame_a, frame_b) -> flow: two uint8 RGB frames [H, W, 3] in,
float [h, w, 2] out, (dx, dy) in pixels of the flow's own grid. The grid may be smaller than the
frame (a downscaled estimate): dynamic degree derives its threshold from the flow's size.

VBench uses RAFT (20 refinement iterations, things checkpoint). RAFT is not bundled: it needs its
own network code and weights, and the torchvision port cannot be imported here. To score with it,
pass a callable that wraps your RAFT as `DynamicDegree(flow=...)`. The offline default is OpenCV's
Farneback: a classical polynomial-expansion method, smoother than RAFT and less accurate at motion
boundaries. It underestimates large or fast motions (beyond what its pyramid can bridge) and
textureless regions, so its dynamic degree reads lower than RAFT's on the same videos; compare
numbers only within one estimator.
"""

from __future__ import annotations

from typing import Protocol

import cv2
import numpy as np


class FlowEstimator(Protocol):
    def __call__(self, frame_a: np.ndarray, frame_b: np.ndarray) -> np.ndarray: ...


class FarnebackFlow:
    """cv2.calcOpticalFlowFarneback on grayscale frames.

    levels=5 with pyr_scale=0.5 lets the coarsest level (1/16 size) bridge motions of ~30+ px,
    well past VBench's 11.25 px threshold at 480p. max_side shrinks the frames (longest side) first:
    flow magnitudes and the threshold both scale with the image, so the decision is unchanged for
    ideal flow and the cost drops with the pixel count; None keeps VBench's full resolution.
    """

    def __init__(self, max_side: int | None = None, levels: int = 5, winsize: int = 15, iterations: int = 3,
                 poly_n: int = 5, poly_sigma: float = 1.1) -> None:
        self.max_side = max_side
        self.params = (0.5, levels, winsize, iterations, poly_n, poly_sigma, 0)

    def _gray(self, frame: np.ndarray) -> np.ndarray:
        gray = cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY)
        h, w = gray.shape
        if self.max_side and max(h, w) > self.max_side:
            scale = self.max_side / max(h, w)
            gray = cv2.resize(gray, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
        return gray

    def __call__(self, frame_a: np.ndarray, frame_b: np.ndarray) -> np.ndarray:
        return cv2.calcOpticalFlowFarneback(self._gray(frame_a), self._gray(frame_b), None, *self.params)


def build_flow(name: str, max_side: int | None = None) -> FlowEstimator:
    """The estimator a config names; only "farneback" ships (RAFT: see the module docstring)."""
    if name == "farneback":
        return FarnebackFlow(max_side=max_side)
    raise ValueError(f"unknown flow estimator {name!r}; built in: 'farneback' "
                     "(pass any (frame_a, frame_b) -> flow callable to DynamicDegree for RAFT)")
