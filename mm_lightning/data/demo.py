"""Built-in demo dataset, generated from face photos that ship inside installed packages.

Nine identities: skimage's astronaut, matplotlib's Grace Hopper, insightface's Tom Hanks
crop and the six people of insightface's group photo t1.jpg. Each becomes
- 2 image pairs: a target view plus 1-2 reference views, each an independent mild random
  augmentation (rotation, scale, shift, colour jitter; no flip) of the same photo. Mild, so that
  two views of one person differ less than two people do: otherwise the reference face says
  little about the target, and the probe has nothing to see (README, the probe);
- 1 video clip (the astronaut gets 2): 20 frames at 8 fps, 256x256, with a smooth camera
  move (pan, zoom, roll) and a brightness drift; half reference a keyframe, half a still.
Faces stay 95-140 px wide, well above what dlib's HOG detector needs. Everything is drawn
from fixed seeds and encoded bit-exactly, so two generations give identical bytes.

Identities of one class word share their captions (every woman's first image pair reads
"a woman smiling in a sunny park", ...): the caption alone cannot tell them apart, so
training has to read the reference face, and the identity-reliance probe can see whether it
does (mm_lightning/reliance.py).
"""

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from mm_lightning.data.formats import METADATA
from mm_lightning.data.media import write_mp4

VERSION = 3  # bump when the generated content changes: the folder name carries it
SIZE, CLIP_FRAMES, CLIP_FPS, SEED = 256, 20, 8, 1234

# Face boxes (x1, y1, x2, y2) found by dlib's HOG detector, upsampled once as the dlib
# backend runs it, on the source photos. Hard-coded so generation needs no detector; the
# tests run the detector on every generated image and clip instead.
T1_FACES = [  # t1.jpg, left to right; all six are detected
    ("t1_a", "a woman", (67, 283, 175, 390)),
    ("t1_b", "a woman", (275, 176, 364, 265)),
    ("t1_c", "a man", (450, 295, 557, 402)),
    ("t1_d", "a man", (724, 367, 832, 474)),
    ("t1_e", "a man", (870, 67, 999, 196)),
    ("t1_f", "a woman", (1118, 283, 1226, 390)),
]
# Captions are shared across identities (see above): image pair k of everyone reads
# IMAGE_CAPTIONS[k], clip c reads VIDEO_CAPTIONS[c % 2]; the first video caption is also
# the first prompt of the demo evaluation set.
IMAGE_CAPTIONS = ["{who} smiling in a sunny park", "{who} reading a book in a cozy library"]
VIDEO_CAPTIONS = ["{who} talking to the camera in a bright office", "{who} walking along a beach at sunset"]


def _identities() -> list[tuple[str, str, np.ndarray, tuple]]:
    """(name, who, RGB photo, face box) for each identity."""
    import matplotlib.cbook
    import skimage.data

    insightface_images = Path(importlib.util.find_spec("insightface").submodule_search_locations[0]) / "data/images"

    def rgb(path: Path) -> np.ndarray:
        return np.asarray(Image.open(path).convert("RGB"))

    t1 = rgb(insightface_images / "t1.jpg")
    return [
        ("astronaut", "a woman", skimage.data.astronaut(), (175, 76, 265, 166)),
        (
            "grace_hopper",
            "an elderly woman",
            rgb(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)),
            (180, 139, 366, 325),
        ),
        ("tom_hanks", "a man", rgb(insightface_images / "Tom_Hanks_54745.png"), (6, 26, 96, 116)),
    ] + [(name, who, t1, box) for name, who, box in T1_FACES]


