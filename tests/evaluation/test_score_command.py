"""`score` on a manifest of clips built from the packaged photos."""

import argparse
import json

import pytest

from mm_lightning.commands import score
from mm_lightning.evaluation.synthetic import astronaut, camera, grace_hopper, translating_texture
from mm_lightning.evaluation.video_io import write_video


def parse(*argv):
    parser = argparse.ArgumentParser()
    score.add_arguments(parser)
    return parser.parse_args([*argv, "--frames-sampled", "6"])


@pytest.fixture(scope="module")
def manifest(tmp_path_factory, astronaut_static, astronaut_pan, hopper_static):
    folder = tmp_path_factory.mktemp("bench")
    write_video(folder / "clips" / "static.mp4", astronaut_static, fps=8)
    write_video(folder / "clips" / "pan.mp4", astronaut_pan, fps=8)
    write_video(folder / "clips" / "hopper.mp4", hopper_static, fps=8)
    write_video(folder / "clips" / "texture.mp4", translating_texture(2.0, num_frames=9, size=(240, 360)), fps=8)
    import imageio.v2 as imageio

    imageio.imwrite(folder / "astronaut.png", astronaut())
    imageio.imwrite(folder / "hopper.png", grace_hopper())
    imageio.imwrite(folder / "camera.png", camera())
    rows = [
        {"video": "clips/static.mp4", "references": ["astronaut.png"], "prompt": "a woman", "method": "still"},
        {"video": "clips/pan.mp4", "references": ["astronaut.png"], "prompt": "a woman", "method": "moving"},
        {"video": "clips/hopper.mp4", "references": ["astronaut.png"], "prompt": "a woman", "method": "still"},
        {"video": "clips/hopper.mp4", "references": ["hopper.png"], "prompt": "a woman", "method": "right ref"},
        {"video": "clips/missing.mp4", "references": ["astronaut.png"], "prompt": "a woman", "method": "still"},
        {"video": "clips/static.mp4", "references": ["camera.png"], "prompt": "a woman", "method": "faceless ref"},
        {"video": "clips/texture.mp4", "references": ["astronaut.png"], "prompt": "a woman", "method": "no face"},
    ]
    path = folder / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def scored(manifest, tmp_path_factory):
    out = tmp_path_factory.mktemp("scored")
    assert score.run(parse("--manifest", str(manifest), "--out", str(out))) == 0
    return out, [json.loads(line) for line in (out / "per_video.jsonl").read_text().splitlines()]


def test_per_video_values(scored):
    _, (static, pan, other, right, missing, faceless, texture) = scored
    assert static["dynamic"] is False and static["fm_inter"] == pytest.approx(0.0, abs=1e-3)
    assert pan["dynamic"] is True
    assert right["id_similarity"] > other["id_similarity"] + 0.05  # Hopper's clip against her own photo
    assert static["id_similarity"] > other["id_similarity"] + 0.05
    assert static["frames_scored"] == 6 and static["no_face_frames"] == 0
    assert "not found" in missing["error"] and "id_similarity" not in missing
    assert "no face detected in" in faceless["error"] and "camera.png" in faceless["error"]
    assert static["face_rate"] == 1.0 and static["fm_inter_face"] < 0.06
    # A video without any face: counted, and its ID similarity is missing (null), never 0.
    assert texture["id_similarity"] is None and texture["face_rate"] == 0.0 and texture["no_face_frames"] == 6


def test_table_per_method(scored, capsys):
    out, records = scored
    table = (out / "table.md").read_text()
    expected = "| method | videos | errors | no-face frames | face rate | dynamic_degree |"
    assert table.splitlines()[0].startswith(expected)
    assert "| fm_ref_face | fm_inter_face |" in table.splitlines()[0]
    no_face = next(line for line in table.splitlines() if line.startswith("| no face |")).split(" | ")
    header = table.splitlines()[0].split(" | ")
    assert no_face[header.index("id_similarity")] == "— (0 of 1)" and no_face[header.index("face rate")] == "0.000"
    assert no_face[header.index("no-face frames")] == "6/6"
    still = next(line for line in table.splitlines() if line.startswith("| still |"))
    assert "| 3 | 1 |" in still  # three rows, the missing video counted as an error
    assert "text_alignment" not in table  # no CLIP configured


def test_csv_and_latex_formats(manifest, tmp_path):
    assert score.run(parse("--manifest", str(manifest), "--out", str(tmp_path), "--format", "csv")) == 0
    header = (tmp_path / "table.csv").read_text().splitlines()[0]
    assert header.startswith("method,videos,errors,no-face frames,face rate,dynamic_degree_mean,dynamic_degree_std")
    from mm_lightning.reports.score_table import build_table, render

    records = [json.loads(line) for line in (tmp_path / "per_video.jsonl").read_text().splitlines()]
    assert r"\pm" in render(*build_table(records), "latex")


def test_malformed_line_is_named(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"video": "a.mp4", "references": ["r.png"]}\n\n{"video": "b.mp4"}\n')
    assert score.run(parse("--manifest", str(bad), "--out", str(tmp_path))) == 2
    assert "line 3" in capsys.readouterr().err


def test_no_face_policy_argument():
    assert parse("--video", "v.mp4").no_face_similarity is None  # default: skip frames without a face
    assert parse("--video", "v.mp4", "--no-face-similarity", "zero").no_face_similarity == 0.0
    assert parse("--video", "v.mp4", "--no-face-similarity", "skip").no_face_similarity == "skip"


def test_raft_without_weights_is_a_clear_error(tmp_path, capsys):
    args = parse("--video", "v.mp4", "--reference", "r.png", "--out", str(tmp_path), "--flow", "raft")
    assert score.run(args) == 2
    assert "flow_weights" in capsys.readouterr().err


def test_shorthand_and_mlflow(manifest, tmp_path, mlflow_uri):
    folder = manifest.parent
    args = parse(
        "--video",
        str(folder / "clips" / "static.mp4"),
        "--reference",
        str(folder / "astronaut.png"),
        "--out",
        str(tmp_path),
        "--mlflow-experiment",
        "scores",
    )
    assert score.run(args) == 0
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("scores").experiment_id])
    assert run.data.metrics["default/dynamic_degree"] == 0.0
    assert run.data.params["frames_sampled"] == "6"
    assert "text_alignment_skipped" in run.data.tags
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"per_video.jsonl", "table.md"}
