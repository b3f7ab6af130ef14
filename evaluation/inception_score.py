"""Inception score of the generated frames (Table 1's IS column, which the paper takes from EvalCrafter).

IS = exp(E_x KL(p(y|x) || p(y))) over the sampled frames of every video scored, with torchmetrics'
InceptionScore (10 splits, the mean over splits; frames resized inside the network as torch-fidelity
does). The classifier is torch-fidelity's Inception-v3 port ("inception-v3-compat") loaded from a local
weights file (`eval.inception_weights`, the pt_inception-2015-12-05 file torch-fidelity would download).
It is a score of the whole set, not of one video: `score_video` adds frames, `compute` gives the value.
torch-fidelity imports torchvision at import time, so where torchvision does not import (this CPU
build) or no weights are set, the metric is left out and the reason goes to the run's tags.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from torchmetrics.image.inception import InceptionScore


def inception_unavailable_reason(weights: str | Path | None) -> str | None:
    """Why the inception score cannot be built (a sentence for an MLflow tag); None when it can."""
    if not weights:
        return "inception_score skipped: no Inception weights configured (eval.inception_weights / --inception-weights)"
    if not Path(weights).expanduser().is_file():
        return f"inception_score skipped: Inception weights file {weights} does not exist"
    if importlib.util.find_spec("torch_fidelity") is None:
        return "inception_score skipped: torch-fidelity is not installed (pip install torch-fidelity)"
    try:
        import torch_fidelity  # noqa: F401  (imports torchvision)
    except Exception as err:  # a torchvision built for another torch fails with RuntimeError, not ImportError
        return f"inception_score skipped: torch-fidelity does not import here ({type(err).__name__}: {err})"
    return None


class FrameInceptionScore(InceptionScore):
    """torchmetrics' InceptionScore fed uint8 RGB frames [K, H, W, 3]; compute() -> the mean over splits.

    classifier: any module mapping uint8 [N, 3, H, W] to class logits [N, C]; by default torch-fidelity's
    Inception-v3 on the local `weights` file (see inception_unavailable_reason).
    """

    def __init__(self, weights: str | Path | None = None, classifier: torch.nn.Module | None = None, **kwargs) -> None:
        if classifier is None:
            reason = inception_unavailable_reason(weights)
            if reason:
                raise FileNotFoundError(reason)
            from torchmetrics.image.fid import NoTrainInceptionV3

            classifier = NoTrainInceptionV3(
                name="inception-v3-compat",
                features_list=["logits_unbiased"],
                feature_extractor_weights_path=str(Path(weights).expanduser()),
            )
        super().__init__(feature=classifier, **kwargs)

    def update(self, frames: np.ndarray) -> None:
        device = next(iter(self.inception.parameters()), torch.empty(0)).device
        super().update(torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).to(device))

    def compute(self) -> torch.Tensor:
        mean, _std = super().compute()
        return mean
