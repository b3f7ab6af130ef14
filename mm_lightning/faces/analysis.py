"""Face detection, 5-point landmarks and identity embeddings behind one interface.

Two backends:
- ``dlib``: face_recognition's pipeline (HOG detector, 5-point alignment, dlib's 128-d ResNet
  descriptor; weights from the PyPI package face_recognition_models), plus the 68-point shape
  predictor for the RetinaFace-order landmarks.
- ``insightface``: insightface's own FaceAnalysis (SCRFD detector + ArcFace recogniser) on a
  model pack that must already be on disk (antelopev2, buffalo_l, ...).
"""

from __future__ import annotations

import functools
import importlib.util
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np


# eq=False: the generated __eq__/__hash__ would compare/hash numpy arrays and fail.
@dataclass(frozen=True, eq=False)
class Face:
    box: np.ndarray  # [4] float32: x1, y1, x2, y2 in pixels
    # [5, 2] float32, RetinaFace order: left eye, right eye, nose tip, left mouth corner,
    # right mouth corner, left/right as seen in the image.
    landmarks: np.ndarray
    embedding: np.ndarray  # [D] float32, L2-normalised identity embedding
    score: float

    @property
    def area(self) -> float:
        return float(max(self.box[2] - self.box[0], 0) * max(self.box[3] - self.box[1], 0))


class NoFaceError(ValueError):
    """No face was detected where one is required."""


class FaceAnalyzer(ABC):
    """Base class: subclasses implement ``_detect`` on an RGB uint8 image."""

    name: str
    embedding_dim: int

    def detect(self, image: np.ndarray) -> list[Face]:
        """All faces in an [H, W, 3] uint8 RGB image, largest box first."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an [H, W, 3] uint8 RGB image, got {image.shape} {image.dtype}")
        return sorted(self._detect(np.ascontiguousarray(image)), key=lambda f: f.area, reverse=True)

    @abstractmethod
    def _detect(self, image: np.ndarray) -> list[Face]:
        """Every face in a contiguous [H, W, 3] uint8 RGB image, in any order."""

    def largest_face(self, image: np.ndarray) -> Face | None:
        faces = self.detect(image)
        return faces[0] if faces else None

    def require_face(self, image: np.ndarray, what: str) -> Face:
        face = self.largest_face(image)
        if face is None:
            raise NoFaceError(
                f"no face detected in {what} ({self.name} backend, image {image.shape[1]}x{image.shape[0]})"
            )
        return face


def _l2_normalise(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32)
    return v / max(float(np.linalg.norm(v)), 1e-12)


class DlibFaceAnalyzer(FaceAnalyzer):
    """dlib's HOG detector and 128-d face descriptor, as face_recognition 1.3.0 runs them.

    Embedding: face_recognition.face_encodings' default path, HOG detection upsampled once, the
    descriptor computed on the face aligned by the 5-point predictor (`model="small"`), 1 jitter.
    Landmarks: dlib's 5-point model has eye corners and the nose base but no mouth, so RetinaFace's
    5 points come from the 68-point iBUG shape: left/right eye = mean of points 36-41 / 42-47 (the
    subject's right eye is on the image's left), nose tip = point 30, left/right mouth corner =
    points 48 / 54. The 68 points are predicted twice more from a box placed by the previous points
    (`_refit_box`), not by the detector: HOG boxes snap to 8-px cells and pyramid scales, so the same
    face moved or zoomed got a box in another place relative to it, and landmarks that moved ~0.1
    inter-ocular distances (summed over the 5 points) with no motion at all; refitted, about half that.
    """

    # The detector's box relative to its own 68 points, averaged over the packaged astronaut and Grace
    # Hopper photos: centre = centroid + (0, -0.155) * r, side = 2.67 * r, r the points' RMS radius.
    BOX_OFFSET_Y, BOX_SIDE = -0.155, 2.67
    REFITS = 2

    name = "dlib"
    embedding_dim = 128

    def __init__(self):
        import dlib

        # face_recognition_models' own helpers import pkg_resources (gone from setuptools),
        # so locate its data folder without importing the package.
        models = Path(importlib.util.find_spec("face_recognition_models").submodule_search_locations[0]) / "models"
        self._detector = dlib.get_frontal_face_detector()
        self._shape_predictor = dlib.shape_predictor(str(models / "shape_predictor_68_face_landmarks.dat"))
        self._alignment_predictor = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))
        self._encoder = dlib.face_recognition_model_v1(str(models / "dlib_face_recognition_resnet_model_v1.dat"))

    def _points(self, image: np.ndarray, rect) -> np.ndarray:
        """[68, 2] float64 iBUG points in pixels."""
        return np.array([(p.x, p.y) for p in self._shape_predictor(image, rect).parts()], dtype=np.float64)

    def _refit_box(self, points: np.ndarray):
        """A dlib.rectangle placed and sized by the 68 points, as the detector's box is on average."""
        import dlib

        center = points.mean(0)
        radius = float(np.sqrt(((points - center) ** 2).sum(1).mean()))
        cx, cy, half = center[0], center[1] + self.BOX_OFFSET_Y * radius, self.BOX_SIDE * radius / 2
        return dlib.rectangle(round(cx - half), round(cy - half), round(cx + half), round(cy + half))

    def _detect(self, image: np.ndarray) -> list[Face]:
        # Upsample once: the HOG detector's smallest face is ~80 px, ~40 px after upsampling.
        rects, scores, _ = self._detector.run(image, 1)
        faces = []
        for rect, score in zip(rects, scores):
            points = self._points(image, rect)
            for _ in range(self.REFITS):
                points = self._points(image, self._refit_box(points))
            landmarks = np.stack(
                [points[36:42].mean(0), points[42:48].mean(0), points[30], points[48], points[54]]
            ).astype(np.float32)
            embedding = np.array(self._encoder.compute_face_descriptor(image, self._alignment_predictor(image, rect)))
            box = np.array([rect.left(), rect.top(), rect.right(), rect.bottom()], dtype=np.float32)
            faces.append(Face(box, landmarks, _l2_normalise(embedding), float(score)))
        return faces


