"""Average ID similarity between the faces of a generated video and the reference set."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from mm_lightning.evaluation.video_mean import VideoMean


def frame_similarities(frame_embeddings: Sequence[np.ndarray | None], references: np.ndarray) -> list[float | None]:
    """s_i = (1/R) sum_r cos(e_i, r_r) for each sampled frame i; None where no face was found in the frame.

    references: [R, D] embeddings of the R reference images (a [D] vector counts as R = 1). The paper
    (v2, Sec. 4.2): "the average similarity of a group of reference images with the same identity",
    read as the mean of the per-reference cosines. It differs from the cosine to the mean embedding
    when the references disagree: for orthogonal references the mean-embedding cosine of a frame
    equal to one of them is 0.707, the mean of cosines 0.5.
    """
    refs = np.atleast_2d(np.asarray(references, dtype=np.float64))
    refs = refs / np.linalg.norm(refs, axis=1, keepdims=True)
    return [None if e is None else float(np.mean(refs @ e) / np.linalg.norm(e)) for e in frame_embeddings]


class IDSimilarity(VideoMean):
    """Average ID similarity, per video then over videos.

    For video v with sampled frames i = 1..K, F_v the frames with a face, s_i from `frame_similarities`:
        ID_v = mean_{i in F_v} s_i        (default, no_face_similarity=None: as ConsisID's evaluation)
    A video with no face in any frame has no ID_v (NaN): it is left out of the mean over videos and
    counted in `videos_without_face`, never scored 0. With no_face_similarity=0.0 (the "zero" policy)
    a frame without a face scores 0 instead, and ID_v = mean over all K frames: one missed frame in 16
    then costs ~0.06, more than the spread of the paper's Table 1 (0.896-0.923).
    Either way missed frames are counted: compute() -> {"id_similarity": mean_v ID_v, "no_face_frames",
    "frames_scored", "face_rate" = 1 - no_face_frames / frames_scored, "videos_without_face"}.
    """

    higher_is_better = True

    def __init__(self, no_face_similarity: float | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.no_face_similarity = no_face_similarity
        self.add_state("frames_scored", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("no_face_frames", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("videos_without_face", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, similarities: Sequence[float | None]) -> None:
        """similarities: one video's per-frame cosines, None for a frame without a face."""
        counted = [self.no_face_similarity if s is None else s for s in similarities]
        counted = [s for s in counted if s is not None]
        self.frames_scored += len(similarities)
        self.no_face_frames += sum(s is None for s in similarities)
        self.videos_without_face += int(all(s is None for s in similarities))
        self._add_video(sum(counted) / len(counted) if counted else math.nan)

    def compute(self) -> dict[str, torch.Tensor]:
        frames = self.frames_scored.double()
        face_rate = 1 - self.no_face_frames / frames if frames > 0 else torch.tensor(math.nan, dtype=torch.float64)
        return {
            "id_similarity": super().compute(),
            "no_face_frames": self.no_face_frames,
            "frames_scored": self.frames_scored,
            "face_rate": face_rate,
            "videos_without_face": self.videos_without_face,
        }


def face_rate(similarities: Sequence[float | None]) -> float:
    """Fraction of one video's sampled frames with a face; NaN for no frames."""
    return sum(s is not None for s in similarities) / len(similarities) if similarities else math.nan
