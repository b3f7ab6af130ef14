"""Which frames the per-frame metrics look at."""

from __future__ import annotations

import numpy as np


def uniform_indices(num_frames: int, num_samples: int) -> np.ndarray:
    """`num_samples` frame indices spread evenly over [0, num_frames-1], first and last included.

    index_i = round(i * (num_frames - 1) / (num_samples - 1)); every frame when the video is shorter.
    """
    if num_frames <= num_samples:
        return np.arange(num_frames)
    return np.linspace(0, num_frames - 1, num_samples).round().astype(int)
