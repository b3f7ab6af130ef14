"""VideoEvaluator end to end with dlib on clips of packaged photos."""

import math

import numpy as np
import pytest

from mm_lightning.config import FacesConfig
from mm_lightning.evaluation.suite import EvaluatorConfig
from mm_lightning.evaluation.synthetic import astronaut, camera, grace_hopper
from mm_lightning.faces import NoFaceError

FPS = 8.0


def test_same_person_scores_near_one_and_another_clearly_lower(evaluator, astronaut_static, hopper_static):
    ref = evaluator.prepare_reference([astronaut()])
    same = evaluator.score_video(astronaut_static, FPS, ref)
    other = evaluator.score_video(hopper_static, FPS, ref)
    assert same["id_similarity"] > 0.97
    assert other["id_similarity"] < same["id_similarity"] - 0.05  # dlib: ~0.88 for these two people
    assert same["no_face_frames"] == 0 and same["frames_scored"] == 6
    assert len(same["per_frame_similarity"]) == 6


def test_static_clip_has_no_motion(evaluator, astronaut_static):
    result = evaluator.score_video(astronaut_static, FPS, [astronaut()])
    assert result["fm_inter"] == 0.0 and result["similarity_decay"] == 0.0
    assert result["dynamic"] is False and result["dynamic_degree"] == 0.0
    assert result["fm_ref"] > 0  # the reference photo is framed differently from the clip


def test_pan_is_dynamic_and_keeps_identity(evaluator, astronaut_pan):
    result = evaluator.score_video(astronaut_pan, FPS, [astronaut()])
    assert result["dynamic"] is True
    assert result["id_similarity"] > 0.97
    assert result["fm_inter"] < 0.05  # a rigid translation: landmarks only jitter


def test_faceless_video_counts_frames_and_leaves_face_metrics_undefined(evaluator):
    frames = np.repeat(camera()[None], 9, axis=0)  # no face dlib sees at 512x512
    result = evaluator.score_video(frames, FPS, [astronaut()])
    assert result["no_face_frames"] == result["frames_scored"] == 6 and result["face_rate"] == 0.0
    for name in ("id_similarity", "similarity_decay", "fm_ref", "fm_inter", "fm_ref_face", "fm_inter_face"):
        assert math.isnan(result[name])
    assert result["per_frame_similarity"] == [None] * 6


def test_reference_without_a_face_raises(evaluator, astronaut_static):
    with pytest.raises(NoFaceError):
        evaluator.score_video(astronaut_static, FPS, [camera()])


def test_compute_aggregates_what_score_video_returned(evaluator, astronaut_static, hopper_static):
    ref = evaluator.prepare_reference([astronaut(), np.ascontiguousarray(astronaut()[:, ::-1])])
    per_video = [evaluator.score_video(v, FPS, ref) for v in (astronaut_static, hopper_static)]
    total = evaluator.compute()
    assert "text_alignment" not in total and evaluator.text_alignment_skipped.startswith("text_alignment skipped")
    for name in ("id_similarity", "fm_ref", "fm_inter_face", "dynamic_degree"):
        assert total[name] == pytest.approx(np.mean([r[name] for r in per_video]))
    assert total["frames_scored"] == 12 and total["no_face_frames"] == 0 and total["face_rate"] == 1.0
    # The reference set is the photo and its mirror image: each frame's similarity is the mean of two cosines.
    sims = per_video[0]["per_frame_similarity"]
    assert per_video[0]["id_similarity"] == pytest.approx(np.mean(sims))
    evaluator.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert math.isnan(evaluator.compute()["id_similarity"])


def test_grace_hopper_reference_prefers_her_clip(evaluator, astronaut_static, hopper_static):
    ref = evaluator.prepare_reference([grace_hopper()])
    assert (
        evaluator.score_video(hopper_static, FPS, ref)["id_similarity"]
        > evaluator.score_video(astronaut_static, FPS, ref)["id_similarity"] + 0.05
    )


def test_config_from_the_experiment_eval_section():
    section = {"enabled": True, "frames_sampled": 8, "flow": "farneback", "clip_path": None, "no_face_similarity": None}
    config = EvaluatorConfig.from_mapping(section, faces=FacesConfig(backend="insightface"), frames_sampled=4)
    assert (config.frames_sampled, config.no_face_similarity, config.faces.backend) == (4, None, "insightface")
