"""Validated experiment configs.

An experiment is the schema below, then `experiments/base.yaml`, then the profile
(`experiments/profiles/<profile>.yaml`: sizes and weight paths), then the experiment's own
small YAML, then `key=value` overrides from the command line. Everything runs in omegaconf
struct mode, so a misspelt key is an error that lists the valid keys instead of being
silently ignored. An experiment or profile is a built-in name or a path to a YAML file
anywhere on disk; a file composes over base.yaml exactly as a built-in does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from mm_lightning.config_checks import BRANCHES, ConfigError, validate

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable


def _experiments_root() -> Traversable:
    """The built-in experiment and profile YAMLs. A wheel ships the top-level experiments/ folder as
    package data in mm_lightning/experiments (pyproject.toml maps it there); a source checkout reads
    the top-level folder itself, so an edited YAML needs no reinstall."""
    packaged = resources.files("mm_lightning") / "experiments"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "experiments"


EXPERIMENTS_DIR = _experiments_root()
PROFILES_DIR = EXPERIMENTS_DIR / "profiles"


@dataclass
class WeightsConfig:
    """Local diffusers/transformers directories. Nothing is ever fetched from a hub."""

    transformer: str = "???"
    vae: str = "???"
    text_encoder: str = "???"
    tokenizer: str = "???"
    scheduler: str = "???"
    image_encoder: str = "???"  # CLIPVisionModel + its preprocessor_config.json
    # PhotoMakerV2's checkpoint (photomaker-v2.bin or .safetensors): its ID perceiver becomes tau_id and its
    # CLIP ViT-L/14 replaces image_encoder's weights (paper Sec. 4.1). None: the ID perceiver starts random.
    photomaker_v2: str | None = None
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
    # How text/video read the face stream (m_face): "joint" = its keys inside the joint softmax behind a
    # zero-init per-head gate (paper Eq. 8); "cross_only" = only through the decoupled cross-attention (earlier design)
    face_attention: str = "joint"
    freeze_id_perceiver: bool = False  # keep PhotoMakerV2's ID perceiver as loaded (needs weights.photomaker_v2)
    # Also train CogVideoX's own weights. The paper trains only the new modules (false); the tiny profile
    # trains them too, because its random backbone is no denoiser to adapt (README, the probe).
    train_backbone: bool = False
    # Train the perceivers that turn the face into x_id and x_face (false: they stay as loaded or initialised;
    # the fusion MLP, CAN and the blocks' adapters still train). The tiny profile sets false: trained from
    # scratch on its 9 identities they collapse to the same tokens for everyone (README, the probe).
    train_face_encoder: bool = True
    # Sizes of the new modules.
    num_id_tokens: int = 2
    num_face_tokens: int = 32
    perceiver_dim: int = 1024
    perceiver_depth: int = 4
    perceiver_heads: int = 16
    # ID perceiver (PhotoMakerV2's QFormer-perceiver layout): its width, depth and head size
    id_encoder_dim: int = 2048
    id_encoder_depth: int = 4
    id_encoder_head_dim: int = 128
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
    batch_size: int = 1  # per device
    accumulate_grad_batches: int = 1  # used as given when global_batch is None
    # Samples per optimizer step over all devices (paper: 64 images, 8 videos). Set, it fixes the accumulation:
    # global_batch / (batch_size x world size), which must be a whole number; None: batch_size x accumulation x devices.
    global_batch: int | None = None
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
    # Decode them tile by tile (diffusers' VAE tiling, as sampling decodes): with the decoder checkpointed, the
    # backward recomputes one tile's activations at a time, not the whole frame's. At 5B on one GPU with 8-bit
    # AdamW: peak 36.5 instead of 41.4 GiB, step +27.6% instead of +7.0% (benchmarks/real_scale/h200x1/).
    identity_vae_tiling: bool = False
    # The identity loss counts only samples with timestep below this (ours; the paper gives none): near
    # t = 1000 the x0 estimate is mostly noise. Its crops are ArcFace-aligned from cached 5-point landmarks.
    identity_max_timestep: int = 500
    # Training timesteps: "uniform" over the schedule (CogVideoX's and the paper's), or diffusers'
    # compute_density_for_timestep_sampling schemes "logit_normal" (sigmoid of N(logit_mean, logit_std))
    # and "mode" (mode_scale). The tiny profile draws high-noise timesteps, where only the face tells
    # identities that share a caption apart (README, "The identity-reliance probe").
    timestep_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29


@dataclass
class OptimConfig:
    # "adamw": torch's AdamW (fp32 states, 8 bytes per trainable parameter); "adamw8bit": torchao's AdamW8bit
    # (block-wise 8-bit states, 2 bytes per parameter; needs torchao installed)
    name: str = "adamw"
    weight_decay: float = 1e-2
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    lr_schedule: str = "cosine"  # "cosine" | "linear" | "constant"
    min_lr_ratio: float = 0.1
    gradient_clip_val: float = 1.0


@dataclass
class EmaConfig:
    """Exponential moving average of the trainable weights (Lightning's EMAWeightAveraging, mm_lightning/ema.py).
    Checkpoints keep it beside the raw weights; evaluation and `generate` use it (`generate --raw-weights`)."""

    enabled: bool = False
    decay: float = 0.999  # ema = decay * ema + (1 - decay) * weights, per update
    start_step: int = 0  # optimiser step of each stage at which the EMA starts, as a copy of the weights then
    update_every_n_steps: int = 1


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    devices: str = "auto"
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | fsdp | deepspeed_stage_2 | deepspeed_stage_3
    precision: str = "32-true"  # "bf16-mixed" | "bf16-true" | "32-true"
    # dtype of the frozen modules (backbone, CLIP, T5, VAE, ArcFace); trainable ones keep fp32
    # master weights. "auto": bfloat16 when precision is bf16-*, else float32.
    frozen_dtype: str = "auto"  # "auto" | "bfloat16" | "float32"
    gradient_checkpointing: bool = False
    # `fit` only: torch.compile each transformer block (static shapes). On GPUs before torch 2.14, whose compiled
    # backward gave the adapter wrong gradients, only where the adapter's Triton kernels compute those
    # (strategies.refuse_compiled_training_on_cuda).
    compile_blocks: bool = False
    log_every_n_steps: int = 1
    deterministic: bool = False
    checkpoint_every_n_steps: int = 50
    keep_checkpoints: int = 2  # newest step=N.ckpt files kept per stage: a corrupt one leaves the previous


@dataclass
class DataConfig:
    root: str | None = None  # None: the built-in demo dataset
    num_workers: int = 0
    fps: float = 8.0
    use_cache: bool = True  # use precomputed VAE latents / T5 embeddings when present
    # Pairs built by `prepare`: a reference is kept when pair_min_cosine < cos(target, reference)
    # < pair_max_cosine (identity embeddings). 0.65 is the paper's value; the upper bound drops
    # near-duplicates (the same shot or photo again), whose pairs teach copy-paste.
    pair_min_cosine: float = 0.65
    pair_max_cosine: float = 0.995


@dataclass
class PrepareConfig:
    """`prepare`: raw clips and photos -> metadata.jsonl (mm_lightning/data/prepare/)."""

    num_workers: int = 0  # processes over input files; 0: one per CPU core; 1: in this process
    scene_threshold: float = 27.0  # PySceneDetect ContentDetector threshold (its default): higher, fewer cuts
    min_shot_frames: int = 8  # PySceneDetect min_scene_len: cuts closer than this many frames are ignored
    max_clips_per_shot: int = 0  # consecutive clips cut from one shot; 0: as many as fit
    min_brightness: float = 30.0  # mean luma (0-255) of a clip's sampled frames; below: "dark"
    # Variance of the Laplacian of the grey face crop resized to 112 px wide (scale-free); below: "blurry"
    min_sharpness: float = 20.0
    # Static filter: VBench's dynamic rule (evaluation/dynamic_degree.py, eval.flow) with its flow
    # threshold scaled by this. 1.0 keeps only clips VBench calls dynamic; 0.25 drops near-still ones.
    motion_scale: float = 0.25
    face_frames: int = 4  # frames per clip, spread evenly, where faces are detected
    detect_max_side: int | None = 960  # frames shrunk to this longest side for detection (cost); None: full size
    min_face_size: int = 64  # pixels, shorter side of the dominant face box; smaller: "small_face"
    # A frame's largest face is dominant when no other face reaches this fraction of its area.
    max_second_face: float = 0.25
    min_face_presence: float = 0.75  # share of a clip's sampled frames with a dominant face
    # Identity grouping: average-linkage clusters whose members agree above this cosine.
    # None: 0.92 for dlib's 128-d embedding (different people often score 0.85-0.9), 0.4 for ArcFace.
    identity_min_cosine: float | None = None
    max_references: int = 3  # references per row, the most similar ones inside the pair bounds
    captioner: str | None = None  # local folder of a transformers image-text-to-text model; None: no captioner
    caption_prompt: str = "Describe the person and what they are doing in one short sentence."
    mlflow: bool = True  # log the report and plots as an MLflow run (experiment "prepare")


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
    # Classifier-free guidance: what the unconditional branch keeps of the face (the paper does not say; ours).
    # Its prompt has no identity tokens, so x_id is never fused into it.
    guidance_uncond_face: bool = True  # it reads x_face too (cross-attention, face keys in the joint attention)
    guidance_uncond_id: bool = True  # it gets CAN's x_id-conditioned residual too
    vae_slicing: bool = True
    vae_tiling: bool = True
    # `generate` only: torch.compile each transformer block (static shapes). The first denoising step pays the
    # compilation (one graph per block class); evaluation inside `fit` follows trainer.compile_blocks instead.
    compile_blocks: bool = False


@dataclass
class EvalConfig:
    enabled: bool = True
    every_n_steps: int = 0  # 0: only at the end of each stage
    eval_set: str | None = None  # YAML of identities + prompts; None: the built-in demo set
    max_videos: int = 0  # 0: all identity x prompt pairs
    frames_sampled: int = 16  # frames per video for the face metrics
    flow: str = "dis"  # dynamic-degree flow: dis | farneback | raft (benchmarks/flow_displacement.md)
    flow_weights: str | None = None  # local RAFT state-dict file for flow=raft (torchvision's raft_large)
    flow_max_side: int | None = None  # flow on frames shrunk to this longest side; None: full size, as VBench
    fm_reduction: str = "sum"  # FM distance over the 5 landmarks: sum | mean
    clip_path: str | None = None  # local CLIP for text alignment; None: metric left out
    inception_weights: str | None = None  # torch-fidelity Inception-v3 weights file (inception score); None: left out
    # ID similarity of a frame without a face: None (default) leaves it out of the video's mean (a video
    # with no face has no value); 0.0 is the "zero" policy. Missed frames are counted either way.
    no_face_similarity: float | None = None
    # Identity-reliance probe (mm_lightning/reliance.py): runs at every evaluation and every N training steps.
    reliance_every_n_steps: int = 250  # 0: only at evaluations
    reliance_identities: int = 8  # eval identities in the probe batch (one sample each); 0: all of them
    reliance_timesteps: int = 4  # fixed timesteps, spread evenly over the schedule
    reliance_seed: int = 0  # seeds the probe's noise; the same for every run, so seeds compare
    reliance_max_batch: int = 8  # (timestep, sample) pairs per forward pass


@dataclass
class TrackingConfig:
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db
    experiment_name: str = "mm_lightning"


@dataclass
class LauncherConfig:
    """How `ablate` submits its (variant, seed) jobs through submitit (`--launcher local|slurm`)."""

    folder: str = "runs/ablate"  # submitit's job files and logs, one subfolder per matrix
    timeout_min: int = 4320  # wall time per job (SLURM --time); local jobs are stopped after it too
    max_requeues: int = 3  # preemptions/timeouts a job may be requeued after
    partition: str | None = None  # SLURM --partition
    account: str | None = None  # SLURM --account
    nodes: int = 1  # SLURM --nodes per job (fit gets trainer.num_nodes to match)
    gpus_per_node: int = 0  # SLURM --gpus-per-node, one task per GPU (fit gets trainer.devices); 0: one CPU task
    cpus_per_task: int | None = None  # SLURM --cpus-per-task
    signal_delay_s: int = 120  # USR2 this long before the time limit: fit checkpoints and the job requeues
    sbatch_flags: dict[str, Any] = field(
        default_factory=dict
    )  # extra #SBATCH lines, e.g. {qos: high, constraint: h100}
    setup: list[str] = field(default_factory=list)  # shell lines run before each job, e.g. ["module load cuda"]


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
    ema: EmaConfig = field(default_factory=EmaConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)


def _yaml_names(folder: Traversable) -> list[str]:
    return sorted(f.name[: -len(".yaml")] for f in folder.iterdir() if f.name.endswith(".yaml"))


def list_experiments() -> list[str]:
    """The built-in experiments: experiments/*.yaml except base.yaml."""
    return [name for name in _yaml_names(EXPERIMENTS_DIR) if name != "base"]


def list_profiles() -> list[str]:
    return _yaml_names(PROFILES_DIR)


def _resolve_yaml(value: str, kind: str, folder: Traversable, names: list[str]) -> tuple[str, Traversable]:
    """(name, file) for --experiment/--profile: a built-in name, or a .yaml path anywhere, named by its stem."""
    if value.endswith((".yaml", ".yml")):
        path = Path(value).expanduser()
        if not path.is_file():
            raise ConfigError(f"{kind} file {value} not found")
        return path.stem, path
    if value not in names:
        raise ConfigError(f"unknown {kind} {value!r}; choose one of: {', '.join(names)}, or a path to a .yaml file")
    return value, folder / f"{value}.yaml"


def load_config(experiment: str, profile: str = "tiny", overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """schema <- base.yaml <- profile <- experiment <- overrides, validated. `experiment` and `profile`
    are built-in names or paths to .yaml files; a file's stem becomes the config's name."""
    experiment, experiment_file = _resolve_yaml(experiment, "experiment", EXPERIMENTS_DIR, list_experiments())
    profile, profile_file = _resolve_yaml(profile, "profile", PROFILES_DIR, list_profiles())
    layers = [_load_yaml(EXPERIMENTS_DIR / "base.yaml"), _load_yaml(profile_file), _load_yaml(experiment_file)]
    layers.append((None, OmegaConf.create({"experiment": experiment, "profile": profile})))
    return _merge(OmegaConf.structured(Config), layers, overrides)


def config_from_checkpoint(checkpoint: dict, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The resolved config a checkpoint was trained with (MagicMirrorModule stores it), plus overrides."""
    if "mm_config" not in checkpoint:
        raise ConfigError("this checkpoint was not written by mm_lightning (no 'mm_config' in it)")
    return _merge(OmegaConf.structured(Config), [(None, OmegaConf.create(checkpoint["mm_config"]))], overrides)


def _load_yaml(file: Traversable) -> tuple[Traversable, DictConfig]:
    """(file, its layer). A YAML syntax error names the file and line."""
    try:
        layer = OmegaConf.create(file.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{file}, line {mark.line + 1}" if mark is not None else str(file)
        raise ConfigError(f"{where}: not valid YAML: {getattr(err, 'problem', None) or err}") from None
    if not isinstance(layer, DictConfig):
        raise ConfigError(f"{file}: expected a mapping of config keys (key: value), got a list")
    return file, layer


def _key_line(file: Traversable, dotted_key: str) -> int | None:
    """1-based line of a dotted key in a YAML file (omegaconf keeps no positions), None if not found."""
    node, line = yaml.compose(file.read_text()), None
    for part in dotted_key.split("."):
        if not isinstance(node, yaml.MappingNode):
            break
        match = next(((key, value) for key, value in node.value if key.value == part), None)
        if match is None:
            break
        line, node = match[0].start_mark.line + 1, match[1]
    return line


def _merge(cfg: DictConfig, layers: list[tuple[Traversable | None, DictConfig]], overrides) -> DictConfig:
    """Merge (file or None, layer) pairs, then the overrides; an error in a file's layer names the file and line."""
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override {override!r} is not key=value")
        layers.append((None, OmegaConf.from_dotlist([override])))
    for file, layer in layers:
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except (ConfigKeyError, ConfigAttributeError) as err:
            raise ConfigError(_where(file, err) + _unknown_key_message(cfg, err)) from None
        except ValidationError as err:
            msg = err.msg.splitlines()[0]  # omegaconf appends full_key/reference_type lines
            raise ConfigError(f"{_where(file, err)}invalid value: {msg} (key {err.full_key})") from None
    validate(cfg)
    return cfg


def _where(file: Traversable | None, err: Exception) -> str:
    if file is None:
        return ""
    line = _key_line(file, getattr(err, "full_key", "") or "")
    return f"{file}, line {line}: " if line is not None else f"{file}: "


def _unknown_key_message(cfg: DictConfig, err: Exception) -> str:
    full_key = getattr(err, "full_key", "") or ""
    parent_key, _, key = full_key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    valid = ", ".join(sorted(parent.keys())) if isinstance(parent, DictConfig) else "?"
    return f"unknown config key {full_key!r}; valid keys under {parent_key or 'the top level'}: {valid}"


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
