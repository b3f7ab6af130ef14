"""Facial motion from 5-point landmarks (RetinaFace order): FM_ref and FM_inter.

Both compare landmark sets P = (p_1..p_5), p_k = (x_k, y_k) in pixels, after two steps:
    normalise:  q_k = (x_k / W, y_k / H)        W, H: width and height of the image P comes from,
                                                so every image lives in [0,1]^2 whatever its size
    align:      a_k = q_k - (1/5) sum_j q_j      subtract the centroid (position alignment)
and the distance between two aligned sets is
    d(A, B) = sum_k ||a_k - b_k||_2              (reduction="sum"; "mean" divides by 5)
The paper says neither sum nor mean over points, nor how its FM_ref 0.73 / FM_inter 0.61 are
scaled: frame-normalised distances of a face that fills a fraction of the frame are far smaller
(~0.1 summed, on our test clips). "sum" is the default, the closer of the two; `reduction` switches.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np

from evaluation.video_mean import VideoMean

Landmarks = np.ndarray  # [5, 2] pixels (x, y)


def aligned(landmarks: Landmarks, width: int, height: int) -> np.ndarray:
    """Normalised by the image size, centroid moved to the origin."""
    q = np.asarray(landmarks, dtype=np.float64).reshape(5, 2) / np.array([width, height], dtype=np.float64)
    return q - q.mean(axis=0)


def landmark_distance(a: np.ndarray, b: np.ndarray, reduction: str = "sum") -> float:
    """d(A, B) over aligned landmark sets: per-point Euclidean distance, summed or averaged."""
    per_point = np.linalg.norm(a - b, axis=1)
    if reduction == "sum":
        return float(per_point.sum())
    if reduction == "mean":
        return float(per_point.mean())
    raise ValueError(f"unknown reduction {reduction!r}; use 'sum' or 'mean'")


def fm_ref(frame_landmarks: Sequence[Landmarks | None], frame_size: tuple[int, int],
           reference_landmarks: Sequence[tuple[Landmarks, tuple[int, int]]], reduction: str = "sum") -> float:
    """FM_ref = mean over face frames i and references r of d(A_i, R_r).

    frame_size and each reference's size are (H, W). NaN when no sampled frame has a face.
    """
    h, w = frame_size
    refs = [aligned(lm, size[1], size[0]) for lm, size in reference_landmarks]
    dists = [landmark_distance(aligned(lm, w, h), ref, reduction)
             for lm in frame_landmarks if lm is not None for ref in refs]
    return float(np.mean(dists)) if dists else math.nan


def fm_inter(frame_landmarks: Sequence[Landmarks | None], frame_size: tuple[int, int], reduction: str = "sum") -> float:
    """FM_inter = max over pairs i < j of face frames of d(A_i, A_j); NaN with fewer than two.

    The maximum grows with the number of frames compared, so compare runs at one frames_sampled.
    """
    h, w = frame_size
    sets = [aligned(lm, w, h) for lm in frame_landmarks if lm is not None]
    if len(sets) < 2:
        return math.nan
    return max(landmark_distance(a, b, reduction) for a, b in itertools.combinations(sets, 2))


class FacialMotionRef(VideoMean):
    """FM_ref (`fm_ref`) per video, mean over videos. Higher: more facial motion relative to the reference."""

    def __init__(self, reduction: str = "sum", **kwargs) -> None:
        super().__init__(**kwargs)
        self.reduction = reduction

    def update(self, frame_landmarks: Sequence[Landmarks | None], frame_size: tuple[int, int],
               reference_landmarks: Sequence[tuple[Landmarks, tuple[int, int]]]) -> None:
        self._add_video(fm_ref(frame_landmarks, frame_size, reference_landmarks, self.reduction))


class FacialMotionInter(VideoMean):
    """FM_inter (`fm_inter`) per video, mean over videos. Higher: the face moves more within the video."""

    def __init__(self, reduction: str = "sum", **kwargs) -> None:
        super().__init__(**kwargs)
        self.reduction = reduction

    def update(self, frame_landmarks: Sequence[Landmarks | None], frame_size: tuple[int, int]) -> None:
        self._add_video(fm_inter(frame_landmarks, frame_size, self.reduction))
