"""python -m mm_lightning snapshot --out DIR [--profile cogvideox-5b] [--device cuda] [--samples N]

Writes a random-weights snapshot of a profile's architecture in the layouts the real weights
come in, so the real loading path (`fit`, `generate`, `bench`) runs on a machine without them:
  DIR/{transformer,vae,text_encoder,tokenizer,scheduler}/  diffusers CogVideoX layout (T5-XXL encoder)
  DIR/clip-vision/                                          CLIPVisionModel + preprocessor_config.json
  DIR/insightface/models/antelopev2/                        stand-in SCRFD detector + ArcFace-shaped recogniser
  DIR/data/ (--samples N)                                   a synthetic latent cache for every stage
The tokenizer is the tiny profile's word-list T5 tokenizer (the real spiece.model is not
random-initialisable). The insightface pack holds faces/stand_ins.py's ONNX models: a detector
that reports every bright 32x32 cell as a face and a pooled linear ArcFace ([N,3,112,112] ->
[N,512]), not SCRFD-10G and iResNet-100. They keep the shapes and the code path of training, the
identity loss and evaluation (whose face metrics then mean nothing).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from mm_lightning.commands.common import add_experiment_arguments


def add_arguments(parser):
    add_experiment_arguments(parser)
    parser.set_defaults(profile="cogvideox-5b")
    parser.add_argument("--out", required=True, help="folder to write the snapshot into")
    parser.add_argument("--device", default="cpu", help="where the random init runs (cuda: ~10x faster at 5B)")
    parser.add_argument(
        "--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="dtype of the saved weights"
    )
    parser.add_argument(
        "--samples", type=int, default=0, help="also write a synthetic latent cache of N samples per stage"
    )


def run(args) -> int:
    from mm_lightning.faces.stand_ins import write_insightface_pack
    from mm_lightning.models.loading import write_random_weights

    out = Path(args.out).resolve()
    cfg = snapshot_config(args.experiment, args.profile, out, args.overrides)
    timings = {}
    start = time.perf_counter()
    write_random_weights(cfg, device=args.device, dtype=getattr(torch, args.dtype))
    write_insightface_pack(out / "insightface", cfg.faces.insightface_model)
    timings["weights_s"] = round(time.perf_counter() - start, 1)
    if args.samples:
        start = time.perf_counter()
        for stage in cfg.curriculum.order:
            write_synthetic_cache(cfg, stage, args.samples)
        timings["cache_s"] = round(time.perf_counter() - start, 1)
    sizes = {p.name: round(_size(p) / 2**30, 2) for p in sorted(out.iterdir()) if p.name != ".write.lock"}
    print(json.dumps({"out": str(out), "dtype": args.dtype, "device": args.device, **timings, "GiB": sizes}, indent=2))
    print(f"use it with:\n  python -m mm_lightning fit --profile {args.profile} " + " ".join(snapshot_overrides(out)))
    return 0


def snapshot_overrides(out: Path) -> list[str]:
    """The config a snapshot is used with: its weight folders, its insightface pack, its synthetic data."""
    names = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
    return [f"weights.{name}={out / name}" for name in names] + [
        f"weights.image_encoder={out / 'clip-vision'}",
        f"faces.insightface_root={out / 'insightface'}",
        f"data.root={out / 'data'}",
    ]


def snapshot_config(experiment: str, profile: str, out: Path, overrides=()):
    from mm_lightning.config import load_config

    return load_config(experiment, profile, [*snapshot_overrides(out), "weights.create_random=false", *overrides])


def write_synthetic_cache(cfg, stage: str, samples: int) -> Path:
    """A latent cache (the `cache` command's format) of random tensors with the stage's shapes.

    The index carries today's cache settings, so `fit` takes it as built by `cache`."""
    from safetensors.torch import save_file

    from mm_lightning.data.latent_cache import cache_dir, cache_settings
    from mm_lightning.models.loading import frozen_dtype

    root = Path(cfg.data.root)
    root.mkdir(parents=True, exist_ok=True)
    metadata = root / "metadata.jsonl"
    if not metadata.exists():
        metadata.write_text("")  # no media: every sample lives in the cache
    s, arch = cfg.curriculum.stages[stage], cfg.architecture
    t, vae = arch.transformer, arch.vae
    latent_frames = (s.frames - 1) // t.temporal_compression_ratio + 1
    scale = 2 ** (len(vae.get("block_out_channels", [128, 256, 256, 512])) - 1)  # diffusers' default VAE has 4 blocks
    clip_size = arch.image_encoder.image_size
    id_dim = 512 if cfg.faces.backend == "insightface" else 128
    folder = cache_dir(cfg, stage)
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    dtype = frozen_dtype(cfg)  # what T5 under this config's precision writes into a `cache`
    box = torch.tensor([0.35, 0.2, 0.65, 0.6])
    # eyes, nose, mouth corners inside the box, in training-frame pixels (the dataset's layout)
    landmarks = torch.tensor([[0.43, 0.35], [0.57, 0.35], [0.5, 0.43], [0.45, 0.52], [0.55, 0.52]])
    landmarks = landmarks * torch.tensor([float(s.width), float(s.height)])
    mask = torch.zeros(s.frames, 1, s.height, s.width)
    mask[..., int(0.2 * s.height) : int(0.6 * s.height), int(0.35 * s.width) : int(0.65 * s.width)] = 1
    for i in range(samples):
        save_file(
            {
                "latents": torch.randn(
                    latent_frames, t.in_channels, s.height // scale, s.width // scale, generator=generator
                ).to(dtype),
                "prompt_embeds": torch.randn(t.max_text_seq_length, t.text_embed_dim, generator=generator)
                .mul(0.1)
                .to(dtype),
                "ref_pixels": torch.rand(3, clip_size, clip_size, generator=generator),
                "id_embedding": torch.nn.functional.normalize(torch.randn(id_dim, generator=generator), dim=0),
                "face_mask": mask,
                "face_boxes": box.expand(s.frames, 4).contiguous(),
                "face_landmarks": landmarks.expand(s.frames, 5, 2).contiguous(),
            },
            folder / f"{i:06d}.safetensors",
        )
    captions = ["a man walking in a park" if i % 2 else "a woman reading a book" for i in range(samples)]
    index = {"settings": cache_settings(cfg, stage), "captions": captions, "skipped": {}}
    (folder / "index.json").write_text(json.dumps(index, indent=2))
    return folder


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
