"""StepCheckpoint: `--resume` under gradient accumulation writes each step's checkpoint once and relinks last.ckpt."""

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from mm_lightning.callbacks.step_checkpoint import StepCheckpoint


class TinyRegression(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(64, 4), torch.randn(64, 1)), batch_size=2)


def _fit(tmp_path, max_steps, ckpt_path=None) -> list[tuple[int, str]]:
    """Trains to max_steps, 2 micro-batches a step, as fit's stages do; returns (step, file) of each save."""
    callback = StepCheckpoint(
        dirpath=tmp_path, filename="{step}", monitor="step", mode="max", save_last="link", every_n_train_steps=1
    )
    trainer = L.Trainer(
        max_steps=max_steps,
        accumulate_grad_batches=2,
        callbacks=[callback],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    saves = []
    save = trainer.save_checkpoint

    def recorded(filepath, *args, **kwargs):
        saves.append((trainer.global_step, str(filepath).rsplit("/", 1)[-1]))
        return save(filepath, *args, **kwargs)

    trainer.save_checkpoint = recorded
    trainer.fit(TinyRegression(), ckpt_path=ckpt_path)
    return saves


def test_a_resumed_run_saves_only_the_steps_it_trains(tmp_path):
    assert _fit(tmp_path, max_steps=1) == [(1, "step=1.ckpt")]
    # Lightning's ModelCheckpoint saved (1, "last-v1.ckpt") first, in full, after the first micro-batch of step 2
    assert _fit(tmp_path, max_steps=2, ckpt_path=tmp_path / "step=1.ckpt") == [(2, "step=2.ckpt")]
    assert (tmp_path / "last.ckpt").resolve() == tmp_path / "step=2.ckpt"
