"""ID similarity and similarity decay on given per-frame similarities (no face detector)."""

import math

import numpy as np
import pytest

from mm_lightning.evaluation.id_similarity import IDSimilarity, frame_similarities
from mm_lightning.evaluation.similarity_decay import SimilarityDecay, similarity_decay


def test_frame_similarities_are_cosines_to_the_reference():
    ref = np.array([1.0, 0.0])
    sims = frame_similarities([np.array([1.0, 0.0]), None, np.array([0.6, 0.8]), np.array([-2.0, 0.0])], ref)
    assert sims == pytest.approx([1.0, None, 0.6, -1.0])


def test_similarity_is_the_mean_of_per_reference_cosines():
    # The paper: "the average similarity of a group of reference images". Two orthogonal references and a
    # frame equal to the first: cosines 1 and 0, mean 0.5 (the cosine to the mean embedding would be 0.707).
    refs = np.array([[1.0, 0.0], [0.0, 3.0]])
    assert frame_similarities([np.array([2.0, 0.0]), None], refs) == pytest.approx([0.5, None])
    assert frame_similarities([np.array([1.0, 1.0])], refs) == pytest.approx([np.sqrt(0.5)])


def test_no_face_frames_are_left_out_by_default_and_counted():
    # One missed frame in four: the default mean is over the three face frames, the "zero" policy
    # scores it 0 and loses 0.225. A video with no face at all is undefined by default, never 0.
    default, zero = IDSimilarity(), IDSimilarity(no_face_similarity=0.0)
    for metric in (default, zero):
        assert float(metric([0.9, None, 0.9, 0.9])["id_similarity"]) == pytest.approx(
            0.9 if metric is default else 0.675
        )
        faceless = float(metric([None, None])["id_similarity"])
        assert math.isnan(faceless) if metric is default else faceless == 0.0
    d, z = default.compute(), zero.compute()
    assert float(d["id_similarity"]) == pytest.approx(0.9)  # the face-less video is left out
    assert float(z["id_similarity"]) == pytest.approx((0.675 + 0.0) / 2)
    for out in (d, z):
        assert int(out["no_face_frames"]) == 3 and int(out["frames_scored"]) == 6
        assert int(out["videos_without_face"]) == 1 and float(out["face_rate"]) == pytest.approx(0.5)


def test_all_videos_without_a_face_give_nan_not_zero():
    metric = IDSimilarity()
    metric.update([None] * 4)
    out = metric.compute()
    assert math.isnan(float(out["id_similarity"])) and float(out["face_rate"]) == 0.0
    assert int(out["videos_without_face"]) == 1


def test_decay_of_a_linear_fade():
    # s = 0.9 - 0.1 * tau over 5 frames: decay 0.1, whatever frame lacks a face.
    sims = [0.9 - 0.1 * i / 4 for i in range(5)]
    assert similarity_decay(sims) == pytest.approx(0.1)
    assert similarity_decay([sims[0], None, sims[2], sims[3], None]) == pytest.approx(0.1)
    assert similarity_decay([0.8] * 5) == pytest.approx(0.0)


def test_decay_undefined_below_two_faces():
    assert math.isnan(similarity_decay([0.9, None, None]))
    assert math.isnan(similarity_decay([0.9]))
    metric = SimilarityDecay()
    metric.update([0.9, None])
    metric.update([1.0, 0.8])
    assert float(metric.compute()) == pytest.approx(0.2)
