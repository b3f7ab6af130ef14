"""Reading whole videos as uint8 RGB arrays [T, H, W, 3], writing mp4. Images: mm_lightning.data.media."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mm_lightning.data.media import MediaNotFoundError, MediaReadError


def read_video(path: str | Path) -> tuple[np.ndarray, float]:
    """Decode every frame of `path` with decord: (uint8 [T, H, W, 3] RGB, fps)."""
    path = Path(path)
    if not path.is_file():
        raise MediaNotFoundError(f"video not found: {path}")
    # decord imported lazily: it loads native libraries that plain metric code never needs.
    import decord

    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
        fps = float(reader.get_avg_fps())
        frames = reader.get_batch(list(range(len(reader)))).asnumpy()
    except Exception as err:  # decord raises its own DECORDError or RuntimeError on bad input
        raise MediaReadError(f"cannot decode video {path}: {err}") from err
    if frames.ndim != 4 or len(frames) == 0:
        raise MediaReadError(f"video has no frames: {path}")
    return frames, fps


def write_video(path: str | Path, frames: np.ndarray, fps: float) -> Path:
    """Encode uint8 RGB [T, H, W, 3] as H.264 mp4 (yuv420p, so any player opens it)."""
    import imageio.v2 as imageio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # macro_block_size=1: keep the exact size; imageio would otherwise resize to multiples of 16.
    # yuv420p needs even height and width.
    with imageio.get_writer(
        path, fps=fps, codec="libx264", quality=8, macro_block_size=1, pixelformat="yuv420p"
    ) as writer:
        for frame in np.asarray(frames, dtype=np.uint8):
            writer.append_data(frame)
    return path
