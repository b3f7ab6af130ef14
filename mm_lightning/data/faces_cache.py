"""One face-analysis pass over a dataset, cached next to the data.

For every row it stores the target face boxes and 5-point landmarks (one per stored frame
of a video; the landmarks align the identity loss's crops), the
reference identity embedding (mean over the references) and the reference face used for
the crop. Training then never runs a detector: datasets read boxes and embeddings from
here. Rows that can't be used are kept with a reason and excluded by the datasets.

The cache is `<root>/.mm_faces_<backend>.npz`, keyed on the backend id (model included),
the probing settings and the sha256 of metadata.jsonl: editing the metadata rebuilds it.
"""

import hashlib
import json
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mm_lightning.data.formats import METADATA, Row
from mm_lightning.data.media import open_video, read_image
from mm_lightning.faces import Face, FaceAnalyzer, mean_identity_embedding

log = logging.getLogger(__name__)
VERSION = 2  # 2: per-frame target landmarks


class Skip(Exception):
    """A row that can't be used; the message is the reason counted in the summary."""


@dataclass
class FaceCache:
    reason: np.ndarray  # [N] str, "" for usable rows, in metadata order
    embedding: np.ndarray  # [N, D] float32, L2-normalised mean over the references
    ref_index: np.ndarray  # [N] int64, reference file the crop comes from; -1: the keyframe
    ref_box: np.ndarray  # [N, 4] float32, pixels of that reference image/frame
    ref_landmarks: np.ndarray  # [N, 5, 2] float32
    box_offset: np.ndarray  # [N + 1] int64, row i's frames are boxes[box_offset[i]:box_offset[i+1]]
    boxes: np.ndarray  # [T, 4] float32, target box per stored frame, stored-frame pixels
    landmarks: np.ndarray  # [T, 5, 2] float32, target 5-point landmarks per stored frame, stored-frame pixels

    def target_boxes(self, i: int) -> np.ndarray:  # [n_frames, 4]
        return self.boxes[self.box_offset[i] : self.box_offset[i + 1]]

    def target_landmarks(self, i: int) -> np.ndarray:  # [n_frames, 5, 2]
        return self.landmarks[self.box_offset[i] : self.box_offset[i + 1]]

    def reference_face(self, i: int) -> Face:
        # The detection score is not cached: rows here already passed detection.
        return Face(self.ref_box[i], self.ref_landmarks[i], self.embedding[i], 1.0)

    def skipped(self, rows: list[Row], kind: str) -> dict[str, int]:
        """Excluded rows of one kind, counted by reason, e.g. {"no_face": 2, "corrupt_video": 1}."""
        return dict(Counter(str(r) for row, r in zip(rows, self.reason) if row.kind == kind and r))


def _image(path: Path) -> np.ndarray:
    try:
        return read_image(path)
    except FileNotFoundError:
        raise Skip("missing_file") from None
    except Exception:  # PIL raises OSError, SyntaxError, ValueError... on corrupt files
        raise Skip("unreadable_image") from None


def _largest(analyzer: FaceAnalyzer, image: np.ndarray) -> Face:
    face = analyzer.largest_face(image)
    if face is None:
        raise Skip("no_face")
    return face


def _video_faces(
    row: Row, root: Path, analyzer: FaceAnalyzer, probe_frames: int, min_face_fraction: float
) -> tuple[np.ndarray, np.ndarray, Face | None]:
    """-> (target box [n, 4] and landmarks [n, 5, 2] per frame, keyframe face when the row's reference
    is a keyframe)."""
    path = root / row.media
    if not path.is_file():
        raise Skip("missing_file")
    try:  # decord raises DECORDError/RuntimeError on corrupt or truncated files
        video = open_video(path)
        n = len(video)
    except Exception:
        raise Skip("corrupt_video") from None
    if not row.references and row.keyframe >= n:
        raise Skip("keyframe_out_of_range")
    probe = set(np.linspace(0, n - 1, min(n, probe_frames)).round().astype(int).tolist())
    probe = sorted(probe | (set() if row.references else {row.keyframe}))
    try:  # decoding up to the last frame is also what exposes truncated files
        frames = video.get_batch(probe).asnumpy()  # [p, h, w, 3] uint8
    except Exception:
        raise Skip("corrupt_video") from None
    faces = {i: analyzer.largest_face(f) for i, f in zip(probe, frames)}
    found = [i for i in probe if faces[i] is not None]
    if not found or len(found) < min_face_fraction * len(probe):
        raise Skip("no_face")
    # [k, 4 + 10]: box and landmarks of the probed frames, interpolated to every frame
    probed = np.stack([np.concatenate([faces[i].box, np.ravel(faces[i].landmarks)]) for i in found])
    track = np.stack([np.interp(np.arange(n), found, probed[:, c]) for c in range(probed.shape[1])], 1)
    boxes, landmarks = track[:, :4].astype(np.float32), track[:, 4:].reshape(n, 5, 2).astype(np.float32)
    return boxes, landmarks, None if row.references else faces[row.keyframe]


