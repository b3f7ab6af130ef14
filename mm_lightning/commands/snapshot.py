"""python -m mm_lightning snapshot --out DIR [--profile cogvideox-5b] [--device cuda] [--samples N]

Writes a random-weights snapshot of a profile's architecture in the layouts the real weights
come in, so the real loading path (`fit`, `generate`, `bench`) runs on a machine without them:
  DIR/{transformer,vae,text_encoder,tokenizer,scheduler}/  diffusers CogVideoX layout (T5-XXL encoder)
  DIR/clip-vision/                                          CLIPVisionModel + preprocessor_config.json
  DIR/arcface.onnx                                          [N,3,112,112] -> [N,512], ArcFace-shaped
  DIR/data/ (--samples N)                                   a synthetic latent cache for every stage
The tokenizer is the tiny profile's word-list T5 tokenizer (the real spiece.model is not
random-initialisable); the ONNX is a small conv net with ArcFace's input/output shapes, not
an iResNet-100; neither changes the shapes or the code path of training.
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
    from mm_lightning.models.loading import write_random_weights

    out = Path(args.out).resolve()
    cfg = snapshot_config(args.experiment, args.profile, out, args.overrides)
    timings = {}
    start = time.perf_counter()
    write_random_weights(cfg, device=args.device, dtype=getattr(torch, args.dtype))
    write_arcface_onnx(out / "arcface.onnx")
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
    """The config a snapshot is used with: its weight folders, its synthetic data, no detector-based eval."""
    names = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
    return [f"weights.{name}={out / name}" for name in names] + [
        f"weights.image_encoder={out / 'clip-vision'}",
        f"data.root={out / 'data'}",
    ]


def snapshot_config(experiment: str, profile: str, out: Path, overrides=()):
    from mm_lightning.config import load_config

    return load_config(experiment, profile, [*snapshot_overrides(out), "weights.create_random=false", *overrides])


def write_arcface_onnx(path: Path) -> None:
    """A small random conv net with ArcFace's interface ([N,3,112,112] -> [N,512]) as ONNX.

    Built with onnx.helper: stride-2 3x3 convs with ReLU (112 -> 7), global pooling, a Gemm to 512."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, x, cin = [], [], "input.1", 3
    for i, cout in enumerate((64, 128, 256, 512)):
        w = rng.normal(0, (2 / (9 * cin)) ** 0.5, (cout, cin, 3, 3)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        conv = helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
        nodes += [conv, helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        x, cin = f"r{i}", cout
    inits += [
        numpy_helper.from_array(rng.normal(0, 0.03, (512, cin)).astype(np.float32), "fc"),
        numpy_helper.from_array(np.zeros(512, np.float32), "fc_b"),
    ]
    nodes += [
        helper.make_node("GlobalAveragePool", [x], ["pool"]),
        helper.make_node("Flatten", ["pool"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc", "fc_b"], ["683"], transB=1),
    ]
    inputs = [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [None, 3, 112, 112])]
    outputs = [helper.make_tensor_value_info("683", TensorProto.FLOAT, [None, 512])]
    graph = helper.make_graph(nodes, "arcface_shaped", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


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
