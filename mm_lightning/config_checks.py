"""The rules across config keys that the schema's types cannot say; `config.load_config` applies them
after every merge. Each error names the keys and says what to change."""

from __future__ import annotations

import importlib.util

from omegaconf import DictConfig

BRANCHES = ("identity", "structural")
STAGE_DATA = ("image", "video")


class ConfigError(ValueError):
    """A config that cannot be used; the message says what to change."""


def validate(cfg: DictConfig) -> None:
    model = cfg.model
    bad = [b for b in model.branches if b not in BRANCHES]
    if bad or not model.branches:
        raise ConfigError(f"model.branches must be a non-empty subset of {list(BRANCHES)}, got {list(model.branches)}")
    if model.face_modality and "structural" not in model.branches:
        raise ConfigError("model.face_modality needs the structural branch (x_face) in model.branches")
    if model.can and "identity" not in model.branches:
        raise ConfigError("model.can conditions on x_id and needs the identity branch in model.branches")
    if model.freeze_id_perceiver and cfg.weights.photomaker_v2 is None:
        raise ConfigError(
            "model.freeze_id_perceiver=true freezes PhotoMakerV2's ID perceiver, but weights.photomaker_v2 is not "
            "set: it would freeze random weights. Set weights.photomaker_v2=<path to photomaker-v2.bin> or "
            "model.freeze_id_perceiver=false"
        )
    if model.id_encoder_dim % model.id_encoder_head_dim:
        raise ConfigError(
            f"model.id_encoder_dim {model.id_encoder_dim} must be a multiple of "
            f"id_encoder_head_dim {model.id_encoder_head_dim}"
        )
    if model.face_attention not in ("joint", "cross_only"):
        raise ConfigError(f"model.face_attention must be 'joint' or 'cross_only', got {model.face_attention!r}")
    for name in cfg.curriculum.order:
        if name not in cfg.curriculum.stages:
            raise ConfigError(
                f"curriculum.order names stage {name!r}; declared stages: {', '.join(cfg.curriculum.stages)}"
            )
    for name, stage in cfg.curriculum.stages.items():
        if stage.data not in STAGE_DATA:
            raise ConfigError(f"curriculum.stages.{name}.data must be one of {STAGE_DATA}, got {stage.data!r}")
        if stage.data == "image" and stage.frames != 1:
            raise ConfigError(f"curriculum.stages.{name}: image stages have frames=1, got {stage.frames}")
        if stage.global_batch is not None:
            if stage.accumulate_grad_batches != 1:
                raise ConfigError(
                    f"curriculum.stages.{name}: set global_batch or accumulate_grad_batches, not both "
                    "(with global_batch the accumulation is derived)"
                )
            if stage.global_batch % stage.batch_size:
                raise ConfigError(
                    f"curriculum.stages.{name}: global_batch {stage.global_batch} is not a multiple of the "
                    f"per-device batch_size {stage.batch_size}"
                )
    if cfg.faces.backend not in ("dlib", "insightface"):
        raise ConfigError(f"faces.backend must be 'dlib' or 'insightface', got {cfg.faces.backend!r}")
    if cfg.loss.identity_weight > 0 and cfg.faces.backend != "insightface":
        raise ConfigError(
            "loss.identity_weight > 0 needs a differentiable face embedder, and the "
            f"{cfg.faces.backend!r} backend is not differentiable; use faces.backend=insightface "
            "(ArcFace converted to torch) or set loss.identity_weight=0"
        )
    if not 0.0 <= cfg.loss.face_region_fraction <= 1.0:
        raise ConfigError("loss.face_region_fraction must be in [0, 1]")
    if cfg.sampling.scheduler not in ("dpm", "ddim"):
        raise ConfigError(f"sampling.scheduler must be 'dpm' or 'ddim', got {cfg.sampling.scheduler!r}")
    if cfg.trainer.frozen_dtype not in ("auto", "bfloat16", "float32"):
        raise ConfigError(f"trainer.frozen_dtype must be auto, bfloat16 or float32, got {cfg.trainer.frozen_dtype!r}")
    if cfg.ema.enabled and not 0.0 <= cfg.ema.decay <= 1.0:
        raise ConfigError(f"ema.decay must be in [0, 1], got {cfg.ema.decay}")
    if cfg.ema.enabled and cfg.ema.update_every_n_steps < 1:
        raise ConfigError(f"ema.update_every_n_steps must be >= 1, got {cfg.ema.update_every_n_steps}")
    if cfg.ema.enabled and cfg.trainer.strategy in ("fsdp", "deepspeed_stage_3"):
        raise ConfigError(
            f"ema.enabled does not work with trainer.strategy={cfg.trainer.strategy} (Lightning's weight "
            "averaging needs unsharded weights); use ddp or deepspeed_stage_2"
        )
    if cfg.trainer.compile_blocks and cfg.trainer.strategy == "deepspeed_stage_3":
        # ZeRO-3 gathers each layer's weights in hooks inside the blocks, which torch.compile would have to trace.
        raise ConfigError(
            "trainer.compile_blocks=true has not run under trainer.strategy="
            "deepspeed_stage_3, whose weight gathering runs inside every block; add trainer.compile_blocks=false"
        )
    if cfg.optim.name not in ("adamw", "adamw8bit"):
        raise ConfigError(f"optim.name must be adamw or adamw8bit, got {cfg.optim.name!r}")
    if cfg.optim.name == "adamw8bit" and importlib.util.find_spec("torchao") is None:
        raise ConfigError("optim.name=adamw8bit needs torchao, which is not installed: pip install torchao==0.18.0")
    if cfg.optim.lr_schedule not in ("cosine", "linear", "constant"):
        raise ConfigError(f"optim.lr_schedule must be cosine, linear or constant, got {cfg.optim.lr_schedule!r}")
    if cfg.loss.timestep_sampling not in ("uniform", "logit_normal", "mode"):
        raise ConfigError(
            f"loss.timestep_sampling must be uniform, logit_normal or mode, got {cfg.loss.timestep_sampling!r}"
        )
    if cfg.trainer.keep_checkpoints < 1:
        raise ConfigError("trainer.keep_checkpoints must be at least 1 (last.ckpt links to the newest kept one)")
