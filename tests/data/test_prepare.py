"""`prepare`: raw clips and photos -> metadata.jsonl, checked on a folder whose answer is known
(prepare_fixture.py): identities, pairs, captions, drop reasons, re-runs, shards, then `fit`."""

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from mm_lightning.cli import main
from mm_lightning.data.formats import read_metadata
from mm_lightning.data.prepare import pipeline
from mm_lightning.data.prepare.captions import class_word, has_identity_word
from mm_lightning.data.prepare.identities import group_identities
from mm_lightning.data.prepare.pairs import pair_items
from mm_lightning.data.prepare.shots import clip_windows
from tests.data.prepare_fixture import BAD, CAPTIONS_JSONL, EXPECTED, SIDECAR, build_raw_folder
from tests.helpers import run_cli


def _prepare(raw: Path, out: Path, uri: str, *extra: str) -> int:
    args = ["--input", str(raw)] if raw else []
    return main(["prepare", *args, "--out", str(out), "prepare.num_workers=1", f"tracking.tracking_uri={uri}", *extra])


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    return build_raw_folder(tmp_path_factory.mktemp("raw"))


@pytest.fixture(scope="module")
def prepared(raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("dataset")
    uri = f"sqlite:///{out.parent}/prepare_mlflow.db"
    assert _prepare(raw, out, uri) == 0
    return out, uri


def _items(out: Path) -> dict[str, dict]:
    """Every kept image/clip by output path (images and keyframes both name their item)."""
    items = {}
    for path in (out / ".prepare/files").glob("*.json"):
        for item in json.loads(path.read_text())["items"]:
            shot = f"#{item['shot']}" if "two_shots" in item["source"] else ""
            item["name"] = item["source"] + shot
            items[item["media"]] = item
            if "keyframe_image" in item:
                items[item["keyframe_image"]] = item
    return items


@pytest.mark.slow  # the shared prepare run takes ~20 s of CPU
def test_prepare_outcome_on_a_known_folder(prepared):
    out, uri = prepared
    rows = read_metadata(out)  # today's format, parsed by the training code
    items = _items(out)
    groups: dict[str, set[str]] = {}
    for row in rows:
        groups.setdefault(row.identity, set()).add(items[row.media]["name"])
    # Identities grouped right: the labelled folder keeps its name, the others are found by clustering.
    assert groups["astronaut_woman"] == set(EXPECTED["astronaut_woman"])
    assert sorted(map(sorted, groups.values())) == sorted(sorted(v) for v in EXPECTED.values())

    report = json.loads((out / "prepare_report.json").read_text())
    for row in rows:
        target = items[row.media]
        assert row.references, "every identity has other footage: all pairs are cross-file"
        for ref in row.references:
            reference = items[ref]
            assert (out / ref).is_file()
            assert reference["name"] in groups[row.identity], "no cross-identity pair"
            assert reference["source"] != target["source"]
            cos = float(np.dot(target["embedding"], reference["embedding"]))
            assert report["pairs"]["min_cosine"] == 0.65 and 0.65 < cos < report["pairs"]["max_cosine"]

    assert {d["what"]: d["reason"] for d in report["drops"]} == BAD
    assert report["dropped"] == dict(Counter(BAD.values()))
    assert report["identities"]["count"] == 3 and report["rows"] == {"image": 6, "video": 6, "video_cross_reference": 6}

    captions = {items[row.media]["name"]: row.caption for row in rows}
    assert captions[SIDECAR[0]] == SIDECAR[1] and captions[CAPTIONS_JSONL[0]] == CAPTIONS_JSONL[1]
    assert captions["astronaut_woman/near.jpg"] == "a photo of a woman"  # class word from the folder label
    assert captions["hopper_1.jpg"] == "a photo of a person"
    assert report["captions"] == {"sidecar": 2, "captioner": 0, "template": 10}

    videos = [row for row in rows if row.kind == "video"]
    assert all(row.fps == 8.0 for row in videos)
    for name in ["face_sizes.png", "identity_sizes.png", "pair_cosines.png", "drop_reasons.png"]:
        assert (out / name).stat().st_size > 0
    # The face cache is warm: built for exactly this metadata, every row usable.
    with np.load(out / ".mm_faces_dlib.npz") as cache:
        assert list(cache["reason"]) == [""] * len(rows)
    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("prepare").experiment_id])[0]
    assert run.data.metrics["rows/video"] == 6 and run.data.metrics["dropped/static"] == 1


@pytest.mark.slow  # the shared prepare run takes ~20 s of CPU
def test_prepare_rerun_skips_processed_files(prepared, raw, monkeypatch, tmp_path):
    out, uri = prepared
    before = (out / "metadata.jsonl").read_text()
    calls = []
    real = pipeline.process_file
    monkeypatch.setattr(pipeline, "process_file", lambda f, *a: calls.append(f.path) or real(f, *a))
    assert _prepare(raw, out, uri) == 0
    assert calls == [] and (out / "metadata.jsonl").read_text() == before
    # A changed file (new mtime) is processed again, and only it; so are other settings.
    raw_copy = shutil.copytree(raw, tmp_path / "raw")  # copy2: same sizes and mtimes...
    (raw_copy / "empty.jpg").touch()  # ...but one
    assert _prepare(raw_copy, out, uri) == 0
    assert calls == ["empty.jpg"]


