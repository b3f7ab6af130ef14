"""`fit`'s own training step at real scale: peak memory per GPU and step time (issue 13).

    python benchmarks/fit_step.py --snapshot DIR [--stage video_finetune] [--steps 4] [--warmup 2]
        [--identity] [--sample] [--name NAME] [key=value ...]

DIR is written by `python -m mm_lightning snapshot --samples N` (random CogVideoX-5B weights and
a synthetic latent cache). The step is MagicMirrorModule's, under a Lightning Trainer set up as
`fit` sets it up (precision, strategy, devices, clipping, accumulation), with the dtype policy of
mm_lightning.models.loading and T5/VAE left out as `fit` leaves them out; only checkpointing and
logging are off. A callback synchronises the GPU around every optimizer step and reads the peak
allocated memory of each rank.

--identity turns the ArcFace identity loss on (λ = 0.05, the 5B profile's value), through the
snapshot's stand-in insightface pack as `fit` loads it (faces.backend=insightface). --sample then
samples one video with the configured sampling settings through diffusers' pipeline over the
module's models, and the bare CogVideoX-5B pipeline on the same settings, in the same process,
and profiles one guided denoising step of each (torch.profiler, top ops by GPU time); with
sampling.compile_blocks=true both pipelines run their blocks under torch.compile. Results go
to benchmarks/<name>.json.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import statistics
import time
from pathlib import Path

import lightning as L
import torch

from mm_lightning.commands.bench_counters import timed
from mm_lightning.commands.snapshot import snapshot_config
from mm_lightning.curriculum import frozen_models_needed
from mm_lightning.data.latent_cache import open_cache
from mm_lightning.memory import gib
from mm_lightning.models.loading import ID_EMBED_DIMS, frozen_dtype, sampling_scheduler
from mm_lightning.models.magicmirror import compile_blocks
from mm_lightning.module import MagicMirrorModule
from mm_lightning.strategies import strategy

CUDA = torch.cuda.is_available()  # without a GPU (tiny profile) the script only dry-runs the code path
DEVICE = "cuda" if CUDA else "cpu"


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


class StepStats(L.Callback):
    """Synchronised wall time of every optimizer step; static and peak allocated memory per rank."""

    def __init__(self):
        self.times, self.start, self.static = [], 0.0, 0

    def on_train_start(self, trainer, module):
        _sync()
        self.static = torch.cuda.memory_allocated() if CUDA else 0
        if CUDA:
            torch.cuda.reset_peak_memory_stats()

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        _sync()
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        _sync()
        self.times.append(time.perf_counter() - self.start)

    def on_train_end(self, trainer, module):
        peak = torch.cuda.max_memory_allocated() if CUDA else 0
        mine = torch.tensor([gib(self.static), gib(peak)], device=module.device)
        self.per_rank = trainer.strategy.all_gather(mine).reshape(-1, 2).tolist()  # [world, (static, peak)]


def train_steps(cfg, stage: str, args, identity: bool) -> dict:
    cfg = copy.deepcopy(cfg)  # the identity run changes its own copy
    if identity:  # the 5B profile's identity loss; every step pays for the decode, for a stable timing
        cfg.loss.identity_weight = 0.05
        cfg.loss.identity_max_timestep = cfg.architecture.scheduler.num_train_timesteps
    module = MagicMirrorModule(cfg, stage=stage, **frozen_models_needed(cfg))
    s, t = cfg.curriculum.stages[stage], cfg.trainer
    stats = StepStats()
    trainer = L.Trainer(  # curriculum.build_trainer's settings, without checkpoints or a logger
        max_steps=args.warmup + args.steps,
        accumulate_grad_batches=s.accumulate_grad_batches,
        accelerator="auto",
        devices=t.devices,
        strategy=strategy(cfg),
        precision=t.precision,
        gradient_clip_val=cfg.optim.gradient_clip_val,
        logger=False,
        callbacks=[stats],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir="/tmp/fit_step",
    )
    trainer.fit(module, datamodule=open_cache(cfg, stage))
    timed = stats.times[args.warmup :]
    world = trainer.world_size
    return {
        "rank": trainer.global_rank,
        "world_size": world,
        "strategy": t.strategy,
        "precision": t.precision,
        "optimizer": cfg.optim.name,
        "frozen_dtype": str(frozen_dtype(cfg)).removeprefix("torch."),
        "identity_loss": identity,
        "batch_per_device": s.batch_size,
        "frames": s.frames,
        "height": s.height,
        "width": s.width,
        "step_s_median": statistics.median(timed),
        "step_s_all": stats.times,
        "samples_per_s": world * s.batch_size * s.accumulate_grad_batches / statistics.median(timed),
        "static_gib_per_rank": [r[0] for r in stats.per_rank],
        "peak_gib_per_rank": [r[1] for r in stats.per_rank],
        "loaded": {"text_encoder": module.text_encoder is not None, "vae": module.vae is not None},
    }


@torch.no_grad()
def sample(cfg) -> dict:
    """One video through the module's pipeline as `generate` runs it (every weight bf16, T5 on the GPU only
    while it encodes the prompts), then the bare CogVideoX pipeline (T5 resident, as diffusers runs it) on the same
    settings, each timed from its models on the CPU (moving them to the GPU included: diffusers' `pipe.to("cuda")`
    for the bare one); then a torch.profiler summary of one denoising step (one guided transformer call) of each.
    Each pipeline first samples 2 steps untimed, so that neither pays the process's first CUDA/cuDNN calls."""
    from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel

    from mm_lightning.pipeline import encode_prompts_then_load, sample_video

    prompt, s = "a man walking in a park", cfg.sampling
    module = MagicMirrorModule(cfg, stage=cfg.curriculum.order[-1]).to(torch.bfloat16).eval()
    pipe = module.sampling_pipeline()
    if s.compile_blocks:  # as generate does; the untimed 2-step warm-up run pays the compilation
        compile_blocks(module.transformer.base.transformer_blocks)
    size = module.transformer.face_encoder.clip_image_size
    ref, ids = (
        torch.rand(1, 3, size, size),
        torch.nn.functional.normalize(torch.randn(ID_EMBED_DIMS[cfg.faces.backend]), dim=0),
    )
    warm_cfg = copy.deepcopy(cfg)
    warm_cfg.sampling.num_inference_steps = 2

    def magicmirror(pipe, run_cfg) -> dict:  # from the models on the CPU, as generate has them after loading
        return _load_then_sample(
            lambda: encode_prompts_then_load(pipe, run_cfg, prompt, device=DEVICE),
            lambda embeds: sample_video(pipe, run_cfg, prompt, ref, ids, seed=0, prompt_embeds=embeds),
        )

    warm_s = magicmirror(pipe, warm_cfg)["seconds"]
    pipe.transformer.to("cpu")
    pipe.vae.to("cpu")
    _reset_peak()
    mm = magicmirror(pipe, cfg)
    rows = {"magicmirror": {**mm, "frames": list(mm["frames"].shape), "peak_gib": _peak_gib(), "warm_up_s": warm_s}}
    rows["magicmirror"]["resident_gib_after"] = gib(torch.cuda.memory_allocated()) if CUDA else 0.0
    step_inputs = _denoising_step_inputs(module, pipe, cfg, ref, ids)
    rows["profile_magicmirror"] = _profile_step(module.transformer, step_inputs, face=step_inputs.pop("face"))
    del module.transformer, module.pipe, pipe  # the bare run gets the GPU without the adapted model
    module.vae.to("cpu")  # the bare run starts from its models on the CPU too
    bare_transformer = CogVideoXTransformer3DModel.from_pretrained(
        cfg.weights.transformer, torch_dtype=torch.bfloat16, local_files_only=True
    )
    bare = CogVideoXPipeline(
        tokenizer=module.tokenizer,
        text_encoder=module.text_encoder,
        vae=module.vae,
        transformer=bare_transformer,
        scheduler=sampling_scheduler(s.scheduler, module.scheduler.config),
    )
    bare.set_progress_bar_config(disable=True)
    if s.compile_blocks:
        compile_blocks(bare_transformer.transformer_blocks)
    bare.vae.enable_slicing()
    if s.vae_tiling:
        bare.vae.enable_tiling()

    def bare_run(steps: int) -> dict:
        return _load_then_sample(
            lambda: bare.to(DEVICE),
            lambda _: bare(
                prompt=prompt,
                negative_prompt=s.negative_prompt,
                num_frames=s.num_frames,
                height=s.height,
                width=s.width,
                num_inference_steps=steps,
                guidance_scale=s.guidance_scale,
                generator=torch.Generator().manual_seed(0),
                output_type="np",
            ).frames[0],
        )

    warm_s = bare_run(2)["seconds"]
    bare.to("cpu")
    _reset_peak()
    row = bare_run(s.num_inference_steps)
    rows["bare"] = {**row, "frames": list(row["frames"].shape), "peak_gib": _peak_gib(), "warm_up_s": warm_s}
    rows["profile_bare"] = _profile_step(bare_transformer, step_inputs)
    rows["ratio"] = rows["magicmirror"]["seconds"] / rows["bare"]["seconds"]
    rows["sample_ratio"] = rows["magicmirror"]["sample_s"] / rows["bare"]["sample_s"]
    rows["step_ratio"] = rows["profile_magicmirror"]["step_ms"] / rows["profile_bare"]["step_ms"]
    rows["settings"] = {
        "steps": s.num_inference_steps,
        "guidance_scale": s.guidance_scale,
        "scheduler": s.scheduler,
        "frames": s.num_frames,
        "height": s.height,
        "width": s.width,
        "vae_tiling": s.vae_tiling,
        "compile_blocks": s.compile_blocks,
    }
    return rows


