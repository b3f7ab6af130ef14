"""`snapshot`: random weights in the real layouts plus a synthetic latent cache, loadable by the real code path."""

import torch

from mm_lightning.cli import main
from mm_lightning.commands.snapshot import snapshot_config
from mm_lightning.curriculum import build_datamodule, frozen_models_needed
from mm_lightning.faces.arcface import DifferentiableArcFace, _import_onnx2torch
from mm_lightning.module import MagicMirrorModule


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

    arcface = DifferentiableArcFace(_import_onnx2torch().convert(str(out / "arcface.onnx")), 127.5, 127.5)
    embedding = arcface(torch.rand(2, 3, 112, 112) * 2 - 1)
    assert embedding.shape == (2, 512) and torch.allclose(embedding.norm(dim=-1), torch.ones(2), atol=1e-5)
