"""Image/video decoding, frame sampling and the resize + center-crop geometry."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import imageio_ffmpeg
import numpy as np
from PIL import Image, ImageOps

if TYPE_CHECKING:
    import decord


class MediaReadError(OSError):
    """A video or image that cannot be decoded or is empty; the message names the file."""


class MediaNotFoundError(MediaReadError, FileNotFoundError):
    """A video or image that does not exist."""


def read_image(path: str | Path) -> np.ndarray:
    """[h, w, 3] uint8 RGB from any PIL mode: EXIF rotation applied (phone photos store it there), grey, RGBA
    and CMYK converted, 16-bit grey scaled down. The one image reader of data, evaluation, score and generate.
    Raises MediaNotFoundError / MediaReadError on missing, corrupt or truncated files."""
    path = Path(path)
    if not path.is_file():
        raise MediaNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit grey: convert("RGB") would clip at 255
                grey = (np.asarray(im).astype(np.float32) / 257).clip(0, 255).astype(np.uint8)
                return np.repeat(grey[..., None], 3, axis=2)
            return np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as err:  # what PIL raises on corrupt or truncated files
        raise MediaReadError(f"cannot decode image {path}: {err}") from err


def write_mp4(path: str | Path, frames, fps: float) -> None:
    """H.264 mp4 (crf 18, yuv420p) of uint8 RGB frames [T, H, W, 3], cropped to even sides as yuv420p needs.
    One encoder thread and bitexact flags: the same frames always give the same bytes (the demo set is
    regenerated bit for bit; prepare's re-runs are reproducible)."""
    path = Path(path)
    h, w = frames[0].shape[0] // 2 * 2, frames[0].shape[1] // 2 * 2
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = imageio_ffmpeg.write_frames(
        str(path),
        (w, h),
        fps=fps,
        codec="libx264",
        pix_fmt_out="yuv420p",
        quality=None,
        macro_block_size=1,
        ffmpeg_log_level="error",
        output_params=["-crf", "18", "-threads", "1", "-fflags", "+bitexact", "-flags:v", "+bitexact"],
    )
    writer.send(None)  # start the ffmpeg process
    for frame in frames:
        writer.send(np.ascontiguousarray(frame[:h, :w]))
    writer.close()


def open_video(path: str | Path) -> decord.VideoReader:
    # decord is imported here, where a video is decoded: fit from cached latents, the reliance probe and generate
    # decode none, and a machine that runs only those needs no decoder installed.
    import decord

    # One decoder thread: parallelism comes from the DataLoader workers, and cores are few.
    return decord.VideoReader(str(path), num_threads=1)


def sample_frame_indices(num_frames: int, native_fps: float, frames: int, target_fps: float, start: float) -> list[int]:
    """`frames` indices at ~target_fps; `start` in [0, 1) picks where the window begins.

    Clips too short for that (or whose fps is unknown) fall back to a uniform stride over
    the whole clip, repeating frames when it has fewer than `frames`.
    """
    stride = max(1, round(native_fps / target_fps)) if native_fps > 0 else 1
    span = (frames - 1) * stride + 1
    if num_frames >= span and native_fps > 0:
        first = int(start * (num_frames - span + 1))
        return list(range(first, first + span, stride))
    return np.linspace(0, num_frames - 1, frames).round().astype(int).tolist()


def crop_geometry(h: int, w: int, height: int, width: int) -> tuple[float, int, int]:
    """Scale and offsets that resize an h x w frame to cover height x width, then center-crop.

    A stored-frame pixel (x, y) lands at (x * scale - left, y * scale - top).
    """
    scale = max(height / h, width / w)
    left = (max(width, round(w * scale)) - width) // 2
    top = (max(height, round(h * scale)) - height) // 2
    return scale, left, top


def resize_center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """[h, w, 3] uint8 -> [height, width, 3] uint8, aspect kept, overflow cropped."""
    h, w = image.shape[:2]
    scale, left, top = crop_geometry(h, w, height, width)
    size = (max(width, round(w * scale)), max(height, round(h * scale)))
    resized = cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    return resized[top : top + height, left : left + width]


def crop_boxes(boxes: np.ndarray, h: int, w: int, height: int, width: int) -> np.ndarray:
    """[n, 4] stored-frame pixel boxes -> [n, 4] pixel boxes in the cropped training frame."""
    scale, left, top = crop_geometry(h, w, height, width)
    out = boxes * scale - np.array([left, top, left, top], dtype=np.float32)
    return np.clip(out, 0, [width, height, width, height]).astype(np.float32)
