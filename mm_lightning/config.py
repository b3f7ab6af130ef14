"""Validated experiment configs.

An experiment is the schema below, then `experiments/base.yaml`, then the profile
(`experiments/profiles/<profile>.yaml`: sizes and weight paths), then the experiment's own
small YAML, then `key=value` overrides from the command line. Everything runs in omegaconf
struct mode, so a misspelt key is an error that lists the valid keys instead of being
silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

EXPERIMENTS_DIR = Path(__file__).resolve().parent.parent / "experiments"
PROFILES_DIR = EXPERIMENTS_DIR / "profiles"
BRANCHES = ("identity", "structural")
STAGE_DATA = ("image", "video")


@dataclass
class WeightsConfig:
    """Local diffusers/transformers directories. Nothing is ever fetched from a hub."""

    transformer: str = "???"
    vae: str = "???"
    text_encoder: str = "???"
    tokenizer: str = "???"
    scheduler: str = "???"
    image_encoder: str = "???"  # CLIPVisionModel + its preprocessor_config.json
    # tiny profile only: write small random-init weights to these paths when they are missing
    create_random: bool = False


@dataclass
class ArchitectureConfig:
    """Model configs (diffusers/transformers `from_config` kwargs) for models built without
    weights: the tiny profile's random init, and meta-device builds for `describe`/`bench`.
    When loading real weights, each folder's own config.json wins."""

    transformer: dict[str, Any] = field(default_factory=dict)
    vae: dict[str, Any] = field(default_factory=dict)
    text_encoder: dict[str, Any] = field(default_factory=dict)
    image_encoder: dict[str, Any] = field(default_factory=dict)
    scheduler: dict[str, Any] = field(default_factory=dict)


@dataclass
class FacesConfig:
    backend: str = "dlib"  # "dlib" (128-d face_recognition embedding) | "insightface" (512-d ArcFace)
    insightface_root: str | None = None  # folder holding models/<insightface_model>/*.onnx
    insightface_model: str = "antelopev2"


@dataclass
class ModelConfig:
    # Variant flags (Table 3 of the paper); experiments only set these.
    branches: list[str] = field(default_factory=lambda: list(BRANCHES))
    face_modality: bool = True  # m_face: x_face joins joint attention with its own AdaLN
    can: bool = True  # Conditioned Adaptive Normalization residual
    freeze_id_perceiver: bool = False
    # Sizes of the new modules.
    num_id_tokens: int = 2
    num_face_tokens: int = 32
    perceiver_dim: int = 1024
    perceiver_depth: int = 4
    perceiver_heads: int = 16
    can_hidden_dim: int = 1024
    # Identity-token mask: class words in the prompt, or a trigger word when set.
    identity_words: list[str] = field(
        default_factory=lambda: ["man", "woman", "boy", "girl", "person", "baby", "child", "lady", "guy"]
    )
    trigger_word: str | None = None


@dataclass
class StageConfig:
    data: str = "video"  # "image" | "video"
    frames: int = 1
    height: int = 480
    width: int = 720
    max_steps: int = 1000
    batch_size: int = 1
    accumulate_grad_batches: int = 1
    lr: float = 1e-5


@dataclass
class CurriculumConfig:
    order: list[str] = field(default_factory=lambda: ["image_pretrain", "video_finetune"])
    stages: dict[str, StageConfig] = field(default_factory=dict)


@dataclass
class LossConfig:
    face_region_fraction: float = 0.5  # share of samples whose diffusion loss covers only the face
    identity_weight: float = 0.0  # lambda of the ArcFace identity loss; 0 disables it
    identity_frames: int = 1  # decoded frames per sample for the identity loss


@dataclass
class OptimConfig:
    weight_decay: float = 1e-2
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    lr_schedule: str = "cosine"  # "cosine" | "linear" | "constant"
    min_lr_ratio: float = 0.1
    gradient_clip_val: float = 1.0


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    devices: str = "auto"
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | fsdp | deepspeed_stage_2
    precision: str = "32-true"  # "bf16-mixed" | "bf16-true" | "32-true"
    gradient_checkpointing: bool = False
    compile_blocks: bool = False
    log_every_n_steps: int = 1
    deterministic: bool = False
    checkpoint_every_n_steps: int = 50


@dataclass
class DataConfig:
    root: str | None = None  # None: the built-in demo dataset
    num_workers: int = 0
    fps: float = 8.0
    use_cache: bool = True  # use precomputed VAE latents / T5 embeddings when present


@dataclass
class SamplingConfig:
    scheduler: str = "dpm"  # "dpm" (CogVideoXDPMScheduler) | "ddim" (CogVideoXDDIMScheduler)
    num_inference_steps: int = 50
    guidance_scale: float = 6.0
    num_frames: int = 49
    height: int = 480
    width: int = 720
    fps: int = 8
    negative_prompt: str = ""
    vae_slicing: bool = True
    vae_tiling: bool = True


