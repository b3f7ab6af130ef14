"""Motion smoothness as cross-frame optical-flow consistency (the paper's Table 1 column; lower is better).

The paper (v2, Table 1) gives only the phrase "cross-frame optical flow consistency" and MagicMirror's
0.484 (ConsisID 0.513). Our definition, on the frames dynamic degree keeps (about 8 fps):
    F_t       = flow from kept frame t to t+1 (the configured estimator), t = 0..n-2
    a_t(x)    = |F_t(x + F_{t-1}(x)) - F_{t-1}(x)|    how much the motion of the point at x changes from one
                                                       pair to the next (followed along F_{t-1}), t = 1..n-2
    m_t(x)    = (|F_t(x + F_{t-1}(x))| + |F_{t-1}(x)|) / 2
    MS        = sum_{t,x} a_t(x) / (2 sum_{t,x} m_t(x) + 1 px * pixels * (n-2))
a_t <= 2 m_t, so MS lies in [0, 1): 0 for constant motion (a still video or a steady pan), near 1 when
consecutive flows are unrelated (shuffled frames, a jump cut, flicker read as motion). The 1-px floor in
the denominator keeps a nearly still video with sub-pixel noise from scoring high. NaN below 3 kept
frames. Not the paper's formula (unpublished): compare values only within this implementation.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from mm_lightning.evaluation.flow import DISFlow, FlowEstimator
from mm_lightning.evaluation.video_mean import VideoMean


def motion_smoothness(video: np.ndarray, fps: float, flow: FlowEstimator) -> float:
    """MS of one uint8 video [T, H, W, 3]; frames kept as dynamic degree keeps them."""
    kept = video[:: max(1, round(fps / 8))]
    if len(kept) < 3:
        return math.nan
    change = magnitude = 0.0
    previous = grid = None
    for a, b in zip(kept[:-1], kept[1:]):
        current = flow(a, b)  # [h, w, 2]
        if previous is not None:
            if grid is None:
                grid = np.mgrid[0 : current.shape[0], 0 : current.shape[1]][::-1].transpose(1, 2, 0).astype(np.float32)
            # F_t sampled where each point of frame t-1 went, i.e. at x + F_{t-1}(x); edges replicated.
            followed = cv2.remap(current, grid + previous, None, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
            difference = followed - previous
            change += float(cv2.magnitude(difference[..., 0], difference[..., 1]).sum())
            magnitude += (
                float(
                    cv2.magnitude(followed[..., 0], followed[..., 1]).sum()
                    + cv2.magnitude(previous[..., 0], previous[..., 1]).sum()
                )
                / 2
            )
            magnitude += previous.shape[0] * previous.shape[1] / 2  # the 1-px floor per pixel and pair, once doubled
        previous = current
    return change / (2 * magnitude)


class MotionSmoothness(VideoMean):
    """mean over videos of `motion_smoothness`; update(video, fps). Lower is smoother."""

    higher_is_better = False

    def __init__(self, flow: FlowEstimator | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.flow = flow if flow is not None else DISFlow()

    def update(self, video: np.ndarray, fps: float) -> None:
        self._add_video(motion_smoothness(video, fps, self.flow))