def _load_then_sample(load, sample) -> dict:
    """Times load() (models to the GPU, prompts encoded) and then sample(what load returned) apart."""
    start = time.perf_counter()
    loaded_value = load()
    _sync()
    loaded = time.perf_counter()
    frames = sample(loaded_value)
    _sync()
    end = time.perf_counter()
    return {"seconds": end - start, "t5_and_load_s": loaded - start, "sample_s": end - loaded, "frames": frames}


def _denoising_step_inputs(module, pipe, cfg, ref, ids) -> dict:
    """The transformer's inputs at one guided denoising step of the configured video ([uncond, cond] batch)."""
    from mm_lightning.pipeline import encode_face
    from mm_lightning.text import identity_token_mask

    s, tconf = cfg.sampling, module.transformer.config
    frames = (s.num_frames - 1) // pipe.vae_scale_factor_temporal + 1
    h, w = s.height // pipe.vae_scale_factor_spatial, s.width // pipe.vae_scale_factor_spatial
    latents = torch.randn(2, frames, tconf.in_channels, h, w, device=DEVICE, dtype=torch.bfloat16)
    text = torch.randn(2, tconf.max_text_seq_length, tconf.text_embed_dim, device=DEVICE, dtype=torch.bfloat16)
    mask = identity_token_mask(
        module.tokenizer, ["a man walking"], cfg.model.identity_words, None, tconf.max_text_seq_length
    )
    face = encode_face(pipe, ref.unsqueeze(0), ids.unsqueeze(0), mask).for_guidance()
    return {
        "hidden_states": latents,
        "encoder_hidden_states": text,
        "timestep": torch.tensor([500, 500], device=DEVICE),
        "image_rotary_emb": pipe._prepare_rotary_positional_embeddings(s.height, s.width, frames, DEVICE),
        "face": face,
    }


