"""End to end, as a user runs it: `python -m mm_lightning fit/generate/evaluate` in a fresh
folder, a killed run resumed, no_pretrain with a corrupt video, 2-process DDP."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.helpers import (
    FINISHED_FIT_STEPS,
    REPO,
    SHORT_FIT,
    SHORT_STEPS,
    artifacts,
    cli_env,
    run_cli,
    start_cli,
    store_uri,
    wait_for,
)

pytestmark = pytest.mark.slow


def _client(workdir: Path) -> MlflowClient:
    return MlflowClient(store_uri(workdir))


def test_fit_full_trains_both_stages_and_leaves_an_mlflow_run(finished_fit):
    workdir, run_id, checkpoint, result = finished_fit
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
    logged = artifacts(_client(workdir), run_id)
    assert "config.yaml" in logged and "checkpoint/final.ckpt" in logged
    for kind, ext in (("videos", ".mp4"), ("contact_sheets", ".png"), ("id_similarity", ".png")):
        assert any(a.startswith("eval/video_finetune/") and f"/{kind}/" in a and a.endswith(ext) for a in logged), kind
    assert any(a.endswith("per_video.json") for a in logged)
    history = _client(workdir).get_metric_history(run_id, "train/image_pretrain/loss")
    assert len(history) == FINISHED_FIT_STEPS["image_pretrain"]  # one point per step
    probed = {m.step for m in _client(workdir).get_metric_history(run_id, "eval/image_pretrain/id_reliance")}
    assert {0, 4, 8} <= probed  # the reliance curve: at the start, every 4 steps, and at the stage's evaluation


def test_generate_writes_a_playable_mp4(finished_fit, tmp_path):
    import decord
    import skimage.data
    from PIL import Image

    workdir, _, checkpoint, _ = finished_fit
    Image.fromarray(skimage.data.astronaut()).save(tmp_path / "face.png")
    out = tmp_path / "out.mp4"
    run_cli(
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


def test_generate_refuses_a_photo_without_a_face_before_denoising(finished_fit, tmp_path):
    import skimage.data
    from PIL import Image

    workdir, _, checkpoint, _ = finished_fit
    Image.fromarray(skimage.data.camera()).convert("RGB").save(tmp_path / "camera.png")
    result = run_cli(
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


def test_evaluate_logs_the_same_metrics_as_a_new_run(finished_fit):
    workdir, _, checkpoint, _ = finished_fit
    run_cli(workdir, "evaluate", "--checkpoint", str(checkpoint), "eval.max_videos=1")  # one video: a short run
    client = _client(workdir)
    runs = client.search_runs(
        [client.get_experiment_by_name("mm_lightning").experiment_id], "tags.`mm.role` = 'evaluate'"
    )
    assert len(runs) == 1
    assert "eval/video_finetune/id_similarity" in runs[0].data.metrics


def test_a_killed_run_resumes_in_the_right_stage_at_the_right_step(tmp_path):
    proc = start_cli(tmp_path, *SHORT_FIT)
    last = wait_for("runs/full/*/checkpoints/image_pretrain/last.ckpt", tmp_path, proc)
    proc.send_signal(signal.SIGKILL)  # a real, unannounced interruption in the middle of stage 1
    proc.wait()
    run_dir = last.parents[2]
    assert json.loads((run_dir / "run.json").read_text())["finished_stages"] == []
    killed_at = torch.load(last, weights_only=False)["global_step"]
    assert 0 < killed_at < SHORT_STEPS

    result = run_cli(tmp_path, *SHORT_FIT, "--resume")
    state = json.loads((run_dir / "run.json").read_text())
    assert state["finished_stages"] == ["image_pretrain", "video_finetune"]
    final = {stage: run_dir / "checkpoints" / stage / "final.ckpt" for stage in state["finished_stages"]}
    assert torch.load(final["image_pretrain"], weights_only=False)["global_step"] == SHORT_STEPS
    assert torch.load(final["video_finetune"], weights_only=False)["global_step"] == 4  # each stage counts its own
    client = _client(tmp_path)
    run = client.get_run(state["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/image_pretrain/loss")]
    assert max(steps) == SHORT_STEPS - 1 and min(steps) == 0  # one run, stage 1 continued after the kill
    assert "resuming stage image_pretrain from " in result.stdout  # fit's own line; Lightning's is quiet


def test_no_pretrain_runs_only_stage_2_and_skips_a_corrupt_video(tmp_path):
    import shutil

    from mm_lightning.config import load_config
    from mm_lightning.data.demo import ensure_demo_dataset

    data = tmp_path / "data"
    shutil.copytree(ensure_demo_dataset(load_config("full").cache_dir), data)
    (data / "videos" / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    # Three of the demo's clips and the corrupt one: the face pass over this new metadata stays short.
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    clips = [row for row in rows if row["kind"] == "video"][:3]
    corrupt = {"kind": "video", "video": "videos/corrupt.mp4", "caption": "a man talking", "reference_rule": "keyframe"}
    (data / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in [*clips, corrupt]))
    run_cli(
        tmp_path,
        "fit",
        "--experiment",
        "no_pretrain",
        "eval.enabled=false",
        f"data.root={data}",
        "curriculum.stages.video_finetune.max_steps=2",
    )
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
        env=cli_env(tmp_path),
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
    # Short stages, with the reliance probe (collective forward passes) inside stage 1 too.
    run_cli(
        tmp_path,
        "fit",
        "--experiment",
        "full",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "curriculum.stages.image_pretrain.max_steps=4",
        "curriculum.stages.video_finetune.max_steps=2",
        "eval.reliance_every_n_steps=2",
    )
    (run_dir,) = (tmp_path / "runs" / "full").iterdir()
    assert (run_dir / "checkpoints" / "video_finetune" / "final.ckpt").exists()
    client = _client(tmp_path)
    (run,) = client.search_runs([client.get_experiment_by_name("mm_lightning").experiment_id])
    assert run.info.run_id == json.loads((run_dir / "run.json").read_text())["mlflow_run_id"]
    assert run.info.status == "FINISHED" and "eval/video_finetune/id_similarity" in run.data.metrics
    probed = {m.step for m in client.get_metric_history(run.info.run_id, "eval/image_pretrain/id_reliance")}
    assert {0, 2, 4} <= probed
    logged = artifacts(client, run.info.run_id)
    for rank in (0, 1):
        assert any(a.startswith(f"eval/video_finetune/step2/rank{rank}/videos/") for a in logged), rank


def test_evaluation_runs_once_per_step_under_gradient_accumulation(tmp_path):
    # Lightning ends every micro-batch with on_train_batch_end; an evaluation belongs to the optimizer step.
    run_cli(
        tmp_path,
        "fit",
        "--experiment",
        "full",
        "curriculum.order=[video_finetune]",
        "curriculum.stages.video_finetune.max_steps=2",
        "curriculum.stages.video_finetune.accumulate_grad_batches=2",
        "eval.every_n_steps=1",
        "eval.reliance_every_n_steps=1",
    )
    client = _client(tmp_path)
    (run,) = client.search_runs([client.get_experiment_by_name("mm_lightning").experiment_id])
    history = {
        key: [m.step for m in client.get_metric_history(run.info.run_id, f"eval/video_finetune/{key}")]
        for key in ("seconds", "id_reliance")
    }
    assert sorted(history["seconds"]) == [1, 2]
    assert sorted(history["id_reliance"]) == [0, 1, 2]  # at the start of training, then with each evaluation
