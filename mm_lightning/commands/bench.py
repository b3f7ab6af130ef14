"""python -m mm_lightning bench --profile cogvideox-5b [--stage video|image] [--compile] [--batch-size N]

Times, in one process and on the same shapes, the adapted model (an experiment, default
`full`), the bare frozen CogVideoX backbone and ConsisID's transformer (diffusers'
`ConsisIDTransformer3DModel` on the same backbone), all random-init from the profile's
architecture (no weights needed):
  - a training step: forward + backward (backbone frozen, the identity modules trained, gradient
    checkpointing as configured);
  - one inference denoising step with classifier-free guidance (batch doubled, no grad).
It prints the median step time after warm-up, peak memory, achieved TFLOP/s and MFU against
a bf16 matmul peak measured in the same run, and the adapted/bare, ConsisID/bare and
adapted/ConsisID ratios; results go to <out-dir>/<profile>_<stage>_b<batch>[_compiled].{json,md}.
ConsisID is built on CogVideoX 1.0's layout: profiles with temporal patches (1.5) time only the other two.

FLOPs are counted by torch.utils.flop_counter on one real eager step of each model, before
any torch.compile (the counter sees aten ops; compiled kernels would hide them), so they
include what the step really runs: the recomputed forward under gradient checkpointing,
and only the input-gradient matmuls of frozen layers. The counting step runs attention on
the flash/memory-efficient SDPA kernels, whose FLOP formulas every torch version knows;
the FLOPs do not depend on the attention kernel. The bare model's count is checked
against the analytic count (`analytic_bare_flops`) and both are reported.

--kernels N adds, for each model, the N costliest GPU kernels of one training step and one
inference step (torch.profiler), to see where an adapted/bare gap comes from.
"""

from __future__ import annotations

import inspect
import platform
import time
from dataclasses import dataclass
from typing import Any

from mm_lightning.commands.bench_counters import (
    analytic_bare_flops,
    count_flops,
    matmul_peak_tflops,
    print_kernels,
    sync,
    timed,
    top_kernels,
)
from mm_lightning.commands.bench_report import report
from mm_lightning.commands.common import add_experiment_arguments, config_from_args


def add_arguments(parser):
    add_experiment_arguments(parser)
    parser.add_argument(
        "--stage",
        choices=["video", "image"],
        default="video",
        help="video: stage-2 shapes at batch 1; image: stage-1 shapes (1 frame) at batch 8",
    )
    parser.add_argument("--batch-size", type=int, default=None, help="default: 1 (video), 8 (image)")
    parser.add_argument("--compile", action="store_true", help="torch.compile each transformer block (static shapes)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after warm-up (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--kernels",
        type=int,
        default=0,
        metavar="N",
        help="also profile one step of each model and report its N costliest GPU kernels",
    )
    parser.add_argument("--device", default="cuda", help="cuda (default); cpu only smoke-tests the code (tiny profile)")
    parser.add_argument("--out-dir", default="benchmarks")


def _measure(name: str, train_step, infer_step, flops: dict, args, peak: float, device) -> dict:
    import torch

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    compile_start = time.perf_counter()
    train_step()  # first call (compiles when --compile); kept out of the timed warm-up
    sync(device)
    first_train = time.perf_counter() - compile_start
    train_s = timed(train_step, args.steps, args.warmup, device)
    train_mem = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    compile_start = time.perf_counter()
    infer_step()
    sync(device)
    first_infer = time.perf_counter() - compile_start
    infer_s = timed(infer_step, args.steps, args.warmup, device)
    row = {
        "model": name,
        "train_step_s": train_s,
        "train_peak_gib": train_mem,
        "train_tflops": flops["train"] / train_s / 1e12,
        "train_mfu": flops["train"] / train_s / 1e12 / peak,
        "infer_cfg_step_s": infer_s,
        "infer_tflops": flops["infer_cfg"] / infer_s / 1e12,
        "infer_mfu": flops["infer_cfg"] / infer_s / 1e12 / peak,
        "train_flops": flops["train"],
        "infer_flops": flops["infer_cfg"],
        "first_train_step_s": first_train,  # includes compilation under --compile
        "first_infer_step_s": first_infer,
    }
    print(
        f"{name:>8}: train {train_s:.3f} s/step ({row['train_tflops']:.0f} TFLOP/s, MFU {row['train_mfu']:.1%}), "
        f"peak {train_mem:.1f} GiB; inference+CFG {infer_s:.3f} s/step (MFU {row['infer_mfu']:.1%}); "
        f"first steps {first_train:.1f} s / {first_infer:.1f} s",
        flush=True,
    )
    if args.kernels:
        row["kernels_train"] = top_kernels(train_step, args.kernels, device)
        print_kernels(f"{name} training step", row["kernels_train"])
        row["kernels_infer_cfg"] = top_kernels(infer_step, args.kernels, device)
        print_kernels(f"{name} inference step with CFG", row["kernels_infer_cfg"])
    return row


