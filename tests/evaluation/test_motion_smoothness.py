"""Motion smoothness (flow consistency across consecutive pairs) on clips with a known answer."""

import math

import numpy as np
import pytest

from mm_lightning.evaluation.flow import DISFlow
from mm_lightning.evaluation.motion_smoothness import MotionSmoothness, motion_smoothness
from mm_lightning.evaluation.synthetic import moving_patch, translating_texture

SIZE = (240, 360)


@pytest.fixture(scope="module")
def pan():
    return translating_texture(8.0, num_frames=9, size=SIZE)


def test_steady_motion_is_smooth_and_still_video_is_zero(pan):
    flow = DISFlow()
    assert motion_smoothness(pan, 8.0, flow) < 0.05  # measured 0.006
    assert motion_smoothness(moving_patch(8.0, num_frames=9, size=SIZE, patch=80), 8.0, flow) < 0.08  # 0.04
    assert motion_smoothness(np.repeat(pan[:1], 9, axis=0), 8.0, flow) == 0.0


def test_shuffled_frames_and_a_jump_cut_are_not(pan):
    flow = DISFlow()
    shuffled = pan[np.random.default_rng(0).permutation(len(pan))]
    cut = np.concatenate([translating_texture(4.0, 5, SIZE, seed=0), translating_texture(4.0, 4, SIZE, seed=5)])
    assert motion_smoothness(shuffled, 8.0, flow) > 0.5  # measured 0.86
    assert motion_smoothness(cut, 8.0, flow) > 0.2  # one cut in 8 pairs: measured 0.37


def test_frames_are_kept_as_dynamic_degree_keeps_them(pan):
    # 24 fps keeps every third frame: 3 of 9 frames, one pair of pairs. Fewer than 3 kept frames: undefined.
    assert motion_smoothness(pan, 24.0, DISFlow()) < 0.05
    assert math.isnan(motion_smoothness(pan[:2], 8.0, DISFlow()))
    metric = MotionSmoothness()
    metric.update(pan[:2], 8.0)
    metric.update(pan, 8.0)
    assert float(metric.compute()) == pytest.approx(motion_smoothness(pan, 8.0, DISFlow()))
