"""Small known-answer clips from packaged photos (240x360: dlib still finds the faces, fast)."""

import numpy as np
import pytest

from mm_lightning.evaluation.suite import EvaluatorConfig, VideoEvaluator
from mm_lightning.evaluation.synthetic import astronaut, grace_hopper, sliding_photo

SIZE = (240, 360)


def clip(photo: np.ndarray, speed: int = 0, num_frames: int = 17) -> np.ndarray:
    return sliding_photo(photo, num_frames=num_frames, size=SIZE, speed=speed, photo_height=200)


@pytest.fixture(scope="session")
def astronaut_static():
    return clip(astronaut())


@pytest.fixture(scope="session")
def astronaut_pan():
    # 12 px per frame against a threshold of 6*240/256 = 5.6 px.
    return clip(astronaut(), speed=12)


@pytest.fixture(scope="session")
def hopper_static():
    return clip(grace_hopper())


@pytest.fixture
def evaluator():
    return VideoEvaluator(EvaluatorConfig(frames_sampled=6))
