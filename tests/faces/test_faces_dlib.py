"""dlib backend on real photographs shipped inside skimage and matplotlib."""

import time

import matplotlib.cbook
import matplotlib.image
import numpy as np
import pytest
import skimage.data

from mm_lightning.faces import (
    Face,
    NoFaceError,
    build_face_analyzer,
    face_crop,
    face_mask,
    mean_identity_embedding,
)


@pytest.fixture(scope="module")
def dlib_analyzer():
    return build_face_analyzer("dlib")


@pytest.fixture(scope="module")
def astronaut():
    return skimage.data.astronaut()


@pytest.fixture(scope="module")
def grace_hopper():
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        return np.ascontiguousarray(matplotlib.image.imread(f, format="jpg"))


def assert_sane_landmarks(face: Face):
    (lex, ley), (rex, rey), (nx, ny), (lmx, lmy), (rmx, rmy) = face.landmarks
    assert lex < nx < rex and lmx < rmx, "left (image) features must have the smaller x"
    assert max(ley, rey) < ny < min(lmy, rmy), "eyes above nose above mouth"
    x1, y1, x2, y2 = face.box
    assert np.all((face.landmarks >= [x1, y1]) & (face.landmarks <= [x2, y2]))


def test_astronaut_faces(dlib_analyzer, astronaut):
    faces = dlib_analyzer.detect(astronaut)
    assert len(faces) >= 2  # the astronaut and the small portrait on the suit patch
    assert [f.area for f in faces] == sorted((f.area for f in faces), reverse=True)
    face = dlib_analyzer.require_face(astronaut, "astronaut")
    assert face is faces[0] or np.array_equal(face.box, faces[0].box)
    np.testing.assert_allclose(face.box, [175, 76, 265, 166], atol=3)
    assert face.box.dtype == face.landmarks.dtype == face.embedding.dtype == np.float32
    assert face.landmarks.shape == (5, 2) and face.embedding.shape == (dlib_analyzer.embedding_dim,) == (128,)
    assert np.linalg.norm(face.embedding) == pytest.approx(1.0, abs=1e-5)
    assert_sane_landmarks(face)


def test_no_face_in_camera(dlib_analyzer):
    camera = np.repeat(skimage.data.camera()[:, :, None], 3, axis=2)
    assert dlib_analyzer.largest_face(camera) is None
    with pytest.raises(NoFaceError, match="no face detected in cameraman frame"):
        dlib_analyzer.require_face(camera, "cameraman frame")


def test_identity_similarity(dlib_analyzer, astronaut, grace_hopper):
    face = dlib_analyzer.require_face(astronaut, "astronaut")
    # The mirror image is the same person; landmark order must follow image sides, not the subject's.
    mirrored = dlib_analyzer.require_face(np.ascontiguousarray(astronaut[:, ::-1]), "mirrored astronaut")
    assert_sane_landmarks(mirrored)
    grace = dlib_analyzer.require_face(grace_hopper, "grace hopper")
    assert_sane_landmarks(grace)
    same = float(face.embedding @ mirrored.embedding)
    other = float(face.embedding @ grace.embedding)
    assert same > 0.97
    assert other < 0.93 and same - other > 0.05  # measured: 0.992 vs 0.882
    mean = mean_identity_embedding([face, mirrored])
    assert np.linalg.norm(mean) == pytest.approx(1.0, abs=1e-5) and float(mean @ face.embedding) > same


def test_small_image_is_fast(dlib_analyzer, astronaut):
    small = np.ascontiguousarray(astronaut[::2, ::2])  # 256x256, astronaut face ~45 px
    start = time.perf_counter()
    faces = dlib_analyzer.detect(small)
    assert time.perf_counter() - start < 2.0
    # At this size the (falsely detected) suit patch is 1 px larger than the astronaut's face,
    # but scores far lower.
    best = max(faces, key=lambda f: f.score)
    np.testing.assert_allclose(best.box, [88, 41, 132, 84], atol=3)
    assert best.score > 1.0 > 0.2 > min(f.score for f in faces)


def test_face_crop_and_mask(dlib_analyzer, astronaut):
    face = dlib_analyzer.require_face(astronaut, "astronaut")
    crop = face_crop(astronaut, face, 112, margin=0.0)
    assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
    # Cropping the crop's own detection finds the face again, filling most of it.
    again = dlib_analyzer.require_face(face_crop(astronaut, face, 256), "astronaut crop")
    assert again.area > 0.2 * 256 * 256
    np.testing.assert_allclose((again.box[:2] + again.box[2:]) / 2, 128, atol=20)

    mask = face_mask(512, 512, face.box, dilate=0.1)
    assert mask.dtype == np.float32 and set(np.unique(mask)) == {0.0, 1.0}
    ys, xs = np.nonzero(mask)
    np.testing.assert_allclose([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], [166, 67, 274, 175], atol=1)


@pytest.fixture
def face_recognition(monkeypatch):
    """face_recognition 1.3.0 itself, imported with a stand-in for pkg_resources (gone from setuptools 81+).

    face_recognition_models calls only pkg_resources.resource_filename(package, name); the stand-in
    maps it onto that package's folder, and monkeypatch removes it (and the imports) after the test.
    """
    import importlib.util
    import sys
    import types
    from pathlib import Path

    if importlib.util.find_spec("face_recognition") is None:
        pytest.skip("face_recognition is not installed (pip install --no-deps -r requirements-nodeps.txt)")
    stand_in = types.ModuleType("pkg_resources")
    stand_in.resource_filename = lambda package, name: str(
        Path(importlib.util.find_spec(package).submodule_search_locations[0]) / name
    )
    monkeypatch.setitem(sys.modules, "pkg_resources", stand_in)
    for name in [m for m in sys.modules if m.split(".")[0] in ("face_recognition", "face_recognition_models")]:
        monkeypatch.delitem(sys.modules, name)
    from PIL import ImageFile

    # face_recognition's import sets PIL's global LOAD_TRUNCATED_IMAGES = True, which would let later tests
    # decode truncated files; monkeypatch puts the flag back after the test.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", ImageFile.LOAD_TRUNCATED_IMAGES)
    import face_recognition

    return face_recognition


def test_embedding_matches_face_recognition(dlib_analyzer, face_recognition, astronaut, grace_hopper):
    # The paper's ID metric is face_recognition's face_encodings (its ref. 15): the same detector
    # boxes and the same 5-point alignment must give the same 128-d descriptor.
    for photo in (astronaut, grace_hopper):
        theirs = face_recognition.face_encodings(photo)
        ours = dlib_analyzer.detect(photo)
        assert len(theirs) == len(ours) >= 1
        boxes = face_recognition.face_locations(photo)  # (top, right, bottom, left), same order as theirs
        for (top, right, bottom, left), encoding in zip(boxes, theirs):
            face = next(f for f in ours if np.allclose(f.box, [left, top, right, bottom], atol=1))
            cosine = float(face.embedding @ encoding) / float(np.linalg.norm(encoding))
            assert cosine >= 0.999
