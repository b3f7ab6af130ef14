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


def sliding_photo(
    photo: np.ndarray, num_frames: int = 49, size: tuple[int, int] = (480, 720), speed: int = 0, photo_height: int = 360
) -> np.ndarray:
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
        video[t, top : top + photo_height, x : x + pw] = scaled
    return video


def _noise(height: int, width: int, seed: int) -> np.ndarray:
    """float32 [height, width] blurred uniform noise stretched to 0..255: texture every flow method can track."""
    rng = np.random.default_rng(seed)
    noise = cv2.GaussianBlur(rng.uniform(0, 255, (height, width)).astype(np.float32), (0, 0), 2.0)
    return cv2.normalize(noise, None, 0, 255, cv2.NORM_MINMAX)


def _shifted(image: np.ndarray, dx: float, size: tuple[int, int]) -> np.ndarray:
    """image moved dx px to the right (sub-pixel exact by resampling), cut to size (H, W)."""
    m = np.float32([[1, 0, dx], [0, 1, 0]])
    return cv2.warpAffine(image, m, (size[1], size[0]), flags=cv2.INTER_LINEAR)


def _rgb(gray: np.ndarray) -> np.ndarray:
    gray = np.clip(np.asarray(gray), 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)


def composite(
    photo: np.ndarray,
    size: tuple[int, int] = (480, 720),
    photo_height: int = 360,
    center: tuple[float, float] | None = None,
) -> np.ndarray:
    """uint8 [H, W, 3]: `photo` scaled to photo_height (aspect kept) on a grey frame, its centre at
    `center` (x, y) in frame pixels (default: the frame's centre); parts outside the frame are cut."""
    h, w = size
    cx, cy = center if center is not None else (w / 2, h / 2)
    scale = photo_height / photo.shape[0]
    # One affine resample: scale about the photo's origin, then move its centre to (cx, cy).
    m = np.float32([[scale, 0, cx - scale * photo.shape[1] / 2], [0, scale, cy - photo_height / 2]])
    return cv2.warpAffine(
        photo,
        m,
        (w, h),
        flags=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=(128, 128, 128),
    )


def widen(photo: np.ndarray, center: tuple[float, float], shift: float, radius: float) -> np.ndarray:
    """`photo` with the content around `center` (x, y) pushed horizontally away from it, by up to `shift`
    px at a distance `radius` and fading beyond: a mouth widened into a smile, the rest of the face still."""
    h, w = photo.shape[:2]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    dx, dy = xs - center[0], ys - center[1]
    # Horizontal displacement shift * (dx / radius) inside the radius, Gaussian fall-off outside it.
    weight = np.exp(-(np.maximum(np.hypot(dx, dy) - radius, 0) ** 2) / (2 * (0.5 * radius) ** 2))
    move = shift * np.clip(dx / radius, -1, 1) * weight * (np.abs(dy) < 1.5 * radius)
    return cv2.remap(photo, xs - move.astype(np.float32), ys, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def translating_texture(
    shift: float, num_frames: int = 17, size: int | tuple[int, int] = 256, seed: int = 0
) -> np.ndarray:
    """uint8 [T, H, W, 3]: a window over blurred noise moving `shift` px per frame (all pixels move).

    size: an int for a square frame, or (H, W).
    """
    h, w = (size, size) if isinstance(size, int) else size
    noise = _noise(h, w + int(np.ceil(shift * num_frames)) + 1, seed)
    return _rgb(np.stack([_shifted(noise, -t * shift, (h, w)) for t in range(num_frames)]))


def moving_patch(
    shift: float, num_frames: int = 9, size: tuple[int, int] = (480, 720), patch: int = 160, seed: int = 0
) -> np.ndarray:
    """uint8 [T, H, W, 3]: a textured `patch`-px square moving `shift` px per frame to the right over a
    static textured background (local motion: at 160 px in 480x720, 7.4% of the pixels move, more than
    the top 5% dynamic degree averages, so exact flow scores exactly `shift`)."""
    h, w = size
    background, texture = _noise(h, w, seed), _noise(patch, patch, seed + 1)
    top = (h - patch) // 2
    frames = []
    for t in range(num_frames):
        frame = background.copy()
        # The patch moves left to right and stays in view: start so that the last frame ends at the right edge.
        x = (w - patch - shift * (num_frames - 1)) / 2 + t * shift
        x0 = int(np.floor(x))
        window = _shifted(texture, x - x0, (patch, patch + 1))[:, : patch + 1]
        mask = _shifted(np.ones((patch, patch), np.float32), x - x0, (patch, patch + 1))
        region = frame[top : top + patch, x0 : x0 + patch + 1]
        region[:] = mask * window + (1 - mask) * region
        frames.append(frame)
    return _rgb(np.stack(frames))
