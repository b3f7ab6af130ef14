import importlib.util

import numpy as np
import pytest

from mm_lightning.evaluation.dynamic_degree import DynamicDegree, pair_scores, top5_magnitude
from mm_lightning.evaluation.flow import DISFlow, FarnebackFlow, build_flow
from mm_lightning.evaluation.synthetic import moving_patch, translating_texture


class ConstantFlow:
    """Flow of magnitude magnitudes[j] everywhere for the j-th pair it is asked about."""

    def __init__(self, magnitudes):
        self.magnitudes, self.calls = list(magnitudes), 0

    def __call__(self, a, b):
        value = self.magnitudes[self.calls]
        self.calls += 1
        return np.full((*a.shape[:2], 2), [value, 0.0], dtype=np.float32)


def video(num_frames, size=256):
    return np.zeros((num_frames, size, size, 3), np.uint8)


def test_top5_is_mean_of_largest_five_percent():
    flow = np.zeros((10, 100, 2), np.float32)
    flow.reshape(-1, 2)[:50, 1] = 4.0  # 50 of 1000 pixels = exactly the top 5%
    assert top5_magnitude(flow) == pytest.approx(4.0)
    flow.reshape(-1, 2)[:25, 1] = 0.0
    assert top5_magnitude(flow) == pytest.approx(2.0)


def test_static_video_is_not_dynamic():
    metric = DynamicDegree()
    frames = np.repeat(translating_texture(0.0)[:1], 17, axis=0)
    assert not metric.is_dynamic(frames, 8.0)
    metric.update(frames, 8.0)
    assert float(metric.compute()) == 0.0


@pytest.mark.parametrize("shift, dynamic", [(5.0, False), (8.0, True)])
def test_translated_texture_against_threshold(shift, dynamic):
    # 256 px frames at 8 fps: thres = 6 px. DIS reads whole-frame shifts up to ~15% high: the top 5%
    # include the column of new texture entering at the edge, where no flow is defined.
    frames = translating_texture(shift, num_frames=17, size=256)
    scores, thres, count_num = pair_scores(frames, 8.0, DynamicDegree().flow)
    assert thres == 6.0 and count_num == 4 and len(scores) == 16
    assert np.median(scores) == pytest.approx(shift * 1.07, rel=0.08)
    assert DynamicDegree().is_dynamic(frames, 8.0) is dynamic


def test_count_rule_matches_vbench():
    # 17 kept frames -> count_num = round(4 * 17 / 16) = 4: four pairs above thres suffice, three do not.
    above, below = 6.5, 5.9
    assert DynamicDegree(flow=ConstantFlow([above] * 4 + [below] * 12)).is_dynamic(video(17), 8.0)
    assert not DynamicDegree(flow=ConstantFlow([above] * 3 + [below] * 13)).is_dynamic(video(17), 8.0)
    # Strictly greater than thres, as VBench.
    assert not DynamicDegree(flow=ConstantFlow([6.0] * 16)).is_dynamic(video(17), 8.0)


def test_fps_sets_the_interval_not_the_threshold():
    # 24 fps: every 3rd frame (interval round(24/8) = 3).
    flow = ConstantFlow([0.0] * 100)
    scores, thres, count_num = pair_scores(video(49), 24.0, flow)
    assert len(scores) == 16 and thres == 6.0 and count_num == round(4 * 17 / 16)
    # 4 fps: every frame, and the threshold stays 6*256/256 as in current VBench (no max(1, 8/fps) factor).
    scores, thres, _ = pair_scores(video(9), 4.0, ConstantFlow([0.0] * 8))
    assert len(scores) == 8 and thres == 6.0
    assert DynamicDegree(flow=ConstantFlow([9.0] * 8)).is_dynamic(video(9), 4.0)


def test_threshold_follows_flow_grid():
    # A flow estimated at half size is compared with a threshold at half size.
    half = lambda a, b: np.zeros((a.shape[0] // 2, a.shape[1] // 2, 2), np.float32)  # noqa: E731
    _, thres, _ = pair_scores(video(3, size=512), 8.0, half)
    assert thres == 6.0


def test_score_is_fraction_of_dynamic_videos():
    metric = DynamicDegree(flow=ConstantFlow([9.0] * 16 + [0.0] * 32))
    for _ in range(3):
        metric.update(video(17), 8.0)
    assert float(metric.compute()) == pytest.approx(1 / 3)


@pytest.mark.parametrize("shift, dynamic", [(9.0, False), (14.0, True)])
def test_downscaled_flow_decides_like_full_size(shift, dynamic):
    # 480 px frames: thres 11.25 px at full size, 5.6 px on the 240 px flow grid.
    frames = translating_texture(shift, num_frames=9, size=480)
    for flow in (FarnebackFlow(), FarnebackFlow(max_side=240), DISFlow(), DISFlow(max_side=240)):
        assert DynamicDegree(flow=flow).is_dynamic(frames, 8.0) is dynamic


@pytest.mark.parametrize("shift", [4, 10, 16, 24, 48, 64])
def test_local_patch_motion_is_read_at_every_speed(shift):
    # A 160-px patch moving `shift` px/frame over a static 480x720 background (7.4% of the pixels move,
    # so exact flow's top 5% is exactly `shift`); thres = 11.25 px. Farneback (the old default, at 360 px)
    # read 48 px as ~6 px: a clearly dynamic video called static.
    frames = moving_patch(shift, num_frames=5)
    scores, thres, _ = pair_scores(frames, 8.0, DynamicDegree().flow)
    assert thres == 11.25
    if shift <= 48:
        assert np.median(scores) == pytest.approx(shift, rel=0.05, abs=0.2)
    else:  # 64 px, 40% of the patch per frame: read 23-64 px depending on where the patch is
        assert min(scores) > 2 * thres
    assert DynamicDegree().is_dynamic(frames, 8.0) is (shift > thres)


def test_build_flow_names():
    assert isinstance(build_flow("dis"), DISFlow) and isinstance(build_flow("farneback", 360), FarnebackFlow)
    with pytest.raises(FileNotFoundError, match="flow_weights"):
        build_flow("raft")
    with pytest.raises(ValueError, match="unknown flow estimator"):
        build_flow("lucas-kanade")


@pytest.mark.skipif(
    importlib.util.find_spec("torchvision") is None,
    reason="torchvision does not import beside this CPU torch; run on the GPU machine",
)
def test_raft_plumbing_with_random_weights(tmp_path):
    # Random weights test the plumbing only (padding, [-1, 1] input, grid, 20 iterations), not accuracy.
    import torch
    from torchvision.models.optical_flow import raft_large

    torch.manual_seed(0)
    torch.save(raft_large(weights=None, progress=False).state_dict(), tmp_path / "raft.pth")
    flow = build_flow("raft", weights=str(tmp_path / "raft.pth"))
    frames = moving_patch(8, num_frames=2, size=(100, 150), patch=40)  # 100x150: padded to 128x152
    field = flow(frames[0], frames[1])
    assert field.shape == (100, 150, 2) and field.dtype == np.float32 and np.isfinite(field).all()
    scores, thres, count_num = pair_scores(frames, 8.0, flow)
    assert len(scores) == 1 and thres == 6 * 100 / 256 and count_num == 0
