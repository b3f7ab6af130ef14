"""Trains the tiny profile for a few steps under 2-process DDP (gloo, CPU) and saves each
rank's trainable weights. Run by tests/test_fit_cli.py; Lightning starts the second
process by re-running this script."""

import sys
from pathlib import Path

import lightning as L
import torch

from mm_lightning.config import load_config
from mm_lightning.curriculum import build_datamodule, build_trainer
from mm_lightning.module import MagicMirrorModule

out = Path(sys.argv[1])
cfg = load_config(
    "full",
    overrides=[
        "eval.enabled=false",
        "trainer.strategy=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "curriculum.stages.image_pretrain.max_steps=4",
        "curriculum.stages.image_pretrain.batch_size=2",
    ],
)
L.seed_everything(0)
module = MagicMirrorModule(cfg, stage="image_pretrain")
if not (out / "initial.pt").exists():
    torch.save(module.transformer.trainable_state_dict(), out / "initial.pt")
datamodule = build_datamodule(cfg, "image_pretrain", module.transformer.face_encoder.clip_image_size)
trainer = build_trainer(cfg, "image_pretrain", logger=False, callbacks=[], run_dir=out)
trainer.fit(module, datamodule=datamodule)
torch.save(module.transformer.trainable_state_dict(), out / f"rank{trainer.global_rank}.pt")
