"""How fit's trainer runs on its devices: Lightning's strategies (DDP; FSDP in units of one transformer block;
DeepSpeed ZeRO-2/3), what evaluation needs under FSDP, and which compiled-block training the GPU's torch gets
right."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from omegaconf import DictConfig
from torch import nn

from mm_lightning.config import ConfigError


def _on_cuda_gpus(cfg: DictConfig) -> bool:
    """Whether fit's trainer runs on CUDA GPUs: some are visible, and trainer.accelerator takes them."""
    return cfg.trainer.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def compiled_cuda_gradients_known_wrong() -> bool:
    """torch before 2.14: its compiled CUDA backward of an adapted block gave wrong gradients (2.11 measured)."""
    from packaging.version import Version

    return Version(torch.__version__).release[:2] < (2, 14)


def refuse_compiled_training_on_cuda(cfg: DictConfig) -> None:
    """trainer.compile_blocks on a GPU with torch < 2.14, where the adapter's Triton kernels cannot run: a config
    error. On torch 2.11 (H100) inductor's own compiled backward of an adapted block gives CAN and the face-key
    gate wrong gradients (CAN's 14-17% off in bf16, far more in fp32; NaN at 5B under DeepSpeed;
    benchmarks/real_scale/compiled_gradients/README.md, part of it pytorch/pytorch#193061). The Triton kernels of
    the modulated norms and the face-key merge compute exactly those gradients, and compiled blocks launch them as
    custom ops: with them the compiled bf16 block's gradients equal eager ones
    (tests/test_model.py::test_compiled_block_gradients_equal_eager_at_video_length). They run in half precision
    where Triton is installed, on a frozen backbone (its norms' affine takes no gradient), without determinism."""
    if not (cfg.trainer.compile_blocks and _on_cuda_gpus(cfg) and compiled_cuda_gradients_known_wrong()):
        return
    from mm_lightning.models import adapter

    kept_out = {
        "Triton is not installed": adapter.fused_face_key_merge is None,
        f"trainer.precision={cfg.trainer.precision} (the kernels run in bf16 or fp16)": not str(
            cfg.trainer.precision
        ).startswith(("bf16", "16")),
        "trainer.deterministic=true (the merge's backward adds with atomics)": cfg.trainer.deterministic,
        "model.train_backbone=true (the norms' own weights then train)": cfg.model.train_backbone,
    }
    reasons = [reason for reason, applies in kept_out.items() if applies]
    if reasons:
        raise ConfigError(
            f"trainer.compile_blocks=true trains on wrong adapter gradients on CUDA with torch {torch.__version__} "
            f"without the adapter's Triton kernels, which cannot run here: {'; '.join(reasons)} "
            "(see benchmarks/real_scale/compiled_gradients/README.md): use trainer.compile_blocks=false"
        )


def strategy(cfg: DictConfig):
    """Lightning's own strategies; FSDP shards at the CogVideoX block level."""
    name = cfg.trainer.strategy
    if (name == "fsdp" or name.startswith("deepspeed_stage_")) and not _on_cuda_gpus(cfg):
        # One line here, rather than Lightning's traceback once fit starts.
        raise ConfigError(
            f"trainer.strategy={name} needs CUDA GPUs, and {torch.cuda.device_count()} are visible with "
            f"trainer.accelerator={cfg.trainer.accelerator}: use ddp or auto here"
        )
    if name == "fsdp":
        from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock
        from lightning.pytorch.strategies import FSDPStrategy

        from mm_lightning.models.adapter import MagicMirrorBlock

        # use_orig_params: frozen and trainable weights share the wrapped units.
        return FSDPStrategy(auto_wrap_policy=BlockUnits(CogVideoXBlock, MagicMirrorBlock), use_orig_params=True)
    if name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        # The frozen backbone takes no part in the gradient all-reduce; unused adapters
        # (e.g. CAN in a variant without it) do not exist, so no unused-parameter search.
        return DDPStrategy(find_unused_parameters=False)
    if name.startswith("deepspeed_stage_"):
        from lightning.pytorch.strategies import DeepSpeedStrategy

        # Checkpoints hold the trained weights, as under the other strategies: not the frozen backbone, T5 or VAE.
        return DeepSpeedStrategy(stage=int(name.removeprefix("deepspeed_stage_")), exclude_frozen_parameters=True)
    return name  # "auto"


def evaluation_weights(model: nn.Module) -> AbstractContextManager:
    """Where `model` (the trainer's strategy.model) is FSDP's root: its own unit's weights whole on every rank for
    the context's duration; otherwise nothing. Outside a unit's forward a rank holds only its shard of the unit's
    weights, and the evaluation and the reliance probe call the root unit's modules directly (the VAE, the face
    encoder, the transformer's embeddings and output layers), not through the root's forward as a training step
    does. The block units gather themselves in their own forward, one at a time, in the compute dtype of FSDP's
    mixed precision (bf16 under bf16-mixed), and free their copy after it: the evaluation calls the transformer's
    forward. Gathering every unit at once (recurse=True) held the whole transformer in fp32 (FSDP keeps frozen
    and trainable weights of a unit in one flat fp32 tensor): at 5B on four H200s the peak per GPU was 86.83 GiB
    that way, 60.64 GiB this way. Collective: every rank enters, and runs as many forwards (the evaluation gives
    every rank as many videos). writeback=False: nothing evaluation does reaches the shards."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    if isinstance(model, FullyShardedDataParallel):
        return FullyShardedDataParallel.summon_full_params(model, recurse=False, writeback=False)
    return nullcontext()


class BlockUnits:
    """FSDP's auto-wrap policy: one sharded unit per transformer block, an adapted block together with the
    CogVideoX block inside it (MagicMirrorBlock calls that block's layers itself, not its forward, so they
    must be gathered with it). FSDP visits a parent before its children: the parent names the inner block."""

    def __init__(self, block_cls: type, adapted_cls: type):
        self.block_cls, self.adapted_cls, self.inner = block_cls, adapted_cls, set()

    def __call__(self, module, recurse: bool, nonwrapped_numel: int) -> bool:
        if isinstance(module, self.adapted_cls):
            self.inner.add(id(module.block))
            return True
        if id(module) in self.inner:
            return False  # neither a unit of its own nor searched further
        return recurse or isinstance(module, self.block_cls)
