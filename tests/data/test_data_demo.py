import hashlib
import time

import pytest

from mm_lightning.data import MagicMirrorDataModule
from mm_lightning.data.demo import CLIP_FRAMES, ensure_demo_dataset
from mm_lightning.data.formats import read_metadata
from mm_lightning.data.media import open_video, read_image
from mm_lightning.faces import build_face_analyzer


def _hashes(root):
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_demo_is_deterministic_and_complete(tmp_path, demo_root):
    start = time.perf_counter()
    again = ensure_demo_dataset(tmp_path)
    assert time.perf_counter() - start < 30
    # the session's demo, less what training derived from it (face and latent caches)
    assert _hashes(again) == {k: v for k, v in _hashes(demo_root).items() if not k.startswith(".mm_")}
    assert ensure_demo_dataset(tmp_path) == again  # second call reuses the folder
    assert [p.name for p in tmp_path.iterdir()] == [again.name]  # no temp folders left behind
    rows = read_metadata(again)
    assert sum(r.kind == "image" for r in rows) == 18 and sum(r.kind == "video" for r in rows) == 10
    assert all(any(w in r.caption.split() for w in ("man", "woman")) for r in rows)


def test_dlib_finds_a_face_in_every_demo_target(demo_root):
    analyzer = build_face_analyzer("dlib")
    for row in read_metadata(demo_root):
        if row.kind == "image":
            assert analyzer.largest_face(read_image(demo_root / row.media)) is not None, row.media
        else:
            video = open_video(demo_root / row.media)
            assert len(video) == CLIP_FRAMES
            frames = video.get_batch([0, CLIP_FRAMES // 2, CLIP_FRAMES - 1]).asnumpy()
            assert frames.shape == (3, 256, 256, 3)
            for k, frame in enumerate(frames):
                face = analyzer.largest_face(frame)
                assert face is not None, f"{row.media} frame {k}"
                assert face.box[2] - face.box[0] >= 80  # big enough for dlib at any upsampling


@pytest.mark.parametrize("kind", ["image", "video"])
def test_demo_datamodule_keeps_every_row(demo_root, kind):
    dm = MagicMirrorDataModule(
        cache_dir=demo_root.parent, kind=kind, frames=4, height=32, width=48, clip_image_size=32
    )  # fit's face-probe setting: the face cache built here is the one every fit of the session reads
    dm.setup()
    assert dm.skipped == {}
    assert len(dm.dataset) == (18 if kind == "image" else 10)