@dataclass
class EvalConfig:
    enabled: bool = True
    every_n_steps: int = 0  # 0: only at the end of each stage
    eval_set: str | None = None  # YAML of identities + prompts; None: the built-in demo set
    max_videos: int = 0  # 0: all identity x prompt pairs
    frames_sampled: int = 16  # frames per video for the face metrics
    flow: str = "farneback"
    flow_max_side: int | None = 360  # flow on frames downscaled to this longest side (VBench-equivalent, see evaluation/flow.py); None: full size
    fm_reduction: str = "sum"  # FM distance over the 5 landmarks: sum | mean
    clip_path: str | None = None  # local CLIP for text alignment; None: metric left out
    no_face_similarity: float | None = 0.0


@dataclass
class TrackingConfig:
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db
    experiment_name: str = "mm_lightning"


@dataclass
class Config:
    experiment: str = "???"
    profile: str = "???"
    seed: int = 0
    output_dir: str = "runs/${experiment}"
    cache_dir: str = "${oc.env:MM_LIGHTNING_CACHE,.cache/mm_lightning}"
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    architecture: ArchitectureConfig = field(default_factory=ArchitectureConfig)
    faces: FacesConfig = field(default_factory=FacesConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


class ConfigError(ValueError):
    """A config that cannot be used; the message says what to change."""


def list_experiments() -> list[str]:
    return sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml") if p.stem != "base")


def list_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def load_config(experiment: str, profile: str = "tiny", overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """schema <- base.yaml <- profile <- experiment <- overrides, validated."""
    if experiment not in list_experiments():
        raise ConfigError(f"unknown experiment {experiment!r}; choose one of: {', '.join(list_experiments())}")
    if profile not in list_profiles():
        raise ConfigError(f"unknown profile {profile!r}; choose one of: {', '.join(list_profiles())}")
    cfg = OmegaConf.structured(Config)
    layers = [
        OmegaConf.load(EXPERIMENTS_DIR / "base.yaml"),
        OmegaConf.load(PROFILES_DIR / f"{profile}.yaml"),
        OmegaConf.load(EXPERIMENTS_DIR / f"{experiment}.yaml"),
        OmegaConf.create({"experiment": experiment, "profile": profile}),
    ]
    return _merge(cfg, layers, overrides)


def config_from_checkpoint(checkpoint: dict, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The resolved config a checkpoint was trained with (MagicMirrorModule stores it), plus overrides."""
    if "mm_config" not in checkpoint:
        raise ConfigError("this checkpoint was not written by mm_lightning (no 'mm_config' in it)")
    return _merge(OmegaConf.structured(Config), [OmegaConf.create(checkpoint["mm_config"])], overrides)


def _merge(cfg: DictConfig, layers: list, overrides) -> DictConfig:
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override {override!r} is not key=value")
        layers.append(OmegaConf.from_dotlist([override]))
    for layer in layers:
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except (ConfigKeyError, ConfigAttributeError) as err:
            raise ConfigError(_unknown_key_message(cfg, err)) from None
        except ValidationError as err:
            raise ConfigError(f"invalid value: {err.msg} (key {err.full_key})") from None
    validate(cfg)
    return cfg


def _unknown_key_message(cfg: DictConfig, err: Exception) -> str:
    full_key = getattr(err, "full_key", "") or ""
    parent_key, _, key = full_key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    valid = ", ".join(sorted(parent.keys())) if isinstance(parent, DictConfig) else "?"
    return f"unknown config key {full_key!r}; valid keys under {parent_key or 'the top level'}: {valid}"


def validate(cfg: DictConfig) -> None:
    model = cfg.model
    bad = [b for b in model.branches if b not in BRANCHES]
    if bad or not model.branches:
        raise ConfigError(f"model.branches must be a non-empty subset of {list(BRANCHES)}, got {list(model.branches)}")
    if model.face_modality and "structural" not in model.branches:
        raise ConfigError("model.face_modality needs the structural branch (x_face) in model.branches")
    if model.can and "identity" not in model.branches:
        raise ConfigError("model.can conditions on x_id and needs the identity branch in model.branches")
    for name in cfg.curriculum.order:
        if name not in cfg.curriculum.stages:
            raise ConfigError(f"curriculum.order names stage {name!r}; declared stages: {', '.join(cfg.curriculum.stages)}")
    for name, stage in cfg.curriculum.stages.items():
        if stage.data not in STAGE_DATA:
            raise ConfigError(f"curriculum.stages.{name}.data must be one of {STAGE_DATA}, got {stage.data!r}")
        if stage.data == "image" and stage.frames != 1:
            raise ConfigError(f"curriculum.stages.{name}: image stages have frames=1, got {stage.frames}")
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
    if cfg.optim.lr_schedule not in ("cosine", "linear", "constant"):
        raise ConfigError(f"optim.lr_schedule must be cosine, linear or constant, got {cfg.optim.lr_schedule!r}")


def stage_names(cfg: DictConfig) -> list[str]:
    return list(cfg.curriculum.order)


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
