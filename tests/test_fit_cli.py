"""End to end, as a user runs it: `python -m mm_lightning fit/generate/evaluate` in a fresh
folder, a killed run resumed, no_pretrain with a corrupt video, 2-process DDP."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _env(workdir: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), MLFLOW_TRACKING_URI=f"sqlite:///{workdir}/mlruns/mlflow.db")
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


def _cli(workdir: Path, *args, check=True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "mm_lightning", *args],
        cwd=workdir,
        env=_env(workdir),
        capture_output=True,
        text=True,
        timeout=900,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def _client(workdir: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{workdir}/mlruns/mlflow.db")


def _artifacts(client, run_id, path=None) -> list[str]:
    out = []
    for item in client.list_artifacts(run_id, path):
        out += _artifacts(client, run_id, item.path) if item.is_dir else [item.path]
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One `fit --experiment full` in the default tiny profile, shared by the tests below."""
    workdir = tmp_path_factory.mktemp("fit_full")
    result = _cli(workdir, "fit", "--experiment", "full")
    run_dir = next((workdir / "runs" / "full").iterdir())
    run_id = json.loads((run_dir / "run.json").read_text())["mlflow_run_id"]
    return workdir, run_id, run_dir / "checkpoints" / "video_finetune" / "final.ckpt", result


def test_fit_full_trains_both_stages_and_leaves_an_mlflow_run(trained):
    workdir, run_id, checkpoint, result = trained
    output = result.stdout + result.stderr
    assert "stage image_pretrain" in output and "stage video_finetune" in output  # progress bars
    assert "mlflow ui --backend-store-uri" in result.stdout
    run = _client(workdir).get_run(run_id)
    assert run.info.status == "FINISHED"
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    assert tags["mm.experiment"] == "full" and tags["mm.profile"] == "tiny" and tags["mm.can"] == "True"
    assert tags["mm.final_stage"] == "video_finetune" and len(tags["mm.git_commit"]) >= 7
    assert "text_alignment" in tags["mm.text_alignment"]  # left out without CLIP weights, with the reason
    assert params["model.can"] == "True" and params["curriculum.stages.video_finetune.frames"] == "9"
    for stage in ("image_pretrain", "video_finetune"):
        for name in ("loss", "diffusion", "lr"):
            assert f"train/{stage}/{name}" in metrics
        for name in ("id_similarity", "no_face_frames", "similarity_decay", "fm_ref", "fm_inter", "dynamic_degree"):
            assert f"eval/{stage}/{name}" in metrics
    artifacts = _artifacts(_client(workdir), run_id)
    assert "config.yaml" in artifacts and "checkpoint/final.ckpt" in artifacts
    for kind, ext in (("videos", ".mp4"), ("contact_sheets", ".png"), ("id_similarity", ".png")):
        assert any(a.startswith("eval/video_finetune/") and f"/{kind}/" in a and a.endswith(ext) for a in artifacts), (
            kind
        )
    assert any(a.endswith("per_video.json") for a in artifacts)
    history = _client(workdir).get_metric_history(run_id, "train/image_pretrain/loss")
    assert len(history) == 24  # one point per step


def test_generate_writes_a_playable_mp4(trained, tmp_path):
    import decord
    import skimage.data
    from PIL import Image

    workdir, _, checkpoint, _ = trained
    Image.fromarray(skimage.data.astronaut()).save(tmp_path / "face.png")
    out = tmp_path / "out.mp4"
    _cli(
        workdir,
        "generate",
        "--checkpoint",
        str(checkpoint),
        "--image",
        str(tmp_path / "face.png"),
        "--prompt",
        "a woman walking along a beach at sunset",
        "--out",
        str(out),
    )
    video = decord.VideoReader(str(out))
    assert len(video) == 9 and video[0].shape == (64, 64, 3)


def test_generate_refuses_a_photo_without_a_face_before_denoising(trained, tmp_path):
    import skimage.data
    from PIL import Image

    workdir, _, checkpoint, _ = trained
    Image.fromarray(skimage.data.camera()).convert("RGB").save(tmp_path / "camera.png")
    result = _cli(
        workdir,
        "generate",
        "--checkpoint",
        str(checkpoint),
        "--image",
        str(tmp_path / "camera.png"),
        "--prompt",
        "a man walking",
        "--out",
        str(tmp_path / "x.mp4"),
        check=False,
    )
    assert result.returncode == 2
    assert "no face detected" in result.stderr and "camera.png" in result.stderr
    assert not (tmp_path / "x.mp4").exists()


def test_evaluate_logs_the_same_metrics_as_a_new_run(trained):
    workdir, _, checkpoint, _ = trained
    _cli(workdir, "evaluate", "--checkpoint", str(checkpoint))
    client = _client(workdir)
    runs = client.search_runs(
        [client.get_experiment_by_name("mm_lightning").experiment_id], "tags.`mm.role` = 'evaluate'"
    )
    assert len(runs) == 1
    assert "eval/video_finetune/id_similarity" in runs[0].data.metrics


