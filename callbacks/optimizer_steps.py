"""Which micro-batch completed an optimizer step, for callbacks that act once per step.

Lightning ends every micro-batch of gradient accumulation with `on_train_batch_end`; `trainer.global_step` moves
only on the one that stepped the optimizer."""


class OptimizerSteps:
    def __init__(self):
        self.step_at_last_batch = None

    def start(self, trainer) -> None:
        """From `on_train_start`: the step training starts or resumes at."""
        self.step_at_last_batch = trainer.global_step

    def completed(self, trainer) -> bool:
        """From `on_train_batch_end`: whether this micro-batch completed an optimizer step."""
        stepped, self.step_at_last_batch = trainer.global_step != self.step_at_last_batch, trainer.global_step
        return stepped
