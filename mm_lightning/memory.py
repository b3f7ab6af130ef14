"""What `fit` says when a training step runs out of GPU memory.

A bare CUDA OOM traceback names neither the stage nor the knobs that would make the step
fit, so `fit` turns it into one message with the stage, the per-device batch, the peak
reached on this device and the options, in the order they usually help at 5B scale.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig


class TrainingOutOfMemoryError(RuntimeError):
    pass


def gib(n_bytes: int) -> float:
    return n_bytes / 2**30


def smaller_batch(stage: str, s) -> str:
    """With a global batch set, accumulation is derived from it (halving the per-device batch is enough);
    without one, accumulation is doubled by hand to keep the effective batch."""
    half = f"curriculum.stages.{stage}.batch_size={max(s.batch_size // 2, 1)}"
    if s.get("global_batch"):
        return f"a smaller per-device batch (accumulation follows global_batch={s.global_batch}), e.g. {half}"
    return f"a smaller batch with accumulation, e.g. {half} " + (
        f"curriculum.stages.{stage}.accumulate_grad_batches={s.accumulate_grad_batches * 2}"
    )


def out_of_memory_error(cfg: DictConfig, stage: str, err: BaseException) -> TrainingOutOfMemoryError:
    s = cfg.curriculum.stages[stage]
    if torch.cuda.is_available():
        device = torch.cuda.current_device()
        total = torch.cuda.get_device_properties(device).total_memory
        peak = f"peak {gib(torch.cuda.max_memory_allocated(device)):.1f} GiB allocated of {gib(total):.1f} GiB"
    else:
        peak = "peak unknown (no CUDA device)"
    options = [
        "trainer.strategy=deepspeed_stage_2 or fsdp (shard the AdamW states over GPUs), deepspeed_stage_3 "
        "(the weights too)",
        "trainer.gradient_checkpointing=true" if not cfg.trainer.gradient_checkpointing else None,
        "trainer.frozen_dtype=bfloat16 (frozen backbone, T5, VAE, CLIP in bf16)"
        if cfg.trainer.frozen_dtype == "float32"
        else None,
        "optim.name=adamw8bit (8-bit AdamW states, torchao: about 6 bytes less per trainable parameter)"
        if cfg.optim.name == "adamw"
        else None,
        "precompute the latent/T5 caches (`python -m mm_lightning cache ...`) so T5 and the VAE stay unloaded",
        smaller_batch(stage, s),
    ]
    if cfg.loss.identity_weight > 0:
        options.append(
            "loss.identity_vae_tiling=true, loss.identity_frames=1 or loss.identity_weight=0 (the identity loss "
            "decodes frames with autograd; tiling: 36.5 instead of 41.4 GiB at 5B with 8-bit AdamW, +27% step time)"
        )
    lines = "\n  ".join(o for o in options if o)
    return TrainingOutOfMemoryError(
        f"CUDA out of memory in stage {stage!r} at per-device batch {s.batch_size} "
        f"({s.frames}x{s.height}x{s.width}); {peak}. The last checkpoint is kept: change one of these, "
        f"then `fit ... --resume`:\n  {lines}\n(torch: {str(err).splitlines()[0] if str(err) else type(err).__name__})"
    )
