import shutil
import subprocess

import imageio_ffmpeg
import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from mm_lightning.data import MagicMirrorDataModule, collate
from mm_lightning.faces import FaceAnalyzer

GOOD = [
    {
        "kind": "image",
        "image": "images/astronaut_1.jpg",
        "caption": "a woman smiling",
        "references": ["references/astronaut_1_0.jpg", "references/astronaut_1_1.jpg"],
    },
    {
        "kind": "image",
        "image": "images/t1_c_0.jpg",
        "caption": "a man reading",
        "references": ["references/t1_c_0_0.jpg"],
    },
    {
        "kind": "video",
        "video": "videos/astronaut_0.mp4",
        "caption": "a woman talking",
        "reference_rule": "keyframe",
        "keyframe": 5,
    },
    {
        "kind": "video",
        "video": "videos/grace_hopper_1.mp4",
        "caption": "an elderly woman walking",
        "references": ["references/grace_hopper_clip1.jpg"],
    },
]
BAD = [
    {"kind": "image", "image": "bad/camera.png", "caption": "a man", "references": ["references/t1_c_0_0.jpg"]},
    {"kind": "image", "image": "images/t1_c_1.jpg", "caption": "a man", "references": ["bad/camera.png"]},
    {"kind": "image", "image": "bad/truncated.jpg", "caption": "a man", "references": ["references/t1_c_0_0.jpg"]},
    {"kind": "image", "image": "bad/missing.jpg", "caption": "a man", "references": ["references/t1_c_0_0.jpg"]},
    {"kind": "video", "video": "bad/random.mp4", "caption": "a man", "reference_rule": "keyframe"},
    {"kind": "video", "video": "bad/truncated.mp4", "caption": "a man", "reference_rule": "keyframe"},
    {"kind": "video", "video": "bad/truncated_faststart.mp4", "caption": "a man", "reference_rule": "keyframe"},
    {"kind": "video", "video": "videos/t1_d_6.mp4", "caption": "a man", "reference_rule": "keyframe", "keyframe": 500},
]
SIZES = dict(frames=5, height=40, width=56, clip_image_size=32, face_probe_frames=4)


def _truncate(path, fraction):
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * fraction)])


@pytest.fixture(scope="module")
def messy_root(tmp_path_factory, demo_root, write_dataset):
    """Good rows from the demo plus every kind of bad row, created here rather than shipped."""
    root = write_dataset(tmp_path_factory.mktemp("messy") / "data", GOOD + BAD)
    bad = root / "bad"
    bad.mkdir()
    # No face for dlib. PNG: as JPEG, its artefacts make dlib find a faint (score 0.04) face.
    Image.fromarray(skimage.data.camera()).save(bad / "camera.png")
    shutil.copy(demo_root / "images/t1_c_0.jpg", bad / "truncated.jpg")
    _truncate(bad / "truncated.jpg", 0.5)
    (bad / "random.mp4").write_bytes(np.random.default_rng(0).bytes(50_000))
    shutil.copy(demo_root / "videos/t1_a_3.mp4", bad / "truncated.mp4")  # index at the end: won't open
    _truncate(bad / "truncated.mp4", 0.6)
    # index at the front: opens and reports all frames, but the later ones can't be decoded
    subprocess.run(
        [
            imageio_ffmpeg.get_ffmpeg_exe(),
            "-v",
            "error",
            "-i",
            str(demo_root / "videos/t1_a_3.mp4"),
            "-c",
            "copy",
            "-movflags",
            "+faststart",
            str(bad / "truncated_faststart.mp4"),
        ],
        check=True,
    )
    _truncate(bad / "truncated_faststart.mp4", 0.6)
    return root


def _setup(root, kind, **kw):
    dm = MagicMirrorDataModule(root=str(root), kind=kind, **{**SIZES, **kw})
    dm.setup()
    return dm


def test_bad_rows_are_skipped_and_counted(messy_root):
    image, video = _setup(messy_root, "image"), _setup(messy_root, "video")
    assert image.skipped == {"no_face": 2, "unreadable_image": 1, "missing_file": 1}
    assert video.skipped == {"corrupt_video": 3, "keyframe_out_of_range": 1}
    assert [r.media for r, _ in image.dataset.items] == [r["image"] for r in GOOD[:2]]
    assert [r.media for r, _ in video.dataset.items] == [r["video"] for r in GOOD[2:]]


