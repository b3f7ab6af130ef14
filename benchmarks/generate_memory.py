"""Peak GPU memory and time of `generate`'s memory modes for one video (issue 17).

    python benchmarks/generate_memory.py --snapshot DIR --offload none|model|sequential [--int8]
        [--profile cogvideox-5b] [--name NAME] [key=value ...]

DIR is written by `python -m mm_lightning snapshot` (random weights of the profile). Run one mode per
process: the peak statistics and accelerate's offload hooks are per process. The path is generate's:
the whole module in bf16 as `MagicMirrorModule.from_checkpoint` casts it (random adapters instead of a
checkpoint's), diffusers' pipeline over it, then --int8 (torchao) and --offload (diffusers), then
`sample_video` with the profile's sampling settings (49x480x720, 50 steps, CFG 6 on cogvideox-5b; VAE
slicing and tiling per sampling.vae_slicing / sampling.vae_tiling). Timed from the models on the CPU (as
generate has them after loading): with --offload none T5 comes to the GPU alone to encode the prompts, then
the transformer and the VAE come, as in generate. Writes benchmarks/<name>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch

from mm_lightning.commands.snapshot import snapshot_config
from mm_lightning.memory import gib
from mm_lightning.module import MagicMirrorModule
from mm_lightning.pipeline import encode_prompts_then_load, offload, quantize_int8, sample_video


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--snapshot", required=True)
    parser.add_argument("--profile", default="cogvideox-5b")
    parser.add_argument("--offload", default="none", choices=["none", "model", "sequential"])
    parser.add_argument("--int8", action="store_true")
    parser.add_argument(
        "--name",
        default=None,
        help="default: generate_<profile>_<offload>; with --int8 _int8 (--offload none: _int8 alone)",
    )
    parser.add_argument("--out-dir", default="benchmarks")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = snapshot_config(
        "full",
        args.profile,
        Path(args.snapshot).resolve(),
        ["eval.enabled=false", "loss.identity_weight=0", *args.overrides],
    )
    module = MagicMirrorModule(cfg, stage=cfg.curriculum.order[-1]).to(dtype=torch.bfloat16).eval()
    pipe = module.sampling_pipeline()
    size = module.transformer.face_encoder.clip_image_size
    ref, ids = torch.rand(1, 3, size, size), torch.nn.functional.normalize(torch.randn(512), dim=0)
    prompt = "a man walking in a park"
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()  # from the models on the CPU, as generate has them after loading
    embeds = encode_prompts_then_load(pipe, cfg, prompt) if args.offload == "none" else None
    if args.int8:
        quantize_int8(pipe, text_encoder=embeds is None)
    offload(pipe, args.offload)
    frames = sample_video(pipe, cfg, prompt, ref, ids, seed=0, prompt_embeds=embeds)
    torch.cuda.synchronize()
    s = cfg.sampling
    report = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "profile": args.profile,
        "offload": args.offload,
        "int8": args.int8,
        "seconds": round(time.perf_counter() - start, 1),
        "peak_allocated_gib": round(gib(torch.cuda.max_memory_allocated()), 2),
        "peak_reserved_gib": round(gib(torch.cuda.max_memory_reserved()), 2),
        "frames": list(frames.shape),
        "settings": {
            "steps": s.num_inference_steps,
            "guidance_scale": s.guidance_scale,
            "scheduler": s.scheduler,
            "vae_slicing": s.vae_slicing,
            "vae_tiling": s.vae_tiling,
            "overrides": args.overrides,
        },
    }
    print(json.dumps(report, indent=2), flush=True)
    mode = args.offload if not args.int8 else ("int8" if args.offload == "none" else f"{args.offload}_int8")
    name = args.name or f"generate_{args.profile}_{mode}"
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.out_dir) / f"{name}.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
