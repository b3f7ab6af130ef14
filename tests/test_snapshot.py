"""`snapshot`: random weights in the real layouts plus a synthetic latent cache, loadable by the real code path."""

import json

import mlflow
import pytest
import torch

from mm_lightning.cli import main
from mm_lightning.commands.snapshot import snapshot_config, snapshot_overrides
from mm_lightning.curriculum import build_datamodule, frozen_models_needed
from mm_lightning.faces.arcface import differentiable_embedder
from mm_lightning.module import MagicMirrorModule
from tests.helpers import run_cli, store_uri


def test_snapshot_loads_through_the_real_path_and_trains_from_its_cache(tmp_path):
    out = tmp_path / "snap"
    assert (
        main(["snapshot", "--profile", "tiny", "--out", str(out), "--samples", "2", "faces.backend=insightface"]) == 0
    )
    for folder in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler", "clip-vision"):
        assert any((out / folder).iterdir())

    cfg = snapshot_config(
        "full", "tiny", out, ["faces.backend=insightface", "eval.enabled=false", "trainer.precision=bf16-mixed"]
    )
    assert frozen_models_needed(cfg) == {"text_encoder": False, "vae": False}  # both stages cached
    module = MagicMirrorModule(cfg, stage="video_finetune", **frozen_models_needed(cfg))
    assert module.text_encoder is None and module.vae is None
    batch = next(iter(build_datamodule(cfg, "video_finetune", 64).train_dataloader()))
    assert batch["latents"].shape[1:] == (3, 4, 8, 8) and batch["id_embedding"].shape[1:] == (512,)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(module.compute_loss(batch)["loss"])

    arcface = differentiable_embedder(cfg.faces)  # the identity loss's ArcFace, from the snapshot's stand-in pack
    embedding = arcface(torch.rand(2, 3, 112, 112) * 2 - 1)
    assert embedding.shape == (2, 512) and torch.allclose(embedding.norm(dim=-1), torch.ones(2), atol=1e-5)


@pytest.mark.slow  # a snapshot, then a short fit that samples and scores
def test_fit_with_evaluation_runs_on_a_snapshot_through_its_stand_in_face_pack(tmp_path):
    out = tmp_path / "snap"
    assert (
        main(["snapshot", "--profile", "tiny", "--out", str(out), "--samples", "2", "faces.backend=insightface"]) == 0
    )
    run_cli(
        tmp_path,
        "fit",
        "--profile",
        "tiny",
        *snapshot_overrides(out),
        "weights.create_random=false",
        "faces.backend=insightface",
        "curriculum.stages.image_pretrain.max_steps=2",
        "curriculum.stages.video_finetune.max_steps=2",
        "eval.max_videos=1",
    )
    (run_dir,) = (tmp_path / "runs" / "full").iterdir()
    run = mlflow.MlflowClient(store_uri(tmp_path)).get_run(
        json.loads((run_dir / "run.json").read_text())["mlflow_run_id"]
    )
    assert {"eval/video_finetune/id_reliance", "eval/video_finetune/dynamic_degree"} <= set(run.data.metrics)
