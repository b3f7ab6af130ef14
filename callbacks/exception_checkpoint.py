"""Lightning's checkpoint on an exception, from the run's first optimizer step on."""

from lightning.pytorch.callbacks import OnExceptionCheckpoint


class ExceptionCheckpoint(OnExceptionCheckpoint):
    """`OnExceptionCheckpoint` that writes nothing while the trainer is at step 0, nor for a non-finite loss or
    gradient (the module's NonFiniteLossError, a FloatingPointError).

    At step 0 nothing has trained yet (a resumed run's step is restored only once the strategy has set the model
    up), and saving there could fail in its turn and replace the original error: under DeepSpeed, before the
    engine exists, Lightning's save raised `'MagicMirrorModule' object has no attribute 'save_checkpoint'` in
    place of the setup's own error. Weights that gave a non-finite loss would be the newest checkpoint, and
    `--resume` would start from them: the last periodic checkpoint is the one to resume from."""

    def on_exception(self, trainer, pl_module, exception) -> None:
        if trainer.global_step > 0 and not isinstance(exception, FloatingPointError):
            super().on_exception(trainer, pl_module, exception)
