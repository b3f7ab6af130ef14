"""One input file -> its usable images/clips (written under DATASET_DIR) and its drops.

Runs in worker processes. The result of each file is stored as
`DATASET_DIR/.prepare/files/<key>.json`, the key naming path, size, mtime and settings:
a re-run, or `--merge` after sharded runs, reads it back instead of processing again.
"""

import json
import logging
import os
import re
import tempfile
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from mm_lightning.data.media import open_video, read_image, write_mp4
from mm_lightning.data.prepare.faces import Drop, ShrunkAnalyzer, clip_faces, face_side, image_face
from mm_lightning.data.prepare.scan import InputFile
from mm_lightning.data.prepare.shots import brightness, clip_windows, detect_shots, sharpness

log = logging.getLogger(__name__)
RESULTS = ".prepare/files"
_worker: dict = {}  # per process: the face analyzer and the motion scorer, built once


def init_worker(make_analyzer, make_motion, max_side):
    """`make_motion()` -> (frames [T, H, W, 3], fps) -> (per-pair flow scores, threshold, pairs needed):
    the dynamic-degree rule, passed in by the command so data/ does not import evaluation/."""
    cv2.setNumThreads(1)  # parallelism comes from the processes
    _worker.update(analyzer=ShrunkAnalyzer(make_analyzer(), max_side), motion=make_motion())


def _write_jpg(path: Path, image: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, quality=95)


def _stem(f: InputFile, key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", Path(f.path).stem)[:40] + "_" + key[:8]


def _process_image(f: InputFile, raw: Path, out: Path, key: str, s: dict) -> dict:
    try:
        image = read_image(raw / f.path)
    except Exception:  # PIL raises OSError, SyntaxError, ValueError... on corrupt or truncated files
        raise Drop("unreadable_image") from None
    face = image_face(_worker["analyzer"], image, s["max_second_face"], s["min_face_size"])
    if brightness(image[None]) < s["min_brightness"]:
        raise Drop("dark")
    if sharpness(image, face.box) < s["min_sharpness"]:
        raise Drop("blurry")
    media = f"images/{_stem(f, key)}.jpg"
    _write_jpg(out / media, image)
    return {
        "kind": "image",
        "media": media,
        "source": f.path,
        "label": f.label,
        "caption": f.caption,
        "embedding": face.embedding.round(6).tolist(),
        "face_size": face_side(face),
    }


def _process_clip(frames: np.ndarray, s: dict) -> tuple[int, float, np.ndarray, list]:
    """-> (keyframe index in the clip, its face's cosine to the clip embedding, clip identity embedding,
    face sizes); raises Drop."""
    if brightness(frames[:: max(1, len(frames) // s["face_frames"])]) < s["min_brightness"]:
        raise Drop("dark")
    scores, thres, count = _worker["motion"](frames, s["fps"])
    if not scores or sum(v > s["motion_scale"] * thres for v in scores) < count:
        raise Drop("static")
    probe = sorted(set(np.linspace(0, len(frames) - 1, s["face_frames"]).round().astype(int).tolist()))
    found, embedding = clip_faces(
        _worker["analyzer"],
        frames[probe],
        s["max_second_face"],
        s["min_face_size"],
        s["min_face_presence"],
        s["pair_min_cosine"],
    )
    best = max(found, key=lambda i: found[i].area)  # the keyframe: the largest view of the face
    keyframe, face = probe[best], found[best]
    if sharpness(frames[keyframe], face.box) < s["min_sharpness"]:
        raise Drop("blurry")
    return keyframe, float(face.embedding @ embedding), embedding, [face_side(x) for x in found.values()]


def _process_video(f: InputFile, raw: Path, out: Path, key: str, s: dict) -> tuple[list, list]:
    path = str(raw / f.path)
    try:
        video = open_video(path)
        num_frames, native_fps = len(video), float(video.get_avg_fps())
    except Exception as e:  # decord raises DECORDError / RuntimeError
        raise Drop("no_video_stream" if "video stream" in str(e) else "corrupt_video") from None
    if num_frames == 0 or native_fps <= 0:
        raise Drop("corrupt_video")
    try:
        shots = detect_shots(path, num_frames, s["scene_threshold"], s["min_shot_frames"])
    except Exception:
        raise Drop("corrupt_video") from None
    items, drops = [], []
    for n, shot in enumerate(shots):
        windows = clip_windows(shot, native_fps, s["frames"], s["fps"], s["max_clips_per_shot"])
        if not windows:
            drops.append({"what": f"{f.path}#shot{n}", "reason": "too_short"})
        for c, idx in enumerate(windows):
            name = f"{_stem(f, key)}_s{n}c{c}"
            try:
                try:
                    frames = video.get_batch(idx).asnumpy()  # [frames, h, w, 3] uint8
                except Exception:  # a truncated file fails when decoding reaches the damage
                    raise Drop("corrupt_video") from None
                keyframe, keyframe_cosine, embedding, sizes = _process_clip(frames, s)
            except Drop as e:
                drops.append({"what": f"{f.path}#shot{n}/clip{c}", "reason": str(e)})
                continue
            write_mp4(out / f"clips/{name}.mp4", frames, s["fps"])
            _write_jpg(out / f"keyframes/{name}.jpg", frames[keyframe])
            items.append(
                {
                    "kind": "video",
                    "media": f"clips/{name}.mp4",
                    "source": f.path,
                    "label": f.label,
                    "caption": f.caption,
                    "embedding": embedding.round(6).tolist(),
                    "face_size": float(np.median(sizes)),
                    "keyframe": keyframe,
                    "keyframe_cosine": keyframe_cosine,
                    "keyframe_image": f"keyframes/{name}.jpg",
                    "fps": s["fps"],
                    "shot": n,
                }
            )
    if not items and len(drops) == 1:  # a single-clip file: its clip's reason is the file's
        raise Drop(drops[0]["reason"])
    return items, drops


def process_file(f: InputFile, raw: str, out: str, settings: dict) -> dict:
    """{"source", "key", "items": [...], "drops": [{"what", "reason"}]}; never raises for bad media."""
    raw, out = Path(raw), Path(out)
    key = f.key(settings["hash"])
    result = {
        "source": f.path,
        "key": key,
        "kind": f.kind,
        "settings": settings["hash"],
        "input": str(raw),
        "items": [],
        "drops": [],
    }
    try:
        if f.size == 0:
            raise Drop("empty_file")
        if f.kind == "image":
            result["items"] = [_process_image(f, raw, out, key, settings)]
        else:
            result["items"], result["drops"] = _process_video(f, raw, out, key, settings)
    except Drop as e:
        result["drops"] = [{"what": f.path, "reason": str(e)}]
    except Exception as e:  # anything else a decoder or detector throws: listed, never fatal to the run
        log.warning("prepare: %s failed: %s: %s", f.path, type(e).__name__, e)
        detail = f"{type(e).__name__}: {e}"
        result["items"], result["drops"] = [], [{"what": f.path, "reason": "error", "detail": detail}]
    save_result(out, result)
    return result


def result_path(out: Path, key: str) -> Path:
    return out / RESULTS / f"{key}.json"


def save_result(out: Path, result: dict):
    path = result_path(out, result["key"])
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(result, fh)
    os.replace(tmp, path)  # atomic: a killed run never leaves half a result behind
