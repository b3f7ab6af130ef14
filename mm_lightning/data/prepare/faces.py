"""The one dominant face of an image or a clip, or the reason there is none."""

import cv2
import numpy as np

from mm_lightning.faces import Face, FaceAnalyzer, mean_identity_embedding


class Drop(Exception):
    """A file or clip left out of the dataset; the message is the reason counted in the report."""


class ShrunkAnalyzer(FaceAnalyzer):
    """Runs another analyzer on the image shrunk to `max_side` (longest side), boxes mapped back.

    dlib's HOG detector (run upsampled once) costs grow with the pixel count. At 960 px, a face of
    the default prepare.min_face_size (64 px) in a 1080p frame is ~32 px, ~64 px upsampled: above
    the detector's ~40 px minimum.
    """

    def __init__(self, analyzer: FaceAnalyzer, max_side: int | None):
        self.analyzer, self.max_side = analyzer, max_side
        self.name, self.embedding_dim = analyzer.name, analyzer.embedding_dim

    def _detect(self, image: np.ndarray) -> list[Face]:
        h, w = image.shape[:2]
        scale = min(1.0, self.max_side / max(h, w)) if self.max_side else 1.0
        if scale == 1.0:
            return self.analyzer.detect(image)
        small = cv2.resize(image, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
        return [Face(f.box / scale, f.landmarks / scale, f.embedding, f.score) for f in self.analyzer.detect(small)]


def dominant_face(analyzer: FaceAnalyzer, image: np.ndarray, max_second_face: float) -> Face | None:
    """The largest face when no other face reaches `max_second_face` of its area; else None.

    Raises Drop("no_face") when there is no face at all, so callers can tell the two apart.
    """
    faces = analyzer.detect(image)  # largest first
    if not faces:
        raise Drop("no_face")
    if len(faces) > 1 and faces[1].area > max_second_face * faces[0].area:
        return None
    return faces[0]


def face_side(face: Face) -> float:
    """Shorter side of the face box, pixels."""
    return float(min(face.box[2] - face.box[0], face.box[3] - face.box[1]))


def image_face(analyzer: FaceAnalyzer, image: np.ndarray, max_second_face: float, min_face_size: int) -> Face:
    face = dominant_face(analyzer, image, max_second_face)
    if face is None:
        raise Drop("multiple_faces")
    if face_side(face) < min_face_size:
        raise Drop("small_face")
    return face


def clip_faces(
    analyzer: FaceAnalyzer,
    frames: np.ndarray,
    max_second_face: float,
    min_face_size: int,
    min_presence: float,
    min_cosine: float,
) -> tuple[dict[int, Face], np.ndarray]:
    """({frame index: dominant face}, clip identity embedding [D]) over [n, h, w, 3] frames.

    The clip is kept when at least `min_presence` of the frames show one dominant face of
    at least `min_face_size` px, and each of those faces agrees with the clip's mean
    embedding above `min_cosine` (the same person throughout: a missed cut shows up here).
    """
    found, reasons = {}, []
    for i, frame in enumerate(frames):
        try:
            face = image_face(analyzer, frame, max_second_face, min_face_size)
            found[i] = face
        except Drop as e:
            reasons.append(str(e))
    if len(found) < min_presence * len(frames):
        # The most common failure names the drop: "no_face", "small_face" or "multiple_faces".
        raise Drop(max(set(reasons), key=reasons.count) if reasons else "no_face")
    embedding = mean_identity_embedding(list(found.values()))
    if min(float(f.embedding @ embedding) for f in found.values()) < min_cosine:
        raise Drop("identity_changes")
    return found, embedding