def _profile_step(transformer, inputs: dict, top: int = 10, **extra) -> dict:
    """Median time of one transformer call and torch.profiler's top ops by self GPU time (CPU time without one)."""
    from torch.profiler import ProfilerActivity, profile

    call = lambda: transformer(**inputs, **extra, return_dict=False)  # noqa: E731
    step_s = timed(call, steps=2, warmup=1, device=torch.device(DEVICE))  # the median of 2 after a warm call
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])) as prof:
        call()
        _sync()
    self_us = (lambda e: e.self_device_time_total) if CUDA else (lambda e: e.self_cpu_time_total)
    events = sorted(prof.key_averages(), key=self_us, reverse=True)
    total = sum(self_us(e) for e in events)
    ops = [
        {"op": e.key, "calls": e.count, "ms": round(self_us(e) / 1000, 2), "share": round(self_us(e) / total, 3)}
        for e in events[:top]
    ]
    return {"step_ms": 1000 * step_s, "profiled_ms_total": round(total / 1000, 1), "top_ops": ops}


def _reset_peak() -> None:
    if CUDA:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float:
    return gib(torch.cuda.max_memory_allocated()) if CUDA else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--snapshot", required=True)
    parser.add_argument("--profile", default="cogvideox-5b")
    parser.add_argument("--stage", default="video_finetune")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--identity", action="store_true", help="also time the step with the identity loss on")
    parser.add_argument("--sample", action="store_true", help="also sample one video, MagicMirror and bare")
    parser.add_argument("--name", default="fit_step")
    parser.add_argument("--out-dir", default="benchmarks")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = snapshot_config(
        "full",
        args.profile,
        Path(args.snapshot).resolve(),
        ["eval.enabled=false", "loss.identity_weight=0", *args.overrides],
    )
    report = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if CUDA else "cpu",
        "torch": torch.__version__,
        "overrides": args.overrides,
        "runs": [],
    }
    if args.steps:  # --steps 0 --sample: sampling only
        report["runs"].append(train_steps(cfg, args.stage, args, identity=False))
    if args.steps and args.identity:
        _reset_peak()
        report["runs"].append(train_steps(cfg, args.stage, args, identity=True))
    if report["runs"] and report["runs"][0]["rank"] != 0:
        return
    for run in report["runs"]:
        print(
            f"{run['strategy']} x{run['world_size']} {run['optimizer']} identity={run['identity_loss']}: "
            f"{run['step_s_median']:.3f} s/step, "
            f"{run['samples_per_s']:.3f} samples/s, peak {max(run['peak_gib_per_rank']):.1f} GiB "
            f"(static {max(run['static_gib_per_rank']):.1f})",
            flush=True,
        )
    if args.sample:
        report["sampling"] = sample(cfg)
        print(json.dumps(report["sampling"], indent=2), flush=True)
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.out_dir) / f"{args.name}.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