def test_a_killed_run_resumes_in_the_right_stage_at_the_right_step(tmp_path):
    args = [
        "fit",
        "--experiment",
        "full",
        "eval.enabled=false",
        "curriculum.stages.image_pretrain.max_steps=60",
        "trainer.checkpoint_every_n_steps=5",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "mm_lightning", *args],
        cwd=tmp_path,
        env=_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 600
    last = None
    while time.time() < deadline and proc.poll() is None:
        found = list(tmp_path.glob("runs/full/*/checkpoints/image_pretrain/last.ckpt"))
        if found:
            last = found[0]
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # a real, unannounced interruption in the middle of stage 1
    proc.wait()
    assert last is not None, "stage 1 never wrote a checkpoint"
    run_dir = last.parents[2]
    assert json.loads((run_dir / "run.json").read_text())["finished_stages"] == []
    killed_at = torch.load(last, weights_only=False)["global_step"]
    assert 0 < killed_at < 60

    result = _cli(tmp_path, *args, "--resume")
    state = json.loads((run_dir / "run.json").read_text())
    assert state["finished_stages"] == ["image_pretrain", "video_finetune"]
    assert torch.load(run_dir / "checkpoints/image_pretrain/final.ckpt", weights_only=False)["global_step"] == 60
    assert torch.load(run_dir / "checkpoints/video_finetune/final.ckpt", weights_only=False)["global_step"] == 16
    client = _client(tmp_path)
    run = client.get_run(state["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/image_pretrain/loss")]
    assert max(steps) == 59 and min(steps) == 0  # one run, stage 1 continued after the kill
    assert "resuming stage image_pretrain from " in result.stdout  # fit's own line; Lightning's is quiet


def test_no_pretrain_runs_only_stage_2_and_skips_a_corrupt_video(tmp_path):
    import shutil

    from mm_lightning.config import load_config
    from mm_lightning.data.demo import ensure_demo_dataset

    data = tmp_path / "data"
    shutil.copytree(ensure_demo_dataset(load_config("full").cache_dir), data)
    (data / "videos" / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    with open(data / "metadata.jsonl", "a") as f:
        f.write(
            json.dumps(
                {
                    "kind": "video",
                    "video": "videos/corrupt.mp4",
                    "caption": "a man talking",
                    "reference_rule": "keyframe",
                }
            )
            + "\n"
        )
    _cli(tmp_path, "fit", "--experiment", "no_pretrain", "eval.enabled=false", f"data.root={data}")
    run_dir = next((tmp_path / "runs" / "no_pretrain").iterdir())
    state = json.loads((run_dir / "run.json").read_text())
    assert state["finished_stages"] == ["video_finetune"]
    assert not (run_dir / "checkpoints" / "image_pretrain").exists()
    metrics = _client(tmp_path).get_run(state["mlflow_run_id"]).data.metrics
    assert not any(k.startswith("train/image_pretrain") for k in metrics)
    assert metrics["data/video_finetune/skipped/corrupt_video"] == 1


def test_two_process_ddp_keeps_the_trainable_weights_identical(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "tests" / "ddp_worker.py"), str(tmp_path)],
        cwd=tmp_path,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    rank0 = torch.load(tmp_path / "rank0.pt")
    rank1 = torch.load(tmp_path / "rank1.pt")
    initial = torch.load(tmp_path / "initial.pt")
    assert rank0.keys() == rank1.keys() == initial.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    assert any(not torch.equal(rank0[n], initial[n]) for n in rank0)  # and they did train


def test_fit_under_two_process_ddp_keeps_one_run_folder_and_one_mlflow_run(tmp_path):
    # Lightning launches rank 1 by re-running the command: it must find rank 0's run folder
    # and MLflow run instead of starting its own, and the ranks' eval artifacts must not collide.
    _cli(
        tmp_path, "fit", "--experiment", "full", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"
    )
    (run_dir,) = (tmp_path / "runs" / "full").iterdir()
    assert (run_dir / "checkpoints" / "video_finetune" / "final.ckpt").exists()
    client = _client(tmp_path)
    (run,) = client.search_runs([client.get_experiment_by_name("mm_lightning").experiment_id])
    assert run.info.run_id == json.loads((run_dir / "run.json").read_text())["mlflow_run_id"]
    assert run.info.status == "FINISHED" and "eval/video_finetune/id_similarity" in run.data.metrics
    artifacts = _artifacts(client, run.info.run_id)
    for rank in (0, 1):
        assert any(a.startswith(f"eval/video_finetune/step16/rank{rank}/videos/") for a in artifacts), rank
