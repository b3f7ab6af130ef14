"""MLflow evaluation callback: runs the evaluation (`mm_lightning.evaluation_run.evaluate_model`) at the
end of each curriculum stage and every `eval.every_n_steps` steps when set, and the identity-reliance probe
alone every `eval.reliance_every_n_steps` steps (a learning curve in MLflow).

The stage's last evaluation runs at its last optimizer step, before that step's checkpoint is written
(Lightning calls checkpoint callbacks last). A checkpoint at the stage's last step therefore means the
stage is evaluated: `--resume` from it skips the training loop, so nothing would evaluate it later, and a
run killed during that evaluation resumes from the checkpoint before, and evaluates."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig

from mm_lightning.callbacks.optimizer_steps import OptimizerSteps
from mm_lightning.ema import find_ema
from mm_lightning.evaluation_run import evaluate_model
from mm_lightning.reliance import RelianceProbe
from mm_lightning.strategies import evaluation_weights


class MLflowEvaluationCallback(Callback):
    def __init__(self, cfg: DictConfig, stage: str):
        self.cfg, self.stage = cfg, stage
        self.probe = None  # the identity-reliance probe: its fixed batch is built once
        self.reliance_step = None  # the step the probe last ran at
        self.evaluated_step = None  # the step the evaluation last ran at
        self.optimizer_steps = OptimizerSteps()

    def _probe(self, module) -> RelianceProbe:
        if self.probe is None:
            self.probe = RelianceProbe.from_config(self.cfg, module.transformer.face_encoder.clip_image_size)
        return self.probe

    @contextmanager
    def _evaluating(self, trainer):
        """No gradients; under FSDP the weights outside the blocks gathered (each block gathers its own); under
        bf16-mixed (frozen modules bf16, trainable ones fp32) the training step's autocast; with ema.enabled the
        EMA weights swapped in."""
        ema = find_ema(trainer)
        with (
            torch.no_grad(),
            evaluation_weights(trainer.strategy.model),
            trainer.precision_plugin.forward_context(),
            ema.swapped_in() if ema else nullcontext(),
        ):
            yield

    def _run(self, trainer, module) -> None:
        logger = trainer.logger
        run_id = trainer.strategy.broadcast(getattr(logger, "run_id", None) if trainer.is_global_zero else None)
        if run_id is None:
            return
        with self._evaluating(trainer):
            evaluate_model(
                module,
                self.cfg,
                self.stage,
                logger.experiment,
                run_id,  # fit's outage-proof client
                trainer.global_step,
                trainer.global_rank,
                trainer.world_size,
                self._probe(module),
            )
        self.reliance_step = self.evaluated_step = trainer.global_step

    def _run_reliance(self, trainer, module) -> None:
        """The identity-reliance probe alone, every eval.reliance_every_n_steps: a learning curve in MLflow."""
        logger = trainer.logger
        run_id = trainer.strategy.broadcast(getattr(logger, "run_id", None) if trainer.is_global_zero else None)
        if run_id is None or self.reliance_step == trainer.global_step:  # the evaluation at this step ran it
            return
        with self._evaluating(trainer):
            result = self._probe(module).measure(module)  # every rank: FSDP's gathering is collective
        self.reliance_step = trainer.global_step
        if trainer.is_global_zero:
            for key, value in result.metrics().items():
                logger.experiment.log_metric(run_id, f"eval/{self.stage}/{key}", value, step=trainer.global_step)

    def on_train_start(self, trainer, module):
        self.optimizer_steps.start(trainer)
        if self.cfg.eval.reliance_every_n_steps:
            self._run_reliance(trainer, module)  # the curve's first point: exactly 0 on a fresh model

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if not self.optimizer_steps.completed(trainer):  # gradient accumulation: the step is not done yet
            return
        step, n = trainer.global_step, self.cfg.eval.every_n_steps
        if step == trainer.max_steps or (n and step % n == 0):
            self._run(trainer, module)
        r = self.cfg.eval.reliance_every_n_steps
        if r and step % r == 0:
            self._run_reliance(trainer, module)

    def on_train_end(self, trainer, module):
        if self.evaluated_step != trainer.global_step:  # the loop stopped before max_steps (trainer.should_stop)
            self._run(trainer, module)