def _render(photo, box, face_px, dx, dy, angle, flip, gain, contrast, saturation) -> np.ndarray:
    """One SIZE x SIZE view: the face `face_px` wide, its centre at the frame centre + (dx, dy),
    rolled by `angle` degrees, then colour-jittered. -> [SIZE, SIZE, 3] uint8."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    m = cv2.getRotationMatrix2D((cx, cy), angle, face_px / (box[2] - box[0]))
    m[:, 2] += (SIZE / 2 + dx - cx, SIZE / 2 + dy - cy)
    # Replicated borders, not reflected ones: a mirrored copy of the face would be a second face.
    out = cv2.warpAffine(photo, m, (SIZE, SIZE), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    out = out[:, ::-1] if flip else out
    out = out.astype(np.float32)
    gray = out.mean(2, keepdims=True)
    out = gray + saturation * (out - gray)
    out = out.mean() + contrast * (out - out.mean())
    return np.clip(out * gain, 0, 255).round().astype(np.uint8)


def _augment(photo, box, rng: np.random.Generator) -> np.ndarray:
    return _render(
        photo,
        box,
        face_px=rng.uniform(112, 128),
        dx=rng.uniform(-6, 6),
        dy=rng.uniform(-21, -9),
        angle=rng.uniform(-4, 4),
        flip=False,
        gain=rng.uniform(0.95, 1.05),
        contrast=rng.uniform(0.95, 1.05),
        saturation=rng.uniform(0.95, 1.05),
    )


def _clip(photo, box, rng: np.random.Generator) -> list[np.ndarray]:
    """CLIP_FRAMES frames of a smooth move between two random camera poses."""
    start, end = rng.uniform([95, -25, -25, 0.85], [115, 25, 5, 1.0], size=(2, 4))
    end[0] += 25  # zoom in by ~25 px of face width
    end[3] += 0.15  # while brightening,
    if rng.random() < 0.5:
        start, end = end, start  # or zoom out while darkening
    roll, phase, flip = rng.uniform(3, 8), rng.uniform(0, 2 * np.pi), rng.random() < 0.5
    frames = []
    for k in range(CLIP_FRAMES):
        t = (1 - np.cos(np.pi * k / (CLIP_FRAMES - 1))) / 2  # ease in/out: no jerk at the ends
        face_px, dx, dy, gain = start + t * (end - start)
        angle = roll * np.sin(phase + 2 * np.pi * k / CLIP_FRAMES)
        frames.append(_render(photo, box, face_px, dx, dy, angle, flip, gain, 1.0, 1.0))
    return frames


def _write_jpg(path: Path, image: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, quality=95)


def _generate(out: Path):
    rows = []
    identities = _identities()
    for i, (name, who, photo, box) in enumerate(identities):
        for k in range(2):  # image pairs; the second one gets two references
            rng = np.random.default_rng([SEED, i, k])
            _write_jpg(out / f"images/{name}_{k}.jpg", _augment(photo, box, rng))
            refs = [f"references/{name}_{k}_{j}.jpg" for j in range(k + 1)]
            for ref in refs:
                _write_jpg(out / ref, _augment(photo, box, rng))
            rows.append(
                {
                    "kind": "image",
                    "image": f"images/{name}_{k}.jpg",
                    "references": refs,
                    "caption": IMAGE_CAPTIONS[k].format(who=who),
                    "identity": name,
                }
            )
    for c in range(len(identities) + 1):
        i = c % len(identities)
        name, who, photo, box = identities[i]
        rng = np.random.default_rng([SEED, i, 100 + c])
        video = f"videos/{name}_{c}.mp4"
        write_mp4(out / video, _clip(photo, box, rng), CLIP_FPS)
        row = {
            "kind": "video",
            "video": video,
            "caption": VIDEO_CAPTIONS[c % len(VIDEO_CAPTIONS)].format(who=who),
            "identity": name,
            "fps": CLIP_FPS,
        }
        if c % 2 == 0:  # reference = face crop of a keyframe: the first frame, or a later one
            row |= {"reference_rule": "keyframe"} | ({"keyframe": 2 * c} if c else {})
        else:
            row["references"] = [f"references/{name}_clip{c}.jpg"]
            _write_jpg(out / row["references"][0], _augment(photo, box, rng))
        rows.append(row)
    (out / METADATA).write_text("".join(json.dumps(r) + "\n" for r in rows))


def ensure_demo_dataset(cache_dir: str | Path) -> Path:
    """Path of the demo dataset under cache_dir, generating it on first use (a few seconds).

    It is built in a temporary folder and renamed into place, so a folder that exists is
    complete, and processes racing to build it can't see or leave a half-written one.
    """
    final = Path(cache_dir) / f"mm_demo_v{VERSION}"
    if (final / METADATA).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp"))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the dataset may be shared
        _generate(tmp)
        os.rename(tmp, final)
    except OSError:
        if not (final / METADATA).is_file():  # not a lost race with another builder
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
