"""Facial motion from 5-point landmarks (RetinaFace order): FM_ref and FM_inter, in two normalisations.

The paper (v2, Sec. 4.2 and A.4): FM uses RetinaFace's five landmarks and is the "L2 distance between
the normalized coordinates" "after position alignment"; FM_ref, against the reference, is "computed on
aspect-ratio-normalized frames", FM_inter, the largest distance between two frames of a video, "on
original frames". Both compare landmark sets P = (p_1..p_5), p_k = (x_k, y_k) in pixels.

normalise="frame" (`fm_ref`, `fm_inter`: the paper's columns, comparable with its tables):
    q_k = (x_k / W, y_k / H)     W, H: width and height of the image P comes from
    a_k = q_k - (1/5) sum_j q_j  subtract the centroid (position alignment)
Assumptions the wording leaves open:
- "aspect-ratio-normalized": dividing x by W and y by H, so the square reference and the 3:2 frame both
  live in [0,1]^2; "original frames" for FM_inter: no resizing, and since the frames of one video share
  their size the same division is kept, so FM_ref and FM_inter share a scale;
- "position alignment": centroid subtraction (no rotation or scale alignment);
- the L2 distance of two sets: sum over the 5 points of the per-point Euclidean distance (`reduction`
  "sum", default; "mean" divides by 5): the paper says neither, nor how its FM_ref 0.730 / FM_inter 0.610
  (v2) or FM_inter 3.040 (v1) are scaled, so they cannot be reproduced from the wording alone;
- FM_ref averages over face frames and references; FM_inter is a maximum over pairs of face frames.
This measures framing as much as faces: the same photo, still, at 0.4x the reference's face size reads
FM_ref ~0.2 with no motion, and a rigid zoom reads as much FM_inter as a change of expression.

normalise="face" (`fm_ref_face`, `fm_inter_face`: ours, to tell facial motion from framing):
    a_k = (p_k - (1/5) sum_j p_j) / ||p_left_eye - p_right_eye||     in each image's own pixels
The face's own size, not the frame's, sets the unit, so the same face at any scale or position in any
frame reads 0, and a rigid zoom or pan reads 0 within a video. Inter-ocular distance rather than the
RMS radius of the five points: the radius includes the mouth corners and nose, so opening or widening
the mouth would grow the unit and divide away part of the very motion FM is meant to see; the eye
centres barely move with expressions, and inter-ocular distance is the usual unit of landmark error
(300-W). What remains is expression, in-plane rotation and out-of-plane head turns (a yaw shortens the
inter-ocular distance by cos(yaw), which reads as motion too).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np

from mm_lightning.evaluation.video_mean import VideoMean

Landmarks = np.ndarray  # [5, 2] pixels (x, y)
NORMALISATIONS = ("frame", "face")


def aligned(landmarks: Landmarks, width: int, height: int, normalise: str = "frame") -> np.ndarray:
    """[5, 2] landmarks in the chosen unit ("frame": W and H; "face": inter-ocular distance), centroid at 0."""
    p = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    if normalise == "frame":
        q = p / np.array([width, height], dtype=np.float64)
        return q - q.mean(axis=0)
    if normalise == "face":
        return (p - p.mean(axis=0)) / max(float(np.linalg.norm(p[0] - p[1])), 1e-6)
    raise ValueError(f"unknown FM normalisation {normalise!r}; use one of {NORMALISATIONS}")


def landmark_distance(a: np.ndarray, b: np.ndarray, reduction: str = "sum") -> float:
    """d(A, B) over aligned landmark sets: per-point Euclidean distance, summed or averaged."""
    per_point = np.linalg.norm(a - b, axis=1)
    if reduction == "sum":
        return float(per_point.sum())
    if reduction == "mean":
        return float(per_point.mean())
    raise ValueError(f"unknown reduction {reduction!r}; use 'sum' or 'mean'")


def fm_ref(
    frame_landmarks: Sequence[Landmarks | None],
    frame_size: tuple[int, int],
    reference_landmarks: Sequence[tuple[Landmarks, tuple[int, int]]],
    reduction: str = "sum",
    normalise: str = "frame",
) -> float:
    """FM_ref = mean over face frames i and references r of d(A_i, R_r).

    frame_size and each reference's size are (H, W). NaN when no sampled frame has a face.
    """
    h, w = frame_size
    refs = [aligned(lm, size[1], size[0], normalise) for lm, size in reference_landmarks]
    dists = [
        landmark_distance(aligned(lm, w, h, normalise), ref, reduction)
        for lm in frame_landmarks
        if lm is not None
        for ref in refs
    ]
    return float(np.mean(dists)) if dists else math.nan


def fm_inter(
    frame_landmarks: Sequence[Landmarks | None],
    frame_size: tuple[int, int],
    reduction: str = "sum",
    normalise: str = "frame",
) -> float:
    """FM_inter = max over pairs i < j of face frames of d(A_i, A_j); NaN with fewer than two.

    The maximum grows with the number of frames compared, so compare runs at one frames_sampled.
    """
    h, w = frame_size
    sets = [aligned(lm, w, h, normalise) for lm in frame_landmarks if lm is not None]
    if len(sets) < 2:
        return math.nan
    return max(landmark_distance(a, b, reduction) for a, b in itertools.combinations(sets, 2))


class FacialMotionRef(VideoMean):
    """FM_ref per video, mean over videos. Higher: more facial motion relative to the reference.

    normalise="frame": `fm_ref` (the paper's wording); "face": `fm_ref_face`.
    """

    def __init__(self, reduction: str = "sum", normalise: str = "frame", **kwargs) -> None:
        super().__init__(**kwargs)
        self.reduction, self.normalise = reduction, normalise

    def update(
        self,
        frame_landmarks: Sequence[Landmarks | None],
        frame_size: tuple[int, int],
        reference_landmarks: Sequence[tuple[Landmarks, tuple[int, int]]],
    ) -> None:
        self._add_video(fm_ref(frame_landmarks, frame_size, reference_landmarks, self.reduction, self.normalise))


class FacialMotionInter(VideoMean):
    """FM_inter per video, mean over videos. Higher: the face moves more within the video.

    normalise="frame": `fm_inter` (the paper's wording); "face": `fm_inter_face`.
    """

    def __init__(self, reduction: str = "sum", normalise: str = "frame", **kwargs) -> None:
        super().__init__(**kwargs)
        self.reduction, self.normalise = reduction, normalise

    def update(self, frame_landmarks: Sequence[Landmarks | None], frame_size: tuple[int, int]) -> None:
        self._add_video(fm_inter(frame_landmarks, frame_size, self.reduction, self.normalise))
