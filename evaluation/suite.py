"""One path from a generated video to every metric, shared by the training callback and `score`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from mm_lightning.config import FacesConfig
from mm_lightning.evaluation.dynamic_degree import DynamicDegree
from mm_lightning.evaluation.facial_motion import FacialMotionInter, FacialMotionRef
from mm_lightning.evaluation.flow import build_flow
from mm_lightning.evaluation.id_similarity import IDSimilarity, face_rate, frame_similarities
from mm_lightning.evaluation.inception_score import FrameInceptionScore, inception_unavailable_reason
from mm_lightning.evaluation.motion_smoothness import MotionSmoothness
from mm_lightning.evaluation.sampling import uniform_indices
from mm_lightning.evaluation.similarity_decay import SimilarityDecay
from mm_lightning.evaluation.text_alignment import TextAlignment, clip_unavailable_reason
from mm_lightning.faces import Face, FaceAnalyzer, face_analyzer


@dataclass
class EvaluatorConfig:
    # the face backend: dlib (face_recognition, the paper's ref. 15, default) or insightface (ArcFace)
    faces: FacesConfig = field(default_factory=FacesConfig)
    frames_sampled: int = 16  # uniformly sampled frames for the face metrics and text alignment
    # ID similarity of a frame without a face. None (default): the frame is left out of its video's mean
    # (a video with no face at all has no value); 0.0: the "zero" policy. Missed frames are counted either way.
    no_face_similarity: float | None = None
    fm_reduction: str = "sum"  # FM distance over the 5 landmarks: "sum" | "mean"
    # "dis" (default: right VBench decision at 1-64 px/frame, benchmarks/flow_displacement.md),
    # "farneback", or "raft" (torchvision's RAFT on the local weights file flow_weights, as VBench).
    flow: str = "dis"
    flow_weights: str | None = None
    flow_max_side: int | None = None  # flow on frames shrunk to this longest side; None: full size, as VBench
    clip_path: str | None = None  # local CLIP folder; None: no text alignment
    inception_weights: str | None = None  # torch-fidelity Inception-v3 weights file; None: no inception score

    @classmethod
    def from_mapping(cls, values: Mapping, **overrides) -> EvaluatorConfig:
        """From a mapping holding some of these fields (e.g. the experiment's `eval` section), extra keys ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{**{k: values[k] for k in known if k in values}, **overrides})


@dataclass
class Reference:
    """What the metrics need from the reference images, computed once per identity."""

    embeddings: np.ndarray  # [R, D] one L2-normalised embedding per reference image (ID similarity)
    landmarks: list[tuple[np.ndarray, tuple[int, int]]]  # per image: 5-point landmarks [5, 2], (H, W)

    @classmethod
    def from_faces(cls, images: Sequence[np.ndarray], faces: Sequence[Face]) -> Reference:
        """From faces already detected in the reference images (each set is detected once)."""
        return cls(
            np.stack([f.embedding for f in faces]), [(f.landmarks, img.shape[:2]) for f, img in zip(faces, images)]
        )


class VideoEvaluator:
    """Scores videos one at a time and accumulates the benchmark metrics.

    score_video() returns the per-video values and updates every metric, compute() the aggregates
    (synced across processes by torchmetrics), reset() starts over. Undefined values are NaN.
    """

    def __init__(self, config: EvaluatorConfig | None = None, analyzer: FaceAnalyzer | None = None) -> None:
        self.config = c = config or EvaluatorConfig()
        self.analyzer = analyzer or face_analyzer(c.faces)
        # A sentence for the run's tags when text alignment is left out; None when it is scored.
        self.text_alignment_skipped = clip_unavailable_reason(c.clip_path)
        self.metrics = torch.nn.ModuleDict(
            {
                "id_similarity": IDSimilarity(c.no_face_similarity),
                "similarity_decay": SimilarityDecay(),
                "fm_ref": FacialMotionRef(c.fm_reduction),
                "fm_inter": FacialMotionInter(c.fm_reduction),
                "fm_ref_face": FacialMotionRef(c.fm_reduction, normalise="face"),
                "fm_inter_face": FacialMotionInter(c.fm_reduction, normalise="face"),
                "dynamic_degree": DynamicDegree(flow := build_flow(c.flow, c.flow_max_side, c.flow_weights)),
                "motion_smoothness": MotionSmoothness(flow),
            }
        )
        # Which CLIP scored text alignment (name and weights hash), for the run's tags; None when left out.
        self.text_alignment_provenance = None
        if self.text_alignment_skipped is None:
            self.metrics["text_alignment"] = TextAlignment(c.clip_path)
            self.text_alignment_provenance = self.metrics["text_alignment"].provenance
        self.inception_score_skipped = inception_unavailable_reason(c.inception_weights)
        if self.inception_score_skipped is None:
            self.metrics["inception_score"] = FrameInceptionScore(c.inception_weights)

    def to(self, device: str | torch.device) -> VideoEvaluator:
        """Move metric states (and CLIP) to `device`; DDP with NCCL syncs only CUDA tensors."""
        self.metrics.to(device)
        return self

    def prepare_reference(self, images: Sequence[np.ndarray], names: Sequence[str] | None = None) -> Reference:
        """Raises mm_lightning.faces.NoFaceError, naming the image, when a reference has no face: the caller decides."""
        names = names or [f"reference image {i}" for i in range(len(images))]
        return Reference.from_faces(images, [self.analyzer.require_face(img, name) for img, name in zip(images, names)])

    def score_video(
        self,
        frames: np.ndarray,
        fps: float,
        reference_images: Sequence[np.ndarray] | Reference,
        prompt: str | None = None,
    ) -> dict:
        """Per-video values of one uint8 RGB video [T, H, W, 3]; each metric accumulates them."""
        frames = np.asarray(frames)
        ref = reference_images if isinstance(reference_images, Reference) else self.prepare_reference(reference_images)
        sampled = frames[uniform_indices(len(frames), self.config.frames_sampled)]
        faces = [self.analyzer.largest_face(frame) for frame in sampled]
        sims = frame_similarities([None if f is None else f.embedding for f in faces], ref.embeddings)
        landmarks = [None if f is None else f.landmarks for f in faces]
        size = frames.shape[1:3]
        # Calling a metric (forward) returns this video's value and adds it to the running state.
        m = self.metrics
        result = {
            "id_similarity": float(m["id_similarity"](sims)["id_similarity"]),
            "similarity_decay": float(m["similarity_decay"](sims)),
            "fm_ref": float(m["fm_ref"](landmarks, size, ref.landmarks)),
            "fm_inter": float(m["fm_inter"](landmarks, size)),
            "fm_ref_face": float(m["fm_ref_face"](landmarks, size, ref.landmarks)),
            "fm_inter_face": float(m["fm_inter_face"](landmarks, size)),
            "dynamic_degree": float(m["dynamic_degree"](frames, fps)),
            "motion_smoothness": float(m["motion_smoothness"](frames, fps)),
        }
        result["dynamic"] = result["dynamic_degree"] == 1.0
        if "text_alignment" in m and prompt:
            result["text_alignment"] = float(m["text_alignment"](sampled, prompt))
        if "inception_score" in m:
            m["inception_score"].update(sampled)  # a score of the whole set: no per-video value
        result.update(
            no_face_frames=sims.count(None),
            frames_scored=len(sims),
            face_rate=face_rate(sims),
            per_frame_similarity=sims,
        )
        return result

    def compute(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, metric in self.metrics.items():
            value = metric.compute()
            out.update({k: float(v) for k, v in value.items()} if isinstance(value, dict) else {name: float(value)})
        return out

    def reset(self) -> None:
        for metric in self.metrics.values():
            metric.reset()
