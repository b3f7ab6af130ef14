"""insightface backend: insightface's own FaceAnalysis on tiny ONNX models written by the test."""

import numpy as np
import onnxruntime
import pytest
from insightface.utils import face_align

from mm_lightning.faces import InsightFaceAnalyzer, NoFaceError, build_face_analyzer
from mm_lightning.faces.stand_ins import write_insightface_pack
from tests.faces.onnx_models import fake_face_image


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_insightface_pack(tmp_path_factory.mktemp("insightface"))


@pytest.fixture(scope="module")
def analyzer(root):
    return build_face_analyzer("insightface", insightface_root=root, insightface_model="antelopev2")


def reference_embedding(analyzer, image_rgb, kps, model_sees_bgr=False):
    """Recogniser output on insightface's aligned crop, run directly through onnxruntime.

    ArcFace models take RGB; model_sees_bgr gives what a missing RGB -> BGR hand-over would yield.
    """
    crop = face_align.norm_crop(image_rgb, landmark=kps, image_size=112)
    if model_sees_bgr:
        crop = crop[:, :, ::-1]
    blob = ((crop.astype(np.float32) - 127.5) / 127.5).transpose(2, 0, 1)[None]
    session = onnxruntime.InferenceSession(analyzer.recognition_model_file, providers=["CPUExecutionProvider"])
    out = session.run(None, {"input.1": blob})[0][0]
    return out / np.linalg.norm(out)


def test_cached_and_described(analyzer, root):
    assert isinstance(analyzer, InsightFaceAnalyzer)
    assert analyzer.name == "insightface" and analyzer.embedding_dim == 512
    assert build_face_analyzer("insightface", root, "antelopev2", 640) is analyzer


@pytest.mark.parametrize("height, width", [(640, 640), (480, 720), (720, 480)])
def test_detection_flows_into_face(analyzer, height, width):
    image, box, kps = fake_face_image(height, width, cell_x=10, cell_y=6)
    faces = analyzer.detect(image)
    assert len(faces) == 1
    face = faces[0]
    np.testing.assert_allclose(face.box, box, atol=1e-3)
    np.testing.assert_allclose(face.landmarks, kps, atol=1e-3)
    assert face.score > 0.9
    assert face.embedding.shape == (512,) and face.embedding.dtype == np.float32
    np.testing.assert_allclose(face.embedding, reference_embedding(analyzer, image, kps), atol=1e-5)
    # The recogniser is colour-sensitive, so the check above also pins the RGB -> BGR hand-over.
    assert float(face.embedding @ reference_embedding(analyzer, image, kps, model_sees_bgr=True)) < 0.99


def test_no_face(analyzer):
    blank = np.zeros((240, 320, 3), dtype=np.uint8)
    assert analyzer.detect(blank) == [] and analyzer.largest_face(blank) is None
    with pytest.raises(NoFaceError, match="no face detected in generated frame 3"):
        analyzer.require_face(blank, "generated frame 3")


def test_missing_pack_fails_without_download(tmp_path, monkeypatch):
    import insightface.utils.storage as storage

    def no_download(*args, **kwargs):
        raise AssertionError("insightface tried to download a model pack")

    monkeypatch.setattr(storage, "download_file", no_download)
    for root in (tmp_path / "absent", tmp_path):
        (tmp_path / "models" / "buffalo_l").mkdir(parents=True, exist_ok=True)  # empty folder case
        with pytest.raises(FileNotFoundError) as info:
            build_face_analyzer("insightface", insightface_root=str(root), insightface_model="buffalo_l")
        message = str(info.value)
        assert str(root / "models" / "buffalo_l") in message
        assert "glintr100.onnx" in message and "det_10g.onnx" in message and "buffalo_l.zip" in message


def test_unknown_backend():
    with pytest.raises(ValueError, match="dlib.*insightface"):
        build_face_analyzer("mediapipe")
    with pytest.raises(ValueError, match="insightface_root"):
        build_face_analyzer("insightface")