def _prepare_row(row: Row, root: Path, analyzer: FaceAnalyzer, probe_frames: int, min_face_fraction: float):
    """-> (target boxes [n_frames, 4], landmarks [n_frames, 5, 2], reference faces, index of the
    cropped reference or -1)."""
    if row.kind == "image":
        face = _largest(analyzer, _image(root / row.media))
        boxes, landmarks = face.box[None], np.asarray(face.landmarks, np.float32)[None]
    else:
        boxes, landmarks, keyframe_face = _video_faces(row, root, analyzer, probe_frames, min_face_fraction)
        if not row.references:
            if keyframe_face is None:
                raise Skip("no_face")
            return boxes, landmarks, [keyframe_face], -1
    # References without a face are ignored; the crop comes from the first one with a face.
    refs = [(k, analyzer.largest_face(_image(root / r))) for k, r in enumerate(row.references)]
    refs = [(k, f) for k, f in refs if f is not None]
    if not refs:
        raise Skip("no_face")
    return boxes, landmarks, [f for _, f in refs], refs[0][0]


def build_face_cache(
    rows: list[Row], root: Path, analyzer: FaceAnalyzer, probe_frames: int = 16, min_face_fraction: float = 0.5
) -> FaceCache:
    """Run the analyzer over every row. A bad row is recorded with its reason, never raised.

    Videos are probed on `probe_frames` frames spread over the clip and boxes are linearly
    interpolated in between; a clip is kept when at least `min_face_fraction` of the probed
    frames show a face (otherwise its face mask would be mostly guesswork).
    """
    n, dim = len(rows), analyzer.embedding_dim
    reason = np.full(n, "", dtype=object)
    embedding = np.zeros((n, dim), np.float32)
    ref_index = np.zeros(n, np.int64)
    ref_box = np.zeros((n, 4), np.float32)
    ref_landmarks = np.zeros((n, 5, 2), np.float32)
    boxes, landmarks = [], []
    for i, row in enumerate(rows):
        try:
            target, target_landmarks, refs, ref_index[i] = _prepare_row(
                row, root, analyzer, probe_frames, min_face_fraction
            )
            embedding[i] = mean_identity_embedding(refs)
            ref_box[i], ref_landmarks[i] = refs[0].box, refs[0].landmarks
        except Skip as e:
            reason[i], target, target_landmarks = str(e), np.zeros((0, 4), np.float32), np.zeros((0, 5, 2), np.float32)
            log.warning("%s:%d (%s) skipped: %s", METADATA, row.line, row.media, e)
        boxes.append(target)
        landmarks.append(target_landmarks)
        if (i + 1) % 500 == 0:
            log.info("face cache: %d/%d rows", i + 1, n)
    return FaceCache(
        reason=reason.astype(str),
        embedding=embedding,
        ref_index=ref_index,
        ref_box=ref_box,
        ref_landmarks=ref_landmarks,
        box_offset=np.cumsum([0] + [len(b) for b in boxes]).astype(np.int64),
        boxes=np.concatenate(boxes).astype(np.float32) if boxes else np.zeros((0, 4), np.float32),
        landmarks=np.concatenate(landmarks).astype(np.float32) if landmarks else np.zeros((0, 5, 2), np.float32),
    )


def load_or_build_face_cache(
    root: str | Path,
    rows: list[Row],
    backend: str,
    make_analyzer: Callable[[], FaceAnalyzer],
    probe_frames: int = 16,
    min_face_fraction: float = 0.5,
) -> FaceCache:
    """The cache of `root` for `backend`, an id naming the models (e.g. "dlib", "insightface-antelopev2").

    `make_analyzer` is only called when the cache is missing or stale, so a fresh cache
    costs no model loading. Writes are atomic (temp file + rename): ranks or jobs that
    build the same cache at once each write a complete, identical file.
    """
    root = Path(root)
    path = root / f".mm_faces_{backend}.npz"
    key = {
        "version": VERSION,
        "backend": backend,
        "probe_frames": probe_frames,
        "min_face_fraction": min_face_fraction,
        "metadata_sha256": hashlib.sha256((root / METADATA).read_bytes()).hexdigest(),
    }
    try:
        with np.load(path, allow_pickle=False) as z:
            if json.loads(str(z["key"])) == key:
                return FaceCache(**{k: z[k] for k in FaceCache.__dataclass_fields__})
        log.info("face cache %s is stale, rebuilding", path)
    except FileNotFoundError:
        pass
    except Exception as e:  # a damaged cache file is rebuilt, like a stale one
        log.warning("face cache %s unreadable (%s), rebuilding", path, e)
    cache = build_face_cache(rows, root, make_analyzer(), probe_frames, min_face_fraction)
    fd, tmp = tempfile.mkstemp(dir=root, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        np.savez(f, key=np.array(json.dumps(key)), **cache.__dict__)
    os.replace(tmp, path)
    return cache
