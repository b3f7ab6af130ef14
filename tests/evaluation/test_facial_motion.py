import math

import numpy as np
import pytest

from mm_lightning.evaluation.facial_motion import FacialMotionInter, FacialMotionRef, fm_inter, fm_ref

# A face in a 400x200 (W x H) frame: eyes, nose, mouth corners in pixels.
FACE = np.array([[180, 80], [220, 80], [200, 100], [185, 120], [215, 120]], np.float64)
SIZE = (200, 400)  # (H, W)


def test_identical_landmarks_give_zero():
    assert fm_inter([FACE, FACE, FACE], SIZE) == 0.0
    assert fm_ref([FACE, FACE], SIZE, [(FACE, SIZE)]) == 0.0


def test_position_alignment_removes_translation():
    assert fm_inter([FACE, FACE + [57, -31]], SIZE) == pytest.approx(0.0, abs=1e-12)


def test_size_normalisation_makes_proportional_images_equal():
    # The same face in a reference twice as large in each direction: same normalised landmarks.
    assert fm_ref([FACE], SIZE, [(FACE * 2, (400, 800))]) == pytest.approx(0.0, abs=1e-12)


def test_known_displacement():
    # Move the nose 8 px right (x / 400) and 6 px down (y / 200): q_nose moves by (0.02, 0.03).
    # The centroid moves by a fifth of that, so the nose moves (4/5)(0.02, 0.03) and the other
    # four points (-1/5)(0.02, 0.03) each: d_sum = (4/5 + 4/5) * |(0.02, 0.03)|.
    moved = FACE.copy()
    moved[2] += [8, 6]
    step = math.hypot(0.02, 0.03)
    assert fm_inter([FACE, moved], SIZE) == pytest.approx(1.6 * step)
    assert fm_inter([FACE, moved], SIZE, reduction="mean") == pytest.approx(1.6 * step / 5)
    assert fm_ref([moved, FACE], SIZE, [(FACE, SIZE)]) == pytest.approx(0.8 * step)  # mean of d and 0


def test_inter_takes_the_largest_pair_and_skips_missing_faces():
    small, large = FACE.copy(), FACE.copy()
    small[0, 0] += 4
    large[0, 0] -= 40
    assert fm_inter([small, None, large, FACE], SIZE) == pytest.approx(fm_inter([small, large], SIZE))


def test_undefined_without_enough_faces():
    assert math.isnan(fm_inter([FACE, None], SIZE))
    assert math.isnan(fm_ref([None, None], SIZE, [(FACE, SIZE)]))


def test_metrics_average_defined_videos_only():
    inter, ref = FacialMotionInter(), FacialMotionRef()
    moved = FACE.copy()
    moved[2] += [8, 6]
    inter.update([FACE, moved], SIZE)
    inter.update([FACE, FACE], SIZE)
    inter.update([FACE], SIZE)  # undefined: left out, not counted as 0
    assert float(inter.compute()) == pytest.approx(0.8 * math.hypot(0.02, 0.03))
    ref.update([moved], SIZE, [(FACE, SIZE)])
    assert float(ref.compute()) == pytest.approx(1.6 * math.hypot(0.02, 0.03))


def test_face_normalisation_ignores_scale_position_and_frame():
    # The same face at 3x in a 720x480 frame, moved: the face unit (inter-ocular distance) removes it all.
    big = FACE * 3 + [100, 20]
    assert fm_ref([big], (480, 720), [(FACE, SIZE)], normalise="face") == pytest.approx(0.0, abs=1e-12)
    assert fm_inter([FACE, big], SIZE, normalise="face") == pytest.approx(0.0, abs=1e-12)
    assert fm_ref([big], (480, 720), [(FACE, SIZE)]) > 0.05  # the frame-normalised FM reads framing


def test_known_displacement_in_face_units():
    # Inter-ocular distance 40 px: the nose moving (8, 6) px is (0.2, 0.15) face units, 0.25 long.
    # As in frame units, the nose moves 4/5 of it after centroid removal and the other four 1/5 each.
    moved = FACE.copy()
    moved[2] += [8, 6]
    assert fm_inter([FACE, moved], SIZE, normalise="face") == pytest.approx(1.6 * 0.25)
    assert fm_ref([moved], SIZE, [(FACE, SIZE)], normalise="face") == pytest.approx(1.6 * 0.25)
    # Mouth corners 4 px further apart each (a smile): centroid unchanged, d = 2 * 4 / 40.
    smile = FACE.copy()
    smile[3, 0] -= 4
    smile[4, 0] += 4
    assert fm_inter([FACE, smile], SIZE, normalise="face") == pytest.approx(0.2)
    assert fm_inter([FACE, smile], SIZE) == pytest.approx(8 / 400)
    with pytest.raises(ValueError, match="normalisation"):
        fm_inter([FACE, smile], SIZE, normalise="box")
