"""Inception score: the left-out path (torch-fidelity needs torchvision); the arithmetic on a stand-in classifier."""

import numpy as np
import pytest
import torch

from mm_lightning.evaluation.inception_score import FrameInceptionScore, inception_unavailable_reason
from mm_lightning.evaluation.suite import EvaluatorConfig, VideoEvaluator


class BrightnessClassifier(torch.nn.Module):
    """Confident logits for class = a frame's mean brightness // 26 (10 classes): a known p(y|x)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # uint8 [N, 3, H, W] -> [N, 10]
        classes = (images.float().mean(dim=(1, 2, 3)) // 26).long().clamp(max=9)
        return 50.0 * torch.nn.functional.one_hot(classes, 10).float()


def frames(levels):
    return np.stack([np.full((8, 8, 3), level, np.uint8) for level in levels])


def test_inception_score_known_answers():
    # K equally likely confident classes: IS = K; one class for every frame: IS = 1.
    diverse = FrameInceptionScore(classifier=BrightnessClassifier(), splits=1)
    diverse.update(frames([5, 30, 60, 90]))
    assert float(diverse.compute()) == pytest.approx(4.0, rel=1e-4)
    same = FrameInceptionScore(classifier=BrightnessClassifier(), splits=1)
    same.update(frames([5, 6, 7, 8]))
    assert float(same.compute()) == pytest.approx(1.0, rel=1e-4)


def test_left_out_with_a_reason(tmp_path):
    assert "no Inception weights" in inception_unavailable_reason(None)
    assert "does not exist" in inception_unavailable_reason(tmp_path / "missing.pth")
    (tmp_path / "weights.pth").write_bytes(b"")
    reason = inception_unavailable_reason(tmp_path / "weights.pth")
    try:
        import torch_fidelity  # noqa: F401
    except Exception:
        assert reason.startswith("inception_score skipped: torch-fidelity")
    evaluator = VideoEvaluator(EvaluatorConfig(inception_weights=None))
    assert "inception_score" not in evaluator.metrics and "no Inception weights" in evaluator.inception_score_skipped
    with pytest.raises(FileNotFoundError, match="inception_score skipped"):
        FrameInceptionScore(None)