@pytest.mark.parametrize("kind, frames", [("image", 1), ("video", 5), ("video", 30)])  # 30 > 20 stored frames
def test_batch_shapes_dtypes_ranges(messy_root, kind, frames):
    dm = _setup(messy_root, kind, frames=frames, batch_size=2)
    batch = next(iter(dm.train_dataloader()))
    F, H, W, S = frames, SIZES["height"], SIZES["width"], SIZES["clip_image_size"]
    expect = {
        "pixels": (2, F, 3, H, W),
        "ref_pixels": (2, 3, S, S),
        "id_embedding": (2, 128),
        "face_mask": (2, F, 1, H, W),
        "face_boxes": (2, F, 4),
    }
    assert {k: tuple(batch[k].shape) for k in expect} == expect
    assert all(batch[k].dtype == torch.float32 for k in expect)
    assert -1 <= batch["pixels"].min() < 0 < batch["pixels"].max() <= 1
    assert 0 <= batch["ref_pixels"].min() and batch["ref_pixels"].max() <= 1
    assert set(batch["face_mask"].unique().tolist()) == {0.0, 1.0}
    boxes = batch["face_boxes"]
    assert (boxes >= 0).all() and (boxes <= 1).all() and (boxes[..., 2:] > boxes[..., :2]).all()
    torch.testing.assert_close(batch["id_embedding"].norm(dim=1), torch.ones(2))
    assert sorted(batch["caption"]) == sorted(r["caption"] for r in (GOOD[:2] if kind == "image" else GOOD[2:]))
    assert batch["dropped"] == 0
    # the mask covers the box: its centre pixel is inside, a corner of the frame is not
    cx, cy = ((boxes[0, 0, 0] + boxes[0, 0, 2]) / 2 * W).long(), ((boxes[0, 0, 1] + boxes[0, 0, 3]) / 2 * H).long()
    assert batch["face_mask"][0, 0, 0, cy, cx] == 1


def test_files_changed_after_caching_are_dropped(tmp_path, write_dataset):
    root = write_dataset(tmp_path / "data", GOOD)
    image, video = _setup(root, "image", batch_size=4), _setup(root, "video", batch_size=4)
    (root / GOOD[0]["image"]).unlink()
    _truncate(root / GOOD[2]["video"], 0.5)
    for dm, good_caption in ((image, GOOD[1]["caption"]), (video, GOOD[3]["caption"])):
        batches = list(dm.train_dataloader())
        assert len(batches) == 1 and batches[0]["dropped"] == 1 and batches[0]["caption"] == [good_caption]
    assert collate([None, None]) is None


def test_face_cache_reused_then_rebuilt_when_metadata_changes(tmp_path, write_dataset, monkeypatch):
    calls = []
    detect = FaceAnalyzer.detect
    monkeypatch.setattr(FaceAnalyzer, "detect", lambda self, image: calls.append(1) or detect(self, image))
    root = write_dataset(tmp_path / "data", GOOD)
    assert len(_setup(root, "image").dataset) == 2 and len(calls) > 0  # first setup: runs the detector
    calls.clear()
    assert len(_setup(root, "video").dataset) == 2 and calls == []  # same metadata: cache reused
    extra = {
        "kind": "image",
        "image": "images/t1_f_0.jpg",
        "caption": "a woman",
        "references": ["references/t1_f_0_0.jpg"],
    }
    write_dataset(root, GOOD + [extra])
    assert len(_setup(root, "image").dataset) == 3 and len(calls) > 0  # metadata changed: rebuilt
    assert [p.name for p in root.glob(".mm_faces*")] == [".mm_faces_dlib.npz"]  # no temp files left


def test_loader_order_is_seeded_and_workers_persist(messy_root):
    dm = _setup(messy_root, "image", batch_size=1, num_workers=1, seed=3)
    loader = dm.train_dataloader()
    assert loader.persistent_workers
    first = [b["caption"][0] for b in loader]
    assert first == [b["caption"][0] for b in _setup(messy_root, "image", batch_size=1, seed=3).train_dataloader()]
