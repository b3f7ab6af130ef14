"""Lightning's periodic checkpoint, written only when an optimizer step has trained something new."""

from lightning.pytorch.callbacks import ModelCheckpoint

from mm_lightning.callbacks.optimizer_steps import OptimizerSteps


class StepCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` that saves after a micro-batch only if it completed an optimizer step.

    Lightning decides from the last step it saved in this process, which starts at 0. So after `--resume` at step N
    under gradient accumulation, the first micro-batch still sees step N and saved it again: a full copy in place of
    the `last.ckpt` link, mid-accumulation (its gradients are not in it), and at 5B 20 GiB and 1-2 minutes of every
    resume (benchmarks/real_scale/README.md, thirteenth session).

    Without Lightning's version counter: a resumed run relinks `last.ckpt` (with it, the link went to
    `last-v1.ckpt`, beside a `last.ckpt` left at the resumed step), and a step retrained after its checkpoint was
    found corrupt overwrites that file."""

    def __init__(self, **kwargs) -> None:
        super().__init__(enable_version_counter=False, **kwargs)
        self.optimizer_steps = OptimizerSteps()

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self.optimizer_steps.start(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.optimizer_steps.completed(trainer):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