def test_prepare_rejects_a_missing_input_and_a_bad_shard(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/m.db"
    assert _prepare(tmp_path / "nope", tmp_path / "out", uri) == 2
    assert "nope" in capsys.readouterr().err
    assert _prepare(tmp_path, tmp_path / "out", uri, "--num-shards", "2", "--shard-index", "2") == 2
    assert "--shard-index" in capsys.readouterr().err
    assert _prepare(None, tmp_path / "empty", uri, "--merge") == 2  # nothing to merge


def test_identities_respect_folder_labels():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(3, 16))
    e = np.concatenate([base[[0, 0, 1, 1, 1, 2, 2, 0]] + 0.05 * rng.normal(size=(8, 16)), -base[:1]])
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    labels = ["ann", "ann", "bob", "bob", None, None, None, None, "bob"]  # the last: someone else in bob's folder
    assert group_identities(e, labels, 0.9) == ["ann", "ann", "bob", "bob", "bob", "id_0000", "id_0000", "ann", None]


def test_pairs_keep_the_cosine_band_and_fall_back_to_the_keyframe():
    e = np.array([[1, 0], [0.8, 0.6], [1, 0.01], [0.5, 0.866], [1, 0], [0, 1]], np.float32)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    items = [{"kind": "image", "source": s} for s in "abcd"] + [
        {"kind": "video", "source": "v", "keyframe_cosine": 0.9},
        {"kind": "video", "source": "w", "keyframe_cosine": 0.5},
    ]
    pairs = pair_items(items, ["x", "x", "x", "x", "y", "z"], e, min_cosine=0.65, max_cosine=0.99, max_references=2)
    assert pairs[0].references == [1]  # c is a near-duplicate (cos 0.99995), d too far (cos 0.5)
    assert pairs[1].references == [3, 2] and pairs[1].cosines == pytest.approx([0.9196, 0.8060], abs=1e-3)
    assert pairs[3].references == [1]
    assert pairs[4].keyframe and pairs[4].references == []  # nobody else is y: its own keyframe
    assert pairs[5] is None  # its keyframe face disagrees with the clip


def test_clip_windows_cut_shots_at_the_stage_length_and_fps():
    # 30 fps source, 9 frames at 8 fps: a clip spans 33.75 source frames, stride 3.75.
    assert clip_windows((10, 80), 30.0, 9, 8.0, 0) == [
        [10, 14, 18, 21, 25, 29, 32, 36, 40],
        [44, 48, 51, 55, 59, 62, 66, 70, 74],
    ]
    assert clip_windows((10, 80), 30.0, 9, 8.0, 1) == [[10, 14, 18, 21, 25, 29, 32, 36, 40]]
    assert clip_windows((0, 30), 30.0, 9, 8.0, 0) == []  # shorter than one clip


def test_caption_words():
    words = ["man", "woman", "person"]
    assert class_word("03_Woman", words) == "woman" and class_word("alice", words) == "person"
    assert has_identity_word("A Woman walking", words, None)
    assert not has_identity_word("Alice walking", words, None) and has_identity_word("sks walking", words, "sks")
    assert not has_identity_word("a woman walking", words, "sks")  # with a trigger word, the mask wants it


@pytest.mark.slow
def test_shards_then_merge_equal_one_run(prepared, raw, tmp_path):
    out, uri = prepared
    sharded = tmp_path / "sharded"
    for index in range(2):
        assert _prepare(raw, sharded, uri, "--num-shards", "2", "--shard-index", str(index)) == 0
        assert not (sharded / "metadata.jsonl").exists()
    assert _prepare(None, sharded, uri, "--merge") == 0

    def rows(root):
        return sorted((r.kind, r.identity, r.caption, len(r.references)) for r in read_metadata(root))

    assert rows(sharded) == rows(out)


@pytest.mark.slow
def test_prepare_then_fit_end_to_end(prepared, tmp_path):
    out, _ = prepared
    cache = out / ".mm_faces_dlib.npz"
    warmed = cache.stat().st_mtime_ns
    # Few steps and no evaluation (its eval set is the built-in one, not this data): what is under test is that
    # fit trains on the prepared set, not training itself.
    steps = [f"curriculum.stages.{stage}.max_steps=2" for stage in ("image_pretrain", "video_finetune")]
    data = [f"data.root={out}", f"output_dir={tmp_path}/runs"]
    run_cli(tmp_path, "fit", "--experiment", "full", "eval.enabled=false", *data, *steps)
    assert cache.stat().st_mtime_ns == warmed  # fit read the face cache prepare warmed
    assert list((tmp_path / "runs").glob("*/checkpoints/video_finetune/final.ckpt"))
