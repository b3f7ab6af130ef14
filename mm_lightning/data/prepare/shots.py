"""Shots (PySceneDetect) and the clip windows cut from them, plus the clip quality measures."""

import cv2
import numpy as np
from scenedetect import ContentDetector, detect


def detect_shots(path: str, num_frames: int, threshold: float, min_shot_frames: int) -> list[tuple[int, int]]:
    """[(first frame, end frame exclusive)] covering the video; one shot when there is no cut."""
    scenes = detect(path, ContentDetector(threshold=threshold, min_scene_len=min_shot_frames), start_in_scene=True)
    shots = [(start.frame_num, end.frame_num) for start, end in scenes]
    # PySceneDetect (OpenCV) and decord may disagree on the last frames; decord's count wins.
    shots = [(a, min(b, num_frames)) for a, b in shots if a < num_frames]
    return shots or [(0, num_frames)]


def clip_windows(shot: tuple[int, int], native_fps: float, frames: int, fps: float, max_clips: int) -> list[list[int]]:
    """Frame indices of consecutive, non-overlapping clips of `frames` frames at `fps` inside a shot."""
    step = native_fps / fps  # native frames per clip frame
    span = frames * step
    first, end = shot
    count = int((end - first) // span) if step > 0 else 0
    if max_clips:
        count = min(count, max_clips)
    return [[first + round(k * span + j * step) for j in range(frames)] for k in range(count)]


def brightness(frames: np.ndarray) -> float:
    """Mean luma (0-255) of [n, h, w, 3] uint8 RGB frames."""
    return float(np.mean([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY).mean() for f in frames]))


def sharpness(image: np.ndarray, box: np.ndarray) -> float:
    """Variance of the Laplacian of the grey face crop, resized to 112 px wide so the value is scale-free."""
    x1, y1, x2, y2 = np.round(box).astype(int)
    h, w = image.shape[:2]
    crop = image[max(0, y1) : min(h, y2), max(0, x1) : min(w, x2)]
    if crop.size == 0:
        return 0.0
    gray = cv2.cvtColor(np.ascontiguousarray(crop), cv2.COLOR_RGB2GRAY)
    gray = cv2.resize(gray, (112, max(1, round(112 * gray.shape[0] / gray.shape[1]))), interpolation=cv2.INTER_AREA)
    return float(cv2.Laplacian(gray, cv2.CV_64F).var())
