"""Dynamic degree, following VBench's vbench/dynamic_degree.py rule for rule.

Read at Vchitect/VBench commit 45e79ec (2026-03-23); the file last changed in f9d345a (2024-12-31,
"interval = max(1, round(fps / 8))"). For a video of T frames at `fps`:
    interval  = max(1, round(fps / 8))            keep frames 0, interval, 2*interval, ... (n frames)
    score_j   = mean of the top int(0.05*h*w) flow magnitudes |F_j| between kept frames j and j+1
    thres     = 6 * min(h, w) / 256               (set_params)
    count_num = round(4 * n / 16)                 n counts kept FRAMES (VBench passes len(frames))
    dynamic   = (n - 1 >= 1) and #{j : score_j > thres} >= count_num
round() is Python's half-to-even, as in VBench. h, w: size of the flow grid (VBench: the frame;
the same at full resolution). When count_num is 0 (n <= 2) VBench calls any video with one pair
dynamic; kept here. Dynamic degree = fraction of dynamic videos.
VBench multiplied thres by max(1, 8/fps) from 11abda9 (2024-07-03, "fps<8 bug") until the factor was
dropped again in the multi-GPU rewrite fc4620b (2024-08-17); current VBench has no fps factor.
"""

from __future__ import annotations

import numpy as np

from mm_lightning.evaluation.flow import DISFlow, FlowEstimator
from mm_lightning.evaluation.video_mean import VideoMean


def top5_magnitude(flow: np.ndarray) -> float:
    """Mean of the largest 5% of per-pixel flow magnitudes (VBench's get_score)."""
    magnitude = np.hypot(flow[..., 0], flow[..., 1]).ravel()
    cut = int(magnitude.size * 0.05)
    return float(np.partition(magnitude, magnitude.size - cut)[-cut:].mean())


def vbench_threshold(grid: tuple[int, int]) -> float:
    """VBench's thres for a flow grid of size (h, w): 6 * min(h, w) / 256 (11.25 px at 480x720)."""
    return 6.0 * min(grid) / 256.0


def pair_scores(video: np.ndarray, fps: float, flow: FlowEstimator) -> tuple[list[float], float, int]:
    """(score_j per kept pair, thres, count_num) for one uint8 video [T, H, W, 3]."""
    kept = video[:: max(1, round(fps / 8))]
    scores, grid = [], video.shape[1:3]  # grid: the flow's size once there is one
    for a, b in zip(kept[:-1], kept[1:]):
        field = flow(a, b)  # one field at a time: 48 full-size fields would hold ~130 MB
        grid = field.shape[:2]
        scores.append(top5_magnitude(field))
    return scores, vbench_threshold(grid), round(4 * (len(kept) / 16.0))


class DynamicDegree(VideoMean):
    """Fraction of dynamic videos; `update(video, fps)` per video, `is_dynamic` for one video alone."""

    higher_is_better = True

    def __init__(self, flow: FlowEstimator | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.flow = flow if flow is not None else DISFlow()

    def is_dynamic(self, video: np.ndarray, fps: float) -> bool:
        scores, thres, count_num = pair_scores(video, fps, self.flow)
        return len(scores) >= 1 and sum(s > thres for s in scores) >= count_num

    def update(self, video: np.ndarray, fps: float) -> None:
        self._add_video(float(self.is_dynamic(video, fps)))
