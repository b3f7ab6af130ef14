"""A progress bar that counts a curriculum stage's optimiser steps, with the stage's name."""

from lightning.pytorch.callbacks import TQDMProgressBar


class StageProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, but one bar per stage from 0 to max_steps instead of one per epoch."""

    def __init__(self, stage: str):
        super().__init__()
        self.stage = stage

    def on_train_epoch_start(self, trainer, *_):
        if self.train_progress_bar is None or self.train_progress_bar.total != trainer.max_steps:
            self.train_progress_bar.reset(total=trainer.max_steps)
        self.train_progress_bar.n = trainer.global_step
        self.train_progress_bar.set_description(f"stage {self.stage}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        bar = self.train_progress_bar
        bar.n = trainer.global_step
        bar.set_postfix(self.get_metrics(trainer, pl_module))
        bar.refresh()

    def get_metrics(self, trainer, pl_module):
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # MLflow's run id fragment; the stage name says more
        return metrics

    def on_train_epoch_end(self, trainer, pl_module):
        pass  # the bar spans epochs; it closes at the end of the stage

    def on_train_end(self, *_):
        self.train_progress_bar.set_postfix_str("done")
        self.train_progress_bar.close()
