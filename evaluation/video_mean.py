"""Shared state for metrics that give one value per video and report their mean over videos."""

from __future__ import annotations

import math

import torch
from torchmetrics import Metric


class VideoMean(Metric):
    """mean_v x_v over the videos v whose value x_v is defined.

    A subclass's `update` scores one video and passes the value to `_add_video`. NaN marks a value
    that is undefined for that video (e.g. FM_inter with fewer than two face frames): it leaves the
    mean untouched instead of pulling it towards 0. Calling the metric (`forward`) on one video
    returns that video's value and accumulates it, so each video is scored once.
    """

    full_state_update = False  # states are sums: forward may merge a one-video state into the total

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        # float64: sums over thousands of videos stay exact enough to match a single-process run.
        self.add_state("value_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("videos", torch.tensor(0), dist_reduce_fx="sum")

    def _add_video(self, value: float) -> None:
        if not math.isnan(value):
            self.value_sum += value
            self.videos += 1

    def compute(self) -> torch.Tensor:
        if self.videos == 0:
            return torch.tensor(float("nan"), dtype=torch.float64)
        return self.value_sum / self.videos
