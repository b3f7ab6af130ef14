"""Similarity decay: how much the ID similarity drops from the start of a video to its end."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from mm_lightning.evaluation.video_mean import VideoMean


def similarity_decay(similarities: Sequence[float | None]) -> float:
    """-slope of the least-squares line through (tau_i, s_i), i.e. fitted s(0) - fitted s(1).

    s_i is the ID similarity of the i-th of K uniformly sampled frames and tau_i = i / (K-1) its
    normalised time. Only frames with a face enter the fit: a no-face frame scored as 0 would
    dominate the slope. With F = {i : s_i defined}, |F| >= 2:
        slope = sum_F (tau_i - mean tau)(s_i - mean s) / sum_F (tau_i - mean tau)^2
    NaN with fewer than two face frames. Positive: the identity fades; 0: it holds.
    A line rather than s_first - s_last so that one bad frame at either end does not decide it.
    """
    k = len(similarities)
    points = [(i / (k - 1), s) for i, s in enumerate(similarities) if s is not None] if k > 1 else []
    if len(points) < 2:
        return math.nan
    tau, sim = np.array(points).T
    tau_c = tau - tau.mean()
    return float(-(tau_c @ (sim - sim.mean())) / (tau_c @ tau_c))


class SimilarityDecay(VideoMean):
    """mean over videos of `similarity_decay`; videos with fewer than two face frames are left out."""

    higher_is_better = False

    def update(self, similarities: Sequence[float | None]) -> None:
        self._add_video(similarity_decay(similarities))
