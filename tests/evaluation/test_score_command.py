"""`score` on a manifest of clips built from the packaged photos."""

import argparse
import json

import pytest

from evaluation.synthetic import astronaut, camera, grace_hopper
from evaluation.video_io import write_video
from mm_lightning.commands import score


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
    _, (static, pan, other, right, missing, faceless) = scored
    assert static["dynamic"] is False and static["fm_inter"] == pytest.approx(0.0, abs=1e-3)
    assert pan["dynamic"] is True
    assert right["id_similarity"] > other["id_similarity"] + 0.05  # Hopper's clip against her own photo
    assert static["id_similarity"] > other["id_similarity"] + 0.05
    assert static["frames_scored"] == 6 and static["no_face_frames"] == 0
    assert "not found" in missing["error"] and "id_similarity" not in missing
    assert "no face detected in" in faceless["error"] and "camera.png" in faceless["error"]


def test_table_per_method(scored, capsys):
    out, records = scored
    table = (out / "table.md").read_text()
    assert table.splitlines()[0].startswith("| method | videos | errors | no-face frames | dynamic_degree |")
    still = next(line for line in table.splitlines() if line.startswith("| still |"))
    assert "| 3 | 1 |" in still  # three rows, the missing video counted as an error
    assert "text_alignment" not in table  # no CLIP configured


def test_csv_and_latex_formats(manifest, tmp_path):
    assert score.run(parse("--manifest", str(manifest), "--out", str(tmp_path), "--format", "csv")) == 0
    header = (tmp_path / "table.csv").read_text().splitlines()[0]
    assert header.startswith("method,videos,errors,no-face frames,dynamic_degree_mean,dynamic_degree_std")
    from evaluation.score_table import build_table, render

    records = [json.loads(line) for line in (tmp_path / "per_video.jsonl").read_text().splitlines()]
    assert r"\pm" in render(*build_table(records), "latex")


def test_malformed_line_is_named(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"video": "a.mp4", "references": ["r.png"]}\n\n{"video": "b.mp4"}\n')
    assert score.run(parse("--manifest", str(bad), "--out", str(tmp_path))) == 2
    assert "line 3" in capsys.readouterr().err


def test_shorthand_and_mlflow(manifest, tmp_path, mlflow_uri):
    folder = manifest.parent
    args = parse("--video", str(folder / "clips" / "static.mp4"), "--reference", str(folder / "astronaut.png"),
                 "--out", str(tmp_path), "--mlflow-experiment", "scores")
    assert score.run(args) == 0
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("scores").experiment_id])
    assert run.data.metrics["default/dynamic_degree"] == 0.0
    assert run.data.params["frames_sampled"] == "6"
    assert "text_alignment_skipped" in run.data.tags
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"per_video.jsonl", "table.md"}
