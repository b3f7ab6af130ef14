"""Lightning's checkpoint on an exception, from the run's first optimizer step on."""

from lightning.pytorch.callbacks import OnExceptionCheckpoint


class ExceptionCheckpoint(OnExceptionCheckpoint):
    """`OnExceptionCheckpoint` that writes nothing while the trainer is at step 0: nothing has trained yet (a
    resumed run's step is restored only once the strategy has set the model up). Saving there could fail in its
    turn and replace the original error: under DeepSpeed, before the engine exists, Lightning's save raised
    `'MagicMirrorModule' object has no attribute 'save_checkpoint'` in place of the setup's own error."""

    def on_exception(self, trainer, pl_module, exception) -> None:
        if trainer.global_step > 0:
            super().on_exception(trainer, pl_module, exception)
