"""EMA of the trainable weights: Lightning's `EMAWeightAveraging`, restricted to what trains.

Lightning's callback deep-copies the whole LightningModule into a `torch.optim.swa_utils.AveragedModel`
and checkpoints every weight of it. Here that would copy the frozen backbone, T5, the VAE and CLIP
(about 10B parameters at 5B scale) and write them into every checkpoint. So the average covers a
view that holds the trainable parameters themselves (the same tensors, no copy); Lightning's own
code does the rest: when to update (decay, start step, interval), the EMA arithmetic, the swap.

Semantics (our choices, see README "EMA"):
- Each curriculum stage has its own EMA; it starts at `ema.start_step` of the stage as a copy of the
  weights then. The raw weights keep training and are handed on to the next stage.
- Checkpoints hold the raw trainable weights (`state_dict`) and, once the EMA has been updated, the
  EMA of the same tensors (`ema_state_dict`, same keys) and its update count (`ema_updates`);
  `MagicMirrorModule.on_save_checkpoint` writes them, `--resume` reads them back here.
- Evaluation and `generate` use the EMA weights when a checkpoint has them (`generate --raw-weights`
  for the raw ones).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from omegaconf import DictConfig
from torch import nn
from torch.optim.swa_utils import AveragedModel


class TrainableParameters(nn.Module):
    """The trainable parameters of a MagicMirrorModule's transformer, by reference, in a fixed order."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        named = [(n, p) for n, p in transformer.named_parameters() if p.requires_grad]
        self.names = [f"transformer.{n}" for n, _ in named]  # the keys of the module's checkpoint state_dict
        self.params = nn.ParameterList([p for _, p in named])


class TrainableEMA(EMAWeightAveraging):
    """`EMAWeightAveraging` over `TrainableParameters(pl_module.transformer)` instead of the whole module."""

    def __init__(self, decay: float, start_step: int, update_every_n_steps: int):
        super().__init__(
            decay=decay,
            update_starting_at_step=start_step,
            update_every_n_steps=update_every_n_steps,
            use_buffers=False,
        )
        self._view: TrainableParameters | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        self._view = TrainableParameters(pl_module.transformer)
        # Setup runs before the strategy moves the module: put the average on the training device now.
        self._average_model = AveragedModel(
            self._view, device=trainer.strategy.root_device, use_buffers=self._use_buffers, **self._kwargs
        )
        self._average_model.requires_grad_(False)

    # Lightning's hooks, each handed the view instead of the whole LightningModule.
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, self._view, outputs, batch, batch_idx)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, self._view)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if self.updated:
            super().on_validation_epoch_start(trainer, self._view)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self.updated:
            super().on_validation_epoch_end(trainer, self._view)

    def on_train_end(self, trainer, pl_module) -> None:
        """Unlike Lightning's default, the raw weights stay in the model and go on to the next stage."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        """Nothing here: Lightning's version would store the whole module twice; MagicMirrorModule
        writes `ema_state_dict` (in every checkpoint, final.ckpt's weights-only save included)."""

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if "ema_state_dict" not in checkpoint:
            rank_zero_warn(
                "the checkpoint holds no EMA weights (EMA off, or not started yet when it was written): "
                "the EMA starts again at the next update"
            )
            return
        state = checkpoint["ema_state_dict"]
        with torch.no_grad():
            for name, average in zip(self._view.names, self._average_model.module.params, strict=True):
                average.copy_(state[name])
        self._average_model.n_averaged.fill_(checkpoint["ema_updates"])

    @property
    def updated(self) -> bool:
        """Whether the EMA holds an average yet (before `ema.start_step` it is a stale copy)."""
        return self._average_model is not None and int(self._average_model.n_averaged) > 0

    def averaged_state_dict(self) -> dict[str, torch.Tensor]:
        """The EMA weights under the module checkpoint's keys (transformer.<name>)."""
        return {name: p.detach() for name, p in zip(self._view.names, self._average_model.module.params, strict=True)}

    @property
    def updates(self) -> int:
        return int(self._average_model.n_averaged)

    @contextmanager
    def swapped_in(self):
        """The EMA weights in the model for the duration (evaluation); the raw ones come back after."""
        if not self.updated:
            yield
            return
        self._swap_models(self._view)
        try:
            yield
        finally:
            self._swap_models(self._view)


def ema_callbacks(cfg: DictConfig) -> list[TrainableEMA]:
    """The stage's EMA callback when `ema.enabled`."""
    if not cfg.ema.enabled:
        return []
    return [TrainableEMA(cfg.ema.decay, cfg.ema.start_step, cfg.ema.update_every_n_steps)]


def find_ema(trainer) -> TrainableEMA | None:
    return next((cb for cb in trainer.callbacks if isinstance(cb, TrainableEMA)), None)
