"""ID similarity and similarity decay on given per-frame similarities (no face detector)."""

import math

import numpy as np
import pytest

from evaluation.id_similarity import IDSimilarity, frame_similarities
from evaluation.similarity_decay import SimilarityDecay, similarity_decay


def test_frame_similarities_are_cosines_to_the_reference():
    ref = np.array([1.0, 0.0])
    sims = frame_similarities([np.array([1.0, 0.0]), None, np.array([0.6, 0.8]), np.array([-2.0, 0.0])], ref)
    assert sims == pytest.approx([1.0, None, 0.6, -1.0])


def test_no_face_frames_score_the_policy_value_and_are_counted():
    zero, skip = IDSimilarity(no_face_similarity=0.0), IDSimilarity(no_face_similarity=None)
    for metric in (zero, skip):
        metric.update([0.9, None, 0.9, 0.9])
        metric.update([None, None])
    z, s = zero.compute(), skip.compute()
    assert float(z["id_similarity"]) == pytest.approx((0.675 + 0.0) / 2)
    assert float(s["id_similarity"]) == pytest.approx(0.9)  # the face-less video is undefined
    for out in (z, s):
        assert int(out["no_face_frames"]) == 3 and int(out["frames_scored"]) == 6


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