@dataclass
class BenchSetup:
    """Shapes, inputs and settings shared by the bare and the adapted measurement."""

    cfg: Any
    device: Any  # torch.device
    dtype: Any  # torch.dtype
    tconf: dict  # the transformer's config
    batch: int
    latent_shape: list  # [batch, frames, channels, h, w]
    checkpointing: bool
    peak_tflops: float
    device_name: str
    backends: list  # SDPA kernels allowed while timing
    rotary: Any  # rotary embeddings as CogVideoXPipeline prepares them, or None
    train_inputs: tuple  # (latents, text, timesteps) at the batch
    infer_inputs: tuple  # the same at twice the batch (classifier-free guidance)


def setup(args) -> BenchSetup:
    import torch
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid
    from torch.nn.attention import SDPBackend

    from mm_lightning.models.loading import _plain

    device, dtype = torch.device(args.device), torch.bfloat16
    cfg = config_from_args(args)
    stage = cfg.curriculum.stages["video_finetune" if args.stage == "video" else "image_pretrain"]
    batch = args.batch_size or (1 if args.stage == "video" else 8)
    tconf = _plain(cfg.architecture.transformer)
    frames = 1 if args.stage == "image" else (stage.frames - 1) // tconf["temporal_compression_ratio"] + 1
    p_t = tconf.get("patch_size_t")
    if p_t:  # CogVideoX 1.5: latent frames padded to a multiple of patch_size_t (module.pad_to_temporal_patch)
        frames += -frames % p_t
    h, w = stage.height // 8, stage.width // 8
    torch.manual_seed(0)

    def inputs(b):
        latents = torch.randn(b, frames, tconf["in_channels"], h, w, device=device, dtype=dtype)
        text = torch.randn(b, tconf["max_text_seq_length"], tconf["text_embed_dim"], device=device, dtype=dtype)
        t = torch.randint(0, 1000, (b,), device=device)
        return latents, text, t

    p = tconf["patch_size"]
    # As CogVideoXPipeline._prepare_rotary_positional_embeddings: 1.0 and 1.5 layouts; none for 2B.
    rotary = None
    if tconf.get("use_rotary_positional_embeddings") and p_t:
        rotary = get_3d_rotary_pos_embed(
            tconf["attention_head_dim"],
            None,
            (h // p, w // p),
            frames // p_t,
            grid_type="slice",
            device=device,
            max_size=(tconf["sample_height"] // p, tconf["sample_width"] // p),
        )
    elif tconf.get("use_rotary_positional_embeddings"):
        crops = get_resize_crop_region_for_grid(
            (h // p, w // p), tconf["sample_width"] // p, tconf["sample_height"] // p
        )
        rotary = get_3d_rotary_pos_embed(tconf["attention_head_dim"], crops, (h // p, w // p), frames, device=device)
    backends = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    if device.type != "cuda":
        backends.append(SDPBackend.MATH)
    s = BenchSetup(
        cfg=cfg,
        device=device,
        dtype=dtype,
        tconf=tconf,
        batch=batch,
        latent_shape=[batch, frames, tconf["in_channels"], h, w],
        checkpointing=bool(cfg.trainer.gradient_checkpointing),
        peak_tflops=matmul_peak_tflops(device),
        device_name=torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        backends=backends,
        rotary=rotary,
        train_inputs=inputs(batch),
        infer_inputs=inputs(2 * batch),
    )
    print(
        f"{s.device_name}: bf16 matmul peak {s.peak_tflops:.0f} TFLOP/s; latents {s.latent_shape} + "
        f"{tconf['max_text_seq_length']} text tokens",
        flush=True,
    )
    return s


def compile_diffusers_blocks(blocks) -> None:
    """torch.compile each block of a diffusers CogVideoX-style model, its first block behind `ContiguousInputs`."""
    import torch

    from mm_lightning.models.magicmirror import compile_blocks

    class ContiguousInputs(torch.nn.Module):
        """Runs a block on copies of its two streams with standard strides, as MagicMirrorTransformer
        does, so that the first block's input strides match the others' (one compiled graph for all)."""

        def __init__(self, block):
            super().__init__()
            self.block = block

        def forward(self, hidden_states, encoder_hidden_states, *args, **kwargs):
            def standard(x):
                return x.clone(memory_format=torch.contiguous_format)

            return self.block(standard(hidden_states), standard(encoder_hidden_states), *args, **kwargs)

    compile_blocks(blocks)
    # diffusers hands block 0 slices of the patch embedding; later blocks get fresh tensors.
    blocks[0] = ContiguousInputs(blocks[0])


def build_base(s: BenchSetup):
    import torch
    from diffusers import CogVideoXTransformer3DModel

    with torch.device(s.device):  # random init straight on the GPU
        return CogVideoXTransformer3DModel.from_config(s.tconf).to(s.dtype).requires_grad_(False)


def build_clip_tower(s: BenchSetup):
    """The profile's CLIP vision tower, random on the device: MagicMirror's face encoder, ConsisID's stand-in."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from mm_lightning.models.loading import _plain

    with torch.device(s.device):
        return CLIPVisionModel(CLIPVisionConfig(**_plain(s.cfg.architecture.image_encoder))).to(s.dtype)


def measure_bare(s: BenchSetup, args) -> dict:
    """The bare frozen backbone: FLOPs (checked against the analytic count), then timings."""
    import torch
    from torch.nn.attention import sdpa_kernel

    (lat, text, t), (lat2, text2, t2) = s.train_inputs, s.infer_inputs
    base = build_base(s)
    if s.checkpointing:
        base.enable_gradient_checkpointing()

    def bare_train():
        x = lat.clone().requires_grad_(True)  # frozen weights: backward runs the input gradients only
        base(x, text, t, image_rotary_emb=s.rotary, return_dict=False)[0].float().pow(2).mean().backward()

    @torch.no_grad()
    def bare_infer():
        base(lat2, text2, t2, image_rotary_emb=s.rotary, return_dict=False)

    flops = {"train": count_flops(bare_train), "infer_cfg": count_flops(bare_infer)}
    _, frames, _, h, w = s.latent_shape
    analytic = analytic_bare_flops(s.tconf, s.batch, frames, h, w, s.checkpointing)
    print(
        f"bare FLOPs counted / analytic: training step {flops['train']:.3e} / {analytic['train']:.3e}, "
        f"inference+CFG {flops['infer_cfg']:.3e} / {analytic['infer_cfg']:.3e}",
        flush=True,
    )
    if args.compile:
        compile_diffusers_blocks(base.transformer_blocks)
    with sdpa_kernel(s.backends):
        row = _measure("bare", bare_train, bare_infer, flops, args, s.peak_tflops, s.device)
    row["analytic_flops"] = analytic
    return row


def measure_adapted(s: BenchSetup, args) -> dict:
    """The adapted model (the experiment's MagicMirror on the same backbone architecture)."""
    import torch
    from torch.nn.attention import sdpa_kernel

    from mm_lightning.models.adapter import eager_forms
    from mm_lightning.models.loading import build_magicmirror
    from mm_lightning.models.magicmirror import compile_blocks

    (lat, text, t), (lat2, text2, t2) = s.train_inputs, s.infer_inputs
    clip = build_clip_tower(s)
    with torch.device(s.device):
        model = build_magicmirror(s.cfg, build_base(s), clip).to(s.dtype)
    model.gradient_checkpointing = s.checkpointing
    size = clip.config.image_size
    id_perceiver = model.face_encoder.id_perceiver
    id_dim = id_perceiver.token_proj[0].in_features if id_perceiver is not None else 512
    mask = torch.zeros(s.batch, s.tconf["max_text_seq_length"], device=s.device)
    mask[:, 2] = 1
    ref = torch.rand(s.batch, 3, size, size, device=s.device, dtype=s.dtype)
    ids = torch.randn(s.batch, id_dim, device=s.device, dtype=s.dtype)

    def adapted_train():
        x = lat.clone().requires_grad_(True)
        face = model.encode_face(ref, ids, mask)  # CLIP under no_grad inside; perceivers trained
        model(x, text, t, image_rotary_emb=s.rotary, face=face)[0].float().pow(2).mean().backward()
        model.zero_grad(set_to_none=True)

    @torch.no_grad()
    def adapted_infer():
        face = model.encode_face(ref, ids, mask).for_guidance()
        model(lat2, text2, t2, image_rotary_emb=s.rotary, face=face)

    with eager_forms():  # the Triton kernels' matmuls are invisible to the FLOP counter
        flops = {"train": count_flops(adapted_train), "infer_cfg": count_flops(adapted_infer)}
    if args.compile:
        compile_blocks(model.base.transformer_blocks)
    with sdpa_kernel(s.backends):
        return _measure("adapted", adapted_train, adapted_infer, flops, args, s.peak_tflops, s.device)


def consisid_config(tconf: dict, face_tower_width: int) -> dict:
    """ConsisID's transformer on the profile's backbone. ConsisID-preview is CogVideoX-5B-I2V (the noisy latents and
    the reference image's latents joined on channels; learned positional embeddings beside RoPE) plus its face
    modules, whose sizes are diffusers' defaults. The local facial extractor reads the face tower's width, and its
    output is the width the cross-attentions' keys take (2/3 of the model width: 2048 at 5B, as ConsisID's)."""
    from diffusers import ConsisIDTransformer3DModel

    known = inspect.signature(ConsisIDTransformer3DModel.__init__).parameters
    config = {key: value for key, value in tconf.items() if key in known}
    width = tconf["num_attention_heads"] * tconf["attention_head_dim"]
    config.update(
        in_channels=2 * tconf["in_channels"],
        out_channels=tconf.get("out_channels") or tconf["in_channels"],
        use_learned_positional_embeddings=bool(tconf.get("use_rotary_positional_embeddings")),
        is_train_face=True,
        LFE_vit_dim=face_tower_width,
        LFE_output_dim=int(width / 3 * 2),
    )
    return config


def measure_consisid(s: BenchSetup, args) -> dict | None:
    """ConsisID (Yuan et al. 2024) timed as the adapted model is: backbone frozen, its identity modules (the local
    facial extractor and the cross-attentions after every second block) trained. Its face tower, EVA02-CLIP-L/14 at
    336 px, is stood in by the profile's CLIP ViT-L/14 (the tower MagicMirror's timing runs), whose hidden states
    after layers 4, 8, 12, 16 and 20 of 24 feed the extractor as EVA-CLIP's do; the ArcFace embedding, computed
    once per photo by either method, is a random input. None for profiles ConsisID's layout does not cover."""
    import torch
    from diffusers import ConsisIDTransformer3DModel
    from torch.nn.attention import sdpa_kernel

    if s.tconf.get("patch_size_t"):
        print("ConsisID: not timed (its transformer has no temporal patches, which this profile uses)", flush=True)
        return None
    (lat, text, t), (lat2, text2, t2) = s.train_inputs, s.infer_inputs
    tower = build_clip_tower(s)
    with torch.device(s.device):
        config = consisid_config(s.tconf, tower.config.hidden_size)
        model = ConsisIDTransformer3DModel.from_config(config).to(s.dtype).requires_grad_(False)
    model.local_facial_extractor.requires_grad_(True)
    model.perceiver_cross_attention.requires_grad_(True)
    if s.checkpointing:
        model.enable_gradient_checkpointing()
    # The reference image's latents beside the noisy ones (random here, as every input).
    lat, lat2 = torch.cat([lat, torch.randn_like(lat)], dim=2), torch.cat([lat2, torch.randn_like(lat2)], dim=2)
    size = tower.config.image_size
    ref = torch.rand(s.batch, 3, size, size, device=s.device, dtype=s.dtype)
    id_cond = torch.randn(s.batch, model.config.LFE_id_dim, device=s.device, dtype=s.dtype)  # ArcFace + EVA-CLIP

    @torch.no_grad()
    def face_features():
        hidden = tower(ref, output_hidden_states=True).hidden_states  # the embeddings, then one per layer
        layers = len(hidden) - 1
        return [hidden[layers * k // 6] for k in range(1, 6)]

    def consisid_train():
        x = lat.clone().requires_grad_(True)
        out = model(
            x, text, t, image_rotary_emb=s.rotary, id_cond=id_cond, id_vit_hidden=face_features(), return_dict=False
        )[0]
        out.float().pow(2).mean().backward()
        model.zero_grad(set_to_none=True)

    @torch.no_grad()
    def consisid_infer():  # ConsisID's pipeline gives both guidance halves the face
        features = [torch.cat([f, f]) for f in face_features()]
        model(
            lat2,
            text2,
            t2,
            image_rotary_emb=s.rotary,
            id_cond=torch.cat([id_cond, id_cond]),
            id_vit_hidden=features,
            return_dict=False,
        )

    flops = {"train": count_flops(consisid_train), "infer_cfg": count_flops(consisid_infer)}
    if args.compile:
        compile_diffusers_blocks(model.transformer_blocks)
    with sdpa_kernel(s.backends):
        return _measure("consisid", consisid_train, consisid_infer, flops, args, s.peak_tflops, s.device)


def run(args) -> int:
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: bench needs a CUDA GPU")
        return 2
    s = setup(args)
    rows = []
    for measure in (measure_bare, measure_adapted, measure_consisid):  # one model on the GPU at a time
        rows.append(measure(s, args))
        if s.device.type == "cuda":
            torch.cuda.empty_cache()  # the model is gone with its measure_*: room for the next one
    report(s, args, *rows)
    return 0
