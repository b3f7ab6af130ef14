"""fit's checkpoints on disk: how each file is written, the newest readable one for --resume, and one file per
finished stage.

Lightning writes each checkpoint as one file, except under DeepSpeed (ZeRO-2 and ZeRO-3), where it
is a folder of per-rank shards: `<name>.ckpt/checkpoint/*mp_rank_00_model_states.pt` holds
Lightning's own state (global_step included) beside rank 0's share of the weights, and
`*optim_states.pt` the optimizer's shards. Both kinds resume through `Trainer.fit(ckpt_path=...)`.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict, ds_checkpoint_dir


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint file writer, writing `<name>.partial` beside the checkpoint and renaming it into place.

    Lightning's own writer serializes the whole checkpoint in memory, writes it to a file in $TMPDIR and moves that
    file into place. This is atomic only where $TMPDIR and output_dir share a filesystem. Elsewhere (a node's /tmp
    and a cluster's shared disk; the GPU runs' /tmp and /dev/shm) the move is a copy written in place, and a kill
    during it left a truncated 20 GiB `step=1.ckpt` (benchmarks/real_scale/README.md, eleventh session). It came
    after a first full write to $TMPDIR, which then needs room for one. Here a kill leaves the previous file whole,
    and a `.partial` that the next save of that name overwrites. DeepSpeed writes its shard folders itself."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if storage_options is not None:  # as Lightning's TorchCheckpointIO
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        torch.save(checkpoint, partial)
        os.replace(partial, path)  # atomic on one filesystem


class ResumeError(Exception):
    """A run cannot continue: its checkpoints are unreadable, or another fit holds its folder."""


def checkpoint_step(path: Path) -> int:
    """global_step of a checkpoint file or DeepSpeed checkpoint folder; raises when it cannot be read."""
    if path.is_dir():
        states = sorted(Path(ds_checkpoint_dir(path)).glob("*mp_rank_00_model_states.pt"))  # rank 0's
        if not states:
            raise FileNotFoundError(f"a DeepSpeed checkpoint folder without its model states file: {path}")
        path = states[0]
    # mmap: reads the header and global_step, not the tensors
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True).get("global_step", 0)


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The readable checkpoint with the most steps: last.ckpt, on_exception.ckpt or a kept step=N.ckpt.

    A truncated or corrupt one is named on stderr and passed over, so resuming falls back to
    the previous good checkpoint; when none is readable, ResumeError names the corrupt ones."""
    best, best_step, corrupt = None, -1, []
    for path in sorted(ckpt_dir.glob("*.ckpt")):
        if path.name == "final.ckpt":
            continue
        try:
            step = checkpoint_step(path)
        except Exception as err:  # noqa: BLE001 - torch raises RuntimeError, EOFError, UnpicklingError, ...
            corrupt.append(f"{path} ({type(err).__name__}: {str(err).splitlines()[0][:120]})")
            print(f"warning: checkpoint {path} is unreadable (truncated or corrupt), passed over", file=sys.stderr)
            continue
        if step > best_step:
            best, best_step = path, step
    if best is None and corrupt:
        raise ResumeError(f"cannot resume: no readable checkpoint in {ckpt_dir}; corrupt: {'; '.join(corrupt)}")
    if best is not None and corrupt:
        print(f"resuming from the previous good checkpoint {best} (step {best_step})", file=sys.stderr)
    return best


def save_stage_weights(trainer: L.Trainer, path: Path) -> None:
    """The finished stage's trained weights (and config) as one file, which later stages, `generate` and
    `evaluate` read. Every rank calls it.

    DeepSpeed saves a folder of shards, with the optimizer's states even for weights only: Lightning's
    converter joins the folder into one checkpoint file (fp32 weights, Lightning's state kept) on rank 0,
    and the folder goes."""
    if not isinstance(trainer.strategy, DeepSpeedStrategy):
        trainer.save_checkpoint(path, weights_only=True)  # rank 0 writes
        return
    shards = path.with_suffix(".shards")
    trainer.save_checkpoint(shards, weights_only=True)
    if trainer.is_global_zero:
        convert_zero_checkpoint_to_fp32_state_dict(shards, path)
        shutil.rmtree(shards)
    trainer.strategy.barrier()
