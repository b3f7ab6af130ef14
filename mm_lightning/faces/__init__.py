"""Face analysis shared by data preparation, training (identity loss, face masks) and metrics."""

from mm_lightning.faces.analysis import (
    DlibFaceAnalyzer,
    Face,
    FaceAnalyzer,
    InsightFaceAnalyzer,
    NoFaceError,
    build_face_analyzer,
    face_analyzer,
    mean_identity_embedding,
)
from mm_lightning.faces.arcface import DifferentiableArcFace, differentiable_embedder
from mm_lightning.faces.crops import face_crop, face_mask

__all__ = [
    "DifferentiableArcFace",
    "DlibFaceAnalyzer",
    "Face",
    "FaceAnalyzer",
    "InsightFaceAnalyzer",
    "NoFaceError",
    "build_face_analyzer",
    "differentiable_embedder",
    "face_analyzer",
    "face_crop",
    "face_mask",
    "mean_identity_embedding",
]
