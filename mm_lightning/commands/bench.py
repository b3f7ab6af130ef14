"""python -m mm_lightning bench --profile cogvideox-5b [--stage video|image] [--compile] [--batch-size N]

Times, in one process and on the same shapes, the adapted model (an experiment, default
`full`) and the bare frozen CogVideoX backbone, both random-init from the profile's
architecture (no weights needed):
  - a training step: forward + backward (base frozen, gradient checkpointing as configured);
  - one inference denoising step with classifier-free guidance (batch doubled, no grad).
It prints the median step time after warm-up, peak memory, achieved TFLOP/s and MFU against
a bf16 matmul peak measured in the same run, and the adapted/bare ratios; results go to
benchmarks/<profile>_<stage>[_compiled].{json,md}.

FLOPs are counted by torch.utils.flop_counter on one real step, so they include what the
step really runs: the recomputed forward under gradient checkpointing, and only the
input-gradient matmuls of frozen layers.
"""

from __future__ import annotations

import datetime
import json
import platform
import statistics
import time
from pathlib import Path

from .common import add_experiment_arguments, config_from_args


def add_arguments(parser):
    add_experiment_arguments(parser)
    parser.add_argument("--stage", choices=["video", "image"], default="video",
                        help="video: stage-2 shapes at batch 1; image: stage-1 shapes (1 frame) at batch 8")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 1 (video), 8 (image)")
    parser.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after warm-up (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out-dir", default="benchmarks")


def _timed(fn, steps: int, warmup: int) -> float:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak_tflops() -> float:
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    seconds = _timed(lambda: a @ b, steps=20, warmup=5)
    return 2 * 8192**3 / seconds / 1e12


def _count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _measure(name: str, train_step, infer_step, steps: int, warmup: int, peak: float) -> dict:
    import torch

    torch.cuda.reset_peak_memory_stats()
    train_s = _timed(train_step, steps, warmup)
    train_mem = torch.cuda.max_memory_allocated() / 2**30
    infer_s = _timed(infer_step, steps, warmup)
    train_flops, infer_flops = _count_flops(train_step), _count_flops(infer_step)
    row = {
        "model": name,
        "train_step_s": train_s,
        "train_peak_gib": train_mem,
        "train_tflops": train_flops / train_s / 1e12,
        "train_mfu": train_flops / train_s / 1e12 / peak,
        "infer_cfg_step_s": infer_s,
        "infer_tflops": infer_flops / infer_s / 1e12,
        "infer_mfu": infer_flops / infer_s / 1e12 / peak,
        "train_flops": train_flops,
        "infer_flops": infer_flops,
    }
    print(f"{name:>8}: train {train_s:.3f} s/step ({row['train_tflops']:.0f} TFLOP/s, MFU {row['train_mfu']:.1%}), "
          f"peak {train_mem:.1f} GiB; inference+CFG {infer_s:.3f} s/step (MFU {row['infer_mfu']:.1%})", flush=True)
    return row


def run(args) -> int:
    import diffusers
    import torch
    from diffusers import CogVideoXTransformer3DModel
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from ..models.loading import _plain, build_magicmirror

    if not torch.cuda.is_available():
        print("error: bench needs a CUDA GPU")
        return 2
    cfg = config_from_args(args)
    arch = cfg.architecture
    stage = cfg.curriculum.stages["video_finetune" if args.stage == "video" else "image_pretrain"]
    batch = args.batch_size or (1 if args.stage == "video" else 8)
    tconf = _plain(arch.transformer)
    frames = 1 if args.stage == "image" else (stage.frames - 1) // tconf["temporal_compression_ratio"] + 1
    h, w = stage.height // 8, stage.width // 8
    device, dtype = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    peak = matmul_peak_tflops()
    print(f"{torch.cuda.get_device_name()}: bf16 matmul peak {peak:.0f} TFLOP/s; latents [{batch}, {frames}, "
          f"{tconf['in_channels']}, {h}, {w}] + {tconf['max_text_seq_length']} text tokens", flush=True)

    def inputs(b):
        latents = torch.randn(b, frames, tconf["in_channels"], h, w, device=device, dtype=dtype)
        text = torch.randn(b, tconf["max_text_seq_length"], tconf["text_embed_dim"], device=device, dtype=dtype)
        t = torch.randint(0, 1000, (b,), device=device)
        return latents, text, t

    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    p = tconf["patch_size"]
    crops = get_resize_crop_region_for_grid((h // p, w // p), tconf["sample_width"] // p, tconf["sample_height"] // p)
    rotary = get_3d_rotary_pos_embed(tconf["attention_head_dim"], crops, (h // p, w // p), frames, device=device)

    def build_base():
        with torch.device(device):  # random init straight on the GPU
            return CogVideoXTransformer3DModel.from_config(tconf).to(dtype).requires_grad_(False)

    results = {}
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        # --- bare frozen backbone
        base = build_base()
        if cfg.trainer.gradient_checkpointing:
            base.enable_gradient_checkpointing()
        if args.compile:
            for block in base.transformer_blocks:
                block.compile()
        lat, text, t = inputs(batch)

        def bare_train():
            x = lat.clone().requires_grad_(True)  # frozen weights: backward runs the input gradients only
            base(x, text, t, image_rotary_emb=rotary, return_dict=False)[0].float().pow(2).mean().backward()

        lat2, text2, t2 = inputs(2 * batch)

        @torch.no_grad()
        def bare_infer():
            base(lat2, text2, t2, image_rotary_emb=rotary, return_dict=False)

        results["bare"] = _measure("bare", bare_train, bare_infer, args.steps, args.warmup, peak)
        del base
        torch.cuda.empty_cache()

        # --- adapted model: same backbone architecture + MagicMirror
        with torch.device(device):
            clip = CLIPVisionModel(CLIPVisionConfig(**_plain(arch.image_encoder))).to(dtype)
        with torch.device(device):
            model = build_magicmirror(cfg, build_base(), clip).to(dtype)
        model.gradient_checkpointing = cfg.trainer.gradient_checkpointing
        if args.compile:
            for block in model.base.transformer_blocks:
                block.compile()
        size = clip.config.image_size
        id_dim = model.face_encoder.id_query.in_features if model.face_encoder.id_query is not None else 512
        mask = torch.zeros(batch, tconf["max_text_seq_length"], device=device)
        mask[:, 2] = 1
        ref = torch.rand(batch, 3, size, size, device=device, dtype=dtype)
        ids = torch.randn(batch, id_dim, device=device, dtype=dtype)

        def adapted_train():
            x = lat.clone().requires_grad_(True)
            face = model.encode_face(ref, ids, mask)  # CLIP under no_grad inside; perceivers trained
            model(x, text, t, image_rotary_emb=rotary, face=face)[0].float().pow(2).mean().backward()
            model.zero_grad(set_to_none=True)

        @torch.no_grad()
        def adapted_infer():
            face = model.encode_face(ref, ids, mask).for_guidance()
            model(lat2, text2, t2, image_rotary_emb=rotary, face=face)

        results["adapted"] = _measure("adapted", adapted_train, adapted_infer, args.steps, args.warmup, peak)

    bare, adapted = results["bare"], results["adapted"]
    ratios = {"train_ratio": adapted["train_step_s"] / bare["train_step_s"],
              "infer_cfg_ratio": adapted["infer_cfg_step_s"] / bare["infer_cfg_step_s"]}
    print(f"adapted/bare: training step {ratios['train_ratio']:.3f}, inference step with CFG {ratios['infer_cfg_ratio']:.3f}")
    report = {
        "date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "diffusers": diffusers.__version__, "python": platform.python_version(), "experiment": cfg.experiment,
        "profile": cfg.profile, "stage": args.stage, "batch_size": batch, "compiled": args.compile,
        "gradient_checkpointing": cfg.trainer.gradient_checkpointing, "latents": [batch, frames, tconf["in_channels"], h, w],
        "matmul_peak_tflops": peak, **results, **ratios,
    }
    name = f"{cfg.profile}_{args.stage}_b{batch}{'_compiled' if args.compile else ''}"
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2))
    (out / f"{name}.md").write_text(_markdown(report))
    print(f"wrote {out / name}.json and .md")
    return 0


def _markdown(r: dict) -> str:
    lines = [f"# bench {r['profile']} {r['stage']} stage, batch {r['batch_size']}{', compiled' if r['compiled'] else ''}", "",
             f"{r['device']}, torch {r['torch']}, diffusers {r['diffusers']}, {r['date']}; latents {r['latents']}; "
             f"bf16 matmul peak {r['matmul_peak_tflops']:.0f} TFLOP/s", "",
             "| model | train step (s) | peak (GiB) | TFLOP/s | MFU | inference+CFG step (s) | MFU |", "|---|---|---|---|---|---|---|"]
    for key in ("bare", "adapted"):
        m = r[key]
        lines.append(f"| {key} | {m['train_step_s']:.3f} | {m['train_peak_gib']:.1f} | {m['train_tflops']:.0f} | "
                     f"{m['train_mfu']:.1%} | {m['infer_cfg_step_s']:.3f} | {m['infer_mfu']:.1%} |")
    lines += ["", f"adapted / bare: training step **{r['train_ratio']:.3f}**, inference step with CFG **{r['infer_cfg_ratio']:.3f}**", ""]
    return "\n".join(lines)
