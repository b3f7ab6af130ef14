"""A small raw folder for `prepare`, built from the face photos that ship inside packages.

Three identities (skimage's astronaut under a labelled folder, Grace Hopper and one man of
insightface's t1.jpg unlabelled), each in two photos and one or two clips with different
framing; a clip with a hard cut between two of them; and the bad cases, each with the reason
`prepare` must give. Frames are 256x256 (demo.py's renderer), clips 12 frames at 8 fps.
"""

import json
import subprocess
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import skimage.data
from PIL import Image

from mm_lightning.data.demo import _identities, _render

FPS = 8
# file (relative to RAW) -> reason prepare must drop it for
BAD = {
    "no_face.mp4": "no_face",
    "still.mp4": "static",
    "corrupt.mp4": "corrupt_video",
    "truncated.mp4": "corrupt_video",
    "truncated.jpg": "unreadable_image",
    "empty.jpg": "empty_file",
    "audio_only.mp4": "no_video_stream",
}
# identity -> kept items (file, or file#shot for the two-shot clip)
EXPECTED = {
    "astronaut_woman": [
        "astronaut_woman/near.jpg",
        "astronaut_woman/far.png",
        "astronaut_woman/pan.mp4",
        "astronaut_woman/zoom.mp4",
        "two_shots.mp4#0",
    ],
    "hopper": ["hopper_1.jpg", "hopper_2_cmyk.jpg", "hopper_talk.mp4"],
    "man": ["man_1_rotated.jpg", "man_2_16bit.png", "man_walk.mp4", "two_shots.mp4#1"],
}
SIDECAR = ("hopper_talk.mp4", "an elderly woman giving a talk on stage")
CAPTIONS_JSONL = ("man_1_rotated.jpg", "a man smiling at the camera")


def _faces() -> dict:
    by_name = {name: (photo, box) for name, _, photo, box in _identities()}
    return {"astronaut_woman": by_name["astronaut"], "hopper": by_name["grace_hopper"], "man": by_name["t1_c"]}


def _view(face, face_px, dx=0.0, dy=-10.0, angle=0.0, flip=False, gain=1.0) -> np.ndarray:
    photo, box = face
    return _render(photo, box, face_px, dx, dy, angle, flip, gain, 1.0, 1.0)  # [256, 256, 3] uint8


def _move(face, face_px, dx, zoom=0.0, flip=False, frames=12) -> list[np.ndarray]:
    """A camera pan of `dx` px per frame (and a zoom of `zoom` px of face width per frame)."""
    return [_view(face, face_px + zoom * k, dx=(k - frames / 2) * dx, flip=flip) for k in range(frames)]


def write_mp4(path: Path, frames: list[np.ndarray]):
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = frames[0].shape[:2]
    writer = imageio_ffmpeg.write_frames(
        str(path),
        (w, h),
        fps=FPS,
        codec="libx264",
        pix_fmt_out="yuv420p",
        quality=None,
        macro_block_size=1,
        ffmpeg_log_level="error",
        output_params=["-crf", "12", "-threads", "1"],
    )
    writer.send(None)
    for frame in frames:
        writer.send(np.ascontiguousarray(frame))
    writer.close()


def _save(path: Path, image: np.ndarray, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, **kwargs)


def build_raw_folder(raw: Path) -> Path:
    faces = _faces()
    astronaut, hopper, man = faces["astronaut_woman"], faces["hopper"], faces["man"]
    _save(raw / "astronaut_woman/near.jpg", _view(astronaut, 130, dx=15), quality=92)
    _save(raw / "astronaut_woman/far.png", _view(astronaut, 95, dx=-20, flip=True))
    write_mp4(raw / "astronaut_woman/pan.mp4", _move(astronaut, 110, dx=4))
    write_mp4(raw / "astronaut_woman/zoom.mp4", _move(astronaut, 95, dx=1, zoom=3, flip=True))

    _save(raw / "hopper_1.jpg", _view(hopper, 120, dx=-10), quality=92)
    Image.fromarray(_view(hopper, 100, dx=20, flip=True)).convert("CMYK").save(raw / "hopper_2_cmyk.jpg", quality=92)
    write_mp4(raw / "hopper_talk.mp4", _move(hopper, 110, dx=-4))
    (raw / "hopper_talk.txt").write_text(SIDECAR[1] + "\n")

    # Stored rotated by 90 degrees with an EXIF orientation tag that turns it upright again.
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(np.rot90(_view(man, 125, dx=5), k=1)).save(raw / "man_1_rotated.jpg", exif=exif, quality=92)
    grey16 = (_view(man, 100, dx=-15, flip=True).mean(2) * 257).astype(np.uint16)  # 16-bit greyscale PNG
    Image.fromarray(grey16).save(raw / "man_2_16bit.png")
    write_mp4(raw / "man_walk.mp4", _move(man, 105, dx=4, flip=True))
    (raw / "captions.jsonl").write_text(json.dumps({"path": CAPTIONS_JSONL[0], "caption": CAPTIONS_JSONL[1]}) + "\n")

    # A hard cut: the astronaut for 12 frames, then the man.
    write_mp4(raw / "two_shots.mp4", _move(astronaut, 115, dx=-4) + _move(man, 115, dx=4))

    camera = np.repeat(skimage.data.camera()[::2, ::2, None], 3, axis=2)  # 256x256, no face
    write_mp4(raw / "no_face.mp4", [np.roll(camera, 4 * k, axis=1) for k in range(12)])
    write_mp4(raw / "still.mp4", [_view(hopper, 110)] * 12)
    (raw / "corrupt.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (raw / "empty.jpg").write_bytes(b"")
    for good, bad in [("hopper_1.jpg", "truncated.jpg"), ("hopper_talk.mp4", "truncated.mp4")]:
        data = (raw / good).read_bytes()
        (raw / bad).write_bytes(data[: len(data) // 2])  # the first half of a good file
    subprocess.run(
        [
            imageio_ffmpeg.get_ffmpeg_exe(),
            "-loglevel",
            "error",
            "-y",
            "-f",
            "lavfi",
            "-i",
            "sine=d=1",
            str(raw / "audio_only.mp4"),
        ],
        check=True,
    )
    (raw / "notes.md").write_text("not media\n")
    return raw


def build_many_clips(raw: Path, count: int = 50, frames: int = 20, size: tuple[int, int] = (480, 720)) -> Path:
    """`count` clips (for throughput): the nine demo identities in turn, a 720x480 camera pan each."""
    import cv2

    people = _identities()
    h, w = size
    for c in range(count):
        name, _, photo, box = people[c % len(people)]
        cx, cy, scale = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2, 150 / (box[2] - box[0])
        clip = []
        for k in range(frames):
            m = cv2.getRotationMatrix2D((cx, cy), 0, scale * (1 + 0.01 * k))
            m[:, 2] += (w / 2 + 5 * (k - frames / 2) - cx, h / 2 - cy)
            clip.append(cv2.warpAffine(photo, m, (w, h), borderMode=cv2.BORDER_REPLICATE))
        write_mp4(raw / f"{name}/clip_{c:03d}.mp4", clip)
    return raw
