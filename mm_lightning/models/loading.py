"""Builds every model of a profile from local folders; nothing is fetched from a hub.

Both profiles go through `load_components`: the cogvideox-5b profile points at real
diffusers/transformers folders, the tiny profile at small random-init models that
`write_random_weights` saved once with `save_pretrained` into the cache.
"""

from __future__ import annotations

import fcntl
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXDPMScheduler, CogVideoXTransformer3DModel
from omegaconf import DictConfig, OmegaConf
from transformers import (
    AutoTokenizer,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModel,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from mm_lightning.models.face_encoder import CLIP_MEAN, CLIP_STD, DualBranchFaceEncoder
from mm_lightning.models.magicmirror import MagicMirrorTransformer
from mm_lightning.models.photomaker_id_encoder import load_photomaker_v2

ID_EMBED_DIMS = {"dlib": 128, "insightface": 512}

# component -> (files the folder must hold, where the folder comes from)
WEIGHT_SOURCES = {
    "transformer": (
        "config.json + diffusion_pytorch_model*.safetensors",
        "the transformer/ folder of a diffusers CogVideoX snapshot (e.g. THUDM/CogVideoX-5b)",
    ),
    "vae": ("config.json + diffusion_pytorch_model*.safetensors", "the vae/ folder of the same CogVideoX snapshot"),
    "text_encoder": (
        "config.json + model*.safetensors",
        "the text_encoder/ folder (T5 v1.1 XXL encoder) of the same snapshot",
    ),
    "tokenizer": (
        "tokenizer_config.json + spiece.model or tokenizer.json",
        "the tokenizer/ folder of the same snapshot",
    ),
    "scheduler": ("scheduler_config.json", "the scheduler/ folder of the same snapshot"),
    "image_encoder": (
        "config.json + model.safetensors + preprocessor_config.json",
        "a CLIP ViT-L/14 vision model (e.g. openai/clip-vit-large-patch14, or PhotoMaker-V2's image encoder)",
    ),
}
CONFIG_FILES = {"scheduler": "scheduler_config.json", "tokenizer": "tokenizer_config.json"}


class MissingWeightsError(FileNotFoundError):
    pass


@dataclass
class Components:
    tokenizer: object
    text_encoder: T5EncoderModel
    vae: AutoencoderKLCogVideoX
    scheduler: CogVideoXDPMScheduler
    transformer: MagicMirrorTransformer


def check_weight_paths(weights: DictConfig) -> None:
    """Raises one error naming every missing folder, the files it needs and where they come from."""
    missing = []
    for name, (files, origin) in WEIGHT_SOURCES.items():
        path = Path(weights[name])
        if not (path / CONFIG_FILES.get(name, "config.json")).is_file():
            missing.append(f"  weights.{name}: {path}\n    needs {files}\n    from {origin}")
    if missing:
        raise MissingWeightsError(
            "model weights not found (set the paths in the profile or as weights.<name>=PATH):\n" + "\n".join(missing)
        )


def write_random_weights(
    cfg: DictConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> None:
    """Save random-init models (fixed seed) of cfg.architecture where cfg.weights expects them.

    The tiny profile calls it on first use; `snapshot` calls it for a full-size random
    CogVideoX-5B (init on `device`, saved in `dtype`). Written into a temporary folder and
    renamed, under a file lock, so that concurrent processes (DDP ranks, parallel tests)
    never see half-written weights. The tokenizer is always the small word-list one."""
    weights, arch = cfg.weights, cfg.architecture
    targets = {name: Path(weights[name]) for name in WEIGHT_SOURCES}
    lock_path = Path(weights.transformer).parent / ".write.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            check_weight_paths(weights)
            return
        except MissingWeightsError:
            pass
        # Seeded, in a forked random state: a first run that writes the weights must train exactly as a later
        # one that finds them, so the caller's random state is left as it was.
        with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
            torch.manual_seed(0)
            tokenizer = _tiny_tokenizer()
            t5_config = T5Config(**_plain(arch.text_encoder))
            assert len(tokenizer) <= t5_config.vocab_size, (
                "architecture.text_encoder.vocab_size is smaller than the tokenizer"
            )
            builders = {  # built one at a time: at 5B scale they don't all need to be in memory at once
                "transformer": lambda: CogVideoXTransformer3DModel.from_config(_plain(arch.transformer)),
                "vae": lambda: near_deterministic_posterior(AutoencoderKLCogVideoX.from_config(_plain(arch.vae))),
                "text_encoder": lambda: T5EncoderModel(t5_config),
                "tokenizer": lambda: tokenizer,
                "scheduler": lambda: CogVideoXDPMScheduler.from_config(_plain(arch.scheduler)),
                "image_encoder": lambda: CLIPVisionModel(CLIPVisionConfig(**_plain(arch.image_encoder))),
            }
            for name, build in builders.items():
                tmp = targets[name].with_name(targets[name].name + ".tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                with torch.device(device):
                    model = build()
                if isinstance(model, torch.nn.Module):
                    model.to(dtype)
                model.save_pretrained(tmp)
                del model
                if name == "image_encoder":
                    size = arch.image_encoder.image_size
                    CLIPImageProcessorPil(
                        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
                    ).save_pretrained(tmp)
                shutil.rmtree(targets[name], ignore_errors=True)
                tmp.rename(targets[name])


def near_deterministic_posterior(vae: AutoencoderKLCogVideoX) -> AutoencoderKLCogVideoX:
    """Random VAE weights whose posterior is as sharp as a trained VAE's.

    At random init the log-variance half of the encoder's output gives a posterior std of about 1,
    three times the spread of its means (tiny profile: 1.03 against 0.33), so every training target
    would be mostly fresh sampling noise and the loss would hide what the model learns. Here the
    log-variance starts at -10 whatever the input (std 0.007); the means stay random."""
    conv = vae.encoder.conv_out.conv  # [2 * latent_channels] outputs: means, then log-variances
    half = conv.out_channels // 2
    with torch.no_grad():
        conv.weight[half:] = 0
        conv.bias[half:] = -10.0
    return vae


def _tiny_tokenizer() -> T5Tokenizer:
    """A T5 (Unigram) tokenizer over a small word list plus single letters, so any prompt tokenizes."""
    words = (
        "a an the of in on at with and is are his her their while to from by for "
        "man woman boy girl person baby child lady guy elderly old young astronaut portrait photo "
        "smiling walking talking looking running dancing reading laughing turning sitting standing "
        "park street beach city room garden office stage studio forest sunny night light camera "
        # the demo dataset's and demo eval set's captions
        "book cozy library close-up soft drinking coffee busy cafe wearing scarf snow out train window "
        "bright along sunset friends picnic around crowded market nodding during video call home"
    ).split()
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(f"▁{w}", -5.0) for w in words]
    vocab += [(c, -10.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789.,'-"]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def _plain(node) -> dict:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)


def frozen_dtype(cfg: DictConfig) -> torch.dtype:
    """The dtype of the frozen modules: `trainer.frozen_dtype`, or under "auto" bf16 with bf16 precision.

    Except under FSDP: a sharded unit (a CogVideoX block with its adapter) must hold one dtype,
    so FSDP keeps the frozen weights fp32 and shards them instead (bf16 compute via autocast)."""
    name = cfg.trainer.frozen_dtype
    if name == "auto":
        bf16 = str(cfg.trainer.precision).startswith("bf16") and cfg.trainer.strategy != "fsdp"
        name = "bfloat16" if bf16 else "float32"
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def load_components(
    cfg: DictConfig, torch_dtype: torch.dtype | None = None, text_encoder: bool = True, vae: bool = True
) -> Components:
    """Tokenizer, T5, VAE, scheduler and the adapted transformer (backbone + CLIP) from cfg.weights.

    Frozen modules (backbone, CLIP, T5, VAE) load in `torch_dtype` (default: `frozen_dtype(cfg)`);
    the new MagicMirror modules stay fp32, the master weights that bf16 autocast computes with.
    `text_encoder=False` / `vae=False` leave T5 / the VAE out (None) when caches make them unneeded."""
    if cfg.weights.create_random:
        write_random_weights(cfg)
    check_weight_paths(cfg.weights)
    dtype = frozen_dtype(cfg) if torch_dtype is None else torch_dtype
    w = cfg.weights
    local = {"local_files_only": True, "torch_dtype": dtype}
    base = CogVideoXTransformer3DModel.from_pretrained(w.transformer, **local)
    clip = CLIPVisionModel.from_pretrained(w.image_encoder, **local)
    mean, std = _clip_normalisation(Path(w.image_encoder))
    transformer = build_magicmirror(cfg, base, clip, mean, std)
    if w.photomaker_v2 and transformer.face_encoder.id_perceiver is not None:
        load_photomaker_v2(transformer.face_encoder.id_perceiver, clip, w.photomaker_v2)
    apply_dtype_policy(transformer, dtype)
    return Components(
        tokenizer=AutoTokenizer.from_pretrained(w.tokenizer, local_files_only=True),
        text_encoder=(
            T5EncoderModel.from_pretrained(w.text_encoder, **local).requires_grad_(False) if text_encoder else None
        ),
        vae=AutoencoderKLCogVideoX.from_pretrained(w.vae, **local).requires_grad_(False) if vae else None,
        scheduler=CogVideoXDPMScheduler.from_pretrained(w.scheduler, local_files_only=True),
        transformer=transformer,
    )


def apply_dtype_policy(module: torch.nn.Module, frozen: torch.dtype) -> torch.nn.Module:
    """Frozen submodules in `frozen`, trainable ones in fp32 (master weights), top-down.

    A submodule that mixes frozen and trainable parameters is split further; casting whole
    submodules (not single tensors) keeps each one's buffers in its parameters' dtype."""
    params = list(module.parameters())
    if params and not any(p.requires_grad for p in params):
        return module.to(frozen)
    if params and all(p.requires_grad for p in params):
        return module.to(torch.float32)
    for child in module.children():
        apply_dtype_policy(child, frozen)
    return module


def _clip_normalisation(folder: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    config_file = folder / "preprocessor_config.json"
    if not config_file.is_file():
        return CLIP_MEAN, CLIP_STD
    config = json.loads(config_file.read_text())
    return tuple(config.get("image_mean", CLIP_MEAN)), tuple(config.get("image_std", CLIP_STD))


def build_magicmirror(
    cfg: DictConfig, base: CogVideoXTransformer3DModel, clip: CLIPVisionModel, clip_mean=CLIP_MEAN, clip_std=CLIP_STD
) -> MagicMirrorTransformer:
    """Wraps a loaded (or freshly built) backbone and CLIP with the variant's MagicMirror modules."""
    m = cfg.model
    inner_dim = base.config.num_attention_heads * base.config.attention_head_dim
    encoder = DualBranchFaceEncoder(
        clip,
        branches=list(m.branches),
        id_embed_dim=ID_EMBED_DIMS[cfg.faces.backend],
        text_dim=base.config.text_embed_dim,
        inner_dim=inner_dim,
        num_id_tokens=m.num_id_tokens,
        num_face_tokens=m.num_face_tokens,
        perceiver_dim=m.perceiver_dim,
        perceiver_depth=m.perceiver_depth,
        perceiver_heads=m.perceiver_heads,
        id_encoder_dim=m.id_encoder_dim,
        id_encoder_depth=m.id_encoder_depth,
        id_encoder_head_dim=m.id_encoder_head_dim,
        freeze_id_perceiver=m.freeze_id_perceiver,
        clip_mean=clip_mean,
        clip_std=clip_std,
    )
    if not m.train_face_encoder:
        encoder.freeze_perceivers()
    return MagicMirrorTransformer(
        base,
        encoder,
        list(m.branches),
        m.face_modality,
        m.can,
        m.can_hidden_dim,
        face_attention=m.face_attention,
        train_backbone=m.train_backbone,
    )


def build_from_architecture(cfg: DictConfig, device: str | torch.device = "meta") -> dict[str, torch.nn.Module]:
    """Every model of the profile from cfg.architecture, without weights.

    On the meta device this costs no memory (describe), on a GPU it gives random-init
    models of the real size (bench)."""
    arch = cfg.architecture
    with torch.device(device):
        base = CogVideoXTransformer3DModel.from_config(_plain(arch.transformer))
        clip = CLIPVisionModel(CLIPVisionConfig(**_plain(arch.image_encoder)))
        models = {
            "transformer": build_magicmirror(cfg, base, clip),
            "text_encoder": T5EncoderModel(T5Config(**_plain(arch.text_encoder))),
            "vae": AutoencoderKLCogVideoX.from_config(_plain(arch.vae)),
        }
    return models


def sampling_scheduler(name: str, scheduler_config) -> CogVideoXDPMScheduler | CogVideoXDDIMScheduler:
    cls = {"dpm": CogVideoXDPMScheduler, "ddim": CogVideoXDDIMScheduler}[name]
    return cls.from_config(scheduler_config)
