"""Videos with a known answer, built from photos that ship inside installed packages.

Used by the tests, the `bench-metrics` timing and anyone checking the metrics by hand.
"""

from __future__ import annotations

import cv2
import numpy as np


def astronaut() -> np.ndarray:
    """skimage's astronaut (Eileen Collins), 512x512 RGB; dlib's largest face is hers."""
    from skimage import data

    return data.astronaut()


def grace_hopper() -> np.ndarray:
    """matplotlib's Grace Hopper portrait, 600x512 RGB: a second identity."""
    import imageio.v2 as imageio
    from matplotlib import cbook

    return imageio.imread(cbook.get_sample_data("grace_hopper.jpg"))


def camera() -> np.ndarray:
    """skimage's cameraman as RGB, 512x512: dlib finds no face at this size (it does at some smaller scales)."""
    from skimage import data

    return np.repeat(data.camera()[..., None], 3, axis=2)


def sliding_photo(photo: np.ndarray, num_frames: int = 49, size: tuple[int, int] = (480, 720),
                  speed: int = 0, photo_height: int = 360) -> np.ndarray:
    """uint8 [T, H, W, 3]: `photo` (scaled to photo_height) on a grey frame, moving `speed` px per frame.

    It bounces between the left and right edges (a triangle wave), so it stays in view and moves at
    exactly `speed` px between any two consecutive frames except at a bounce. speed=0: a still video.
    """
    h, w = size
    pw = round(photo.shape[1] * photo_height / photo.shape[0])
    scaled = cv2.resize(photo, (pw, photo_height), interpolation=cv2.INTER_AREA)
    span, top = w - pw, (h - photo_height) // 2
    video = np.full((num_frames, h, w, 3), 128, dtype=np.uint8)
    for t in range(num_frames):
        x = (t * speed) % (2 * span) if span else 0
        x = x if x <= span else 2 * span - x
        video[t, top:top + photo_height, x:x + pw] = scaled
    return video


def translating_texture(shift: float, num_frames: int = 17, size: int = 256, seed: int = 0) -> np.ndarray:
    """uint8 [T, size, size, 3]: a window over blurred noise moving `shift` px per frame (all pixels move)."""
    rng = np.random.default_rng(seed)
    extent = size + int(np.ceil(shift * num_frames)) + 1
    noise = cv2.GaussianBlur(rng.uniform(0, 255, (size, extent)).astype(np.float32), (0, 0), 2.0)
    noise = cv2.normalize(noise, None, 0, 255, cv2.NORM_MINMAX)
    frames = []
    for t in range(num_frames):
        # Sub-pixel shifts by resampling, so any speed is exact rather than rounded to whole pixels.
        m = np.float32([[1, 0, -t * shift], [0, 1, 0]])
        frames.append(cv2.warpAffine(noise, m, (size, size), flags=cv2.INTER_LINEAR))
    gray = np.clip(np.stack(frames), 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=3)
