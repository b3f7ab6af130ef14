"""Backend-independent parts: ordering, mean embedding, crops, masks."""

import numpy as np
import pytest

from mm_lightning.faces import Face, FaceAnalyzer, NoFaceError, face_crop, face_mask, mean_identity_embedding


def make_face(box, embedding=(1.0, 0.0)):
    return Face(np.array(box, np.float32), np.zeros((5, 2), np.float32), np.array(embedding, np.float32), 1.0)


class ListAnalyzer(FaceAnalyzer):
    name, embedding_dim = "list", 2

    def __init__(self, faces):
        self.faces = faces

    def _detect(self, image):
        return list(self.faces)


def test_detect_sorts_by_area_and_require_face_names_input():
    small, large, medium = make_face([0, 0, 10, 10]), make_face([0, 0, 30, 40]), make_face([5, 5, 25, 25])
    image = np.zeros((50, 50, 3), np.uint8)
    assert ListAnalyzer([small, large, medium]).detect(image) == [large, medium, small]
    assert ListAnalyzer([small, large]).require_face(image, "ref.png") is large
    with pytest.raises(NoFaceError, match="no face detected in ref.png"):
        ListAnalyzer([]).require_face(image, "ref.png")
    with pytest.raises(ValueError, match="uint8"):
        ListAnalyzer([]).detect(image.astype(np.float32))


def test_mean_identity_embedding():
    mean = mean_identity_embedding([make_face([0, 0, 1, 1], (1, 0)), make_face([0, 0, 1, 1], (0, 1))])
    np.testing.assert_allclose(mean, [2**-0.5, 2**-0.5], atol=1e-6)
    with pytest.raises(ValueError):
        mean_identity_embedding([])


def test_face_crop_pads_outside_image():
    image = np.full((100, 100, 3), 255, dtype=np.uint8)
    crop = face_crop(image, make_face([0, 0, 20, 20]), 40, margin=0.5)  # 40 px square centred on (10, 10)
    assert crop.shape == (40, 40, 3) and crop.dtype == np.uint8
    assert not crop[:10].any() and not crop[:, :10].any() and (crop[10:, 10:] == 255).all()


def test_face_crop_resizes_box_region():
    image = np.zeros((100, 200, 3), dtype=np.uint8)
    image[20:60, 120:160] = (255, 0, 0)
    crop = face_crop(image, make_face([120, 20, 160, 60]), 20, margin=0.0)
    assert (crop == (255, 0, 0)).all()


def test_face_mask_dilates_and_clips():
    mask = face_mask(100, 100, [10, 20, 50, 40], dilate=0.25)  # grows by 10 px in x, 5 px in y
    assert mask.dtype == np.float32 and mask.shape == (100, 100)
    expected = np.zeros((100, 100), np.float32)
    expected[15:45, 0:60] = 1
    np.testing.assert_array_equal(mask, expected)
