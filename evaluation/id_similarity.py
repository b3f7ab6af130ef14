"""Average ID similarity between the faces of a generated video and the reference set."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from evaluation.video_mean import VideoMean


def frame_similarities(frame_embeddings: Sequence[np.ndarray | None], reference: np.ndarray) -> list[float | None]:
    """s_i = cos(e_i, r) for each sampled frame i; None where no face was found in the frame.

    r is the reference-set embedding: the L2-normalised mean of the reference faces' embeddings
    (mm_lightning.faces.mean_identity_embedding).
    """
    r = np.asarray(reference, dtype=np.float64)
    r = r / np.linalg.norm(r)
    return [None if e is None else float(np.dot(e, r) / np.linalg.norm(e)) for e in frame_embeddings]


class IDSimilarity(VideoMean):
    """Average ID similarity, per video then over videos.

    For video v with sampled frames i = 1..K and s_i = cos(e_i, r) (`frame_similarities`):
        ID_v = mean_i s_i
    A frame without a face has no s_i. It scores `no_face_similarity` (default 0.0: the identity
    was not preserved), or with None it is left out of the mean (a video with no face at all is then
    undefined). Either way it is counted in `no_face_frames`; every sampled frame counts in
    `frames_scored`. compute() -> {"id_similarity": mean_v ID_v, "no_face_frames", "frames_scored"}.
    """

    higher_is_better = True

    def __init__(self, no_face_similarity: float | None = 0.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.no_face_similarity = no_face_similarity
        self.add_state("frames_scored", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("no_face_frames", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, similarities: Sequence[float | None]) -> None:
        """similarities: one video's per-frame cosines, None for a frame without a face."""
        counted = [self.no_face_similarity if s is None else s for s in similarities]
        counted = [s for s in counted if s is not None]
        self.frames_scored += len(similarities)
        self.no_face_frames += sum(s is None for s in similarities)
        self._add_video(sum(counted) / len(counted) if counted else math.nan)

    def compute(self) -> dict[str, torch.Tensor]:
        return {"id_similarity": super().compute(), "no_face_frames": self.no_face_frames,
                "frames_scored": self.frames_scored}