class InsightFaceAnalyzer(FaceAnalyzer):
    """insightface's FaceAnalysis (detection + recognition) on a local model pack."""

    name = "insightface"

    def __init__(self, root: str, model_name: str = "antelopev2", det_size: int = 640):
        from insightface.app import FaceAnalysis

        # FaceAnalysis downloads the pack when its folder is missing; models must come from disk.
        model_dir = Path(root).expanduser() / "models" / model_name
        if not sorted(model_dir.glob("*.onnx")):
            raise FileNotFoundError(
                f"insightface model pack '{model_name}' not found: {model_dir} has no .onnx files. "
                "Expected a detection model (e.g. scrfd_10g_bnkps.onnx or det_10g.onnx) and a recognition "
                "model (e.g. glintr100.onnx or w600k_r50.onnx). Get them from the insightface model zoo "
                f"releases (antelopev2.zip / buffalo_l.zip) and unzip into {model_dir}/."
            )
        try:
            self._app = FaceAnalysis(
                name=model_name,
                root=str(Path(root).expanduser()),
                providers=["CPUExecutionProvider"],
                allowed_modules=["detection", "recognition"],
            )
        except AssertionError as e:  # FaceAnalysis asserts that a detection model was found
            raise FileNotFoundError(f"no SCRFD detection model recognised by insightface in {model_dir}") from e
        if "recognition" not in self._app.models:
            raise FileNotFoundError(f"no ArcFace recognition model recognised by insightface in {model_dir}")
        self._app.prepare(ctx_id=-1, det_size=(det_size, det_size))
        recognition = self._app.models["recognition"]
        self.recognition_model_file = recognition.model_file
        self.embedding_dim = int(recognition.output_shape[-1])

    def _detect(self, image: np.ndarray) -> list[Face]:
        faces = self._app.get(np.ascontiguousarray(image[:, :, ::-1]))  # insightface expects BGR
        return [
            Face(
                f.bbox.astype(np.float32),
                f.kps.astype(np.float32),  # already in RetinaFace order
                _l2_normalise(f.normed_embedding),
                float(f.det_score),
            )
            for f in faces
        ]


BACKENDS = ("dlib", "insightface")


def build_face_analyzer(
    backend: str = "dlib",
    insightface_root: str | None = None,
    insightface_model: str = "antelopev2",
    det_size: int = 640,
) -> FaceAnalyzer:
    """Build (or reuse: model loading is slow) the face analyzer of a backend."""
    if backend == "dlib":
        return _cached_analyzer("dlib", None, None, None)
    if backend == "insightface":
        if insightface_root is None:
            raise ValueError("the insightface backend needs insightface_root (folder holding models/<name>/)")
        return _cached_analyzer("insightface", str(insightface_root), insightface_model, int(det_size))
    raise ValueError(f"unknown face backend {backend!r}; choose one of {BACKENDS}")


def face_analyzer(faces) -> FaceAnalyzer:
    """The analyzer a faces-settings object names (`config.FacesConfig`, or a config's `faces` section)."""
    return build_face_analyzer(faces.backend, faces.insightface_root, faces.insightface_model)


@functools.cache
def _cached_analyzer(backend, root, model_name, det_size) -> FaceAnalyzer:
    if backend == "dlib":
        return DlibFaceAnalyzer()
    return InsightFaceAnalyzer(root, model_name, det_size)


def mean_identity_embedding(faces: list[Face]) -> np.ndarray:
    """L2-normalised mean embedding of several faces of one identity."""
    if not faces:
        raise ValueError("mean_identity_embedding needs at least one face")
    return _l2_normalise(np.mean([f.embedding for f in faces], axis=0))
