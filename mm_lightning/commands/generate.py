"""python -m mm_lightning generate --checkpoint CKPT --image FACE.jpg [--image ...] --prompt "..." --out out.mp4

Memory options for small GPUs: --offload model|sequential (diffusers' CPU offloading), --int8 (torchao
int8 weight-only), and the config's VAE slicing/tiling (sampling.vae_slicing, sampling.vae_tiling). With
--offload none T5 is on the GPU only while it encodes the prompts."""

import importlib.util
from pathlib import Path

OFFLOAD_MODES = ("none", "model", "sequential")  # mm_lightning.pipeline.offload


def add_arguments(parser):
    parser.add_argument("--checkpoint", required=True, help="a final.ckpt (or last.ckpt) written by fit")
    parser.add_argument("--image", action="append", required=True, help="reference face photo; repeat for up to 4")
    parser.add_argument(
        "--prompt", required=True, help='text prompt with a class word, e.g. "a woman walking on a beach"'
    )
    parser.add_argument(
        "--negative-prompt",
        default=None,
        help='what classifier-free guidance steers away from, e.g. "blurry, distorted face" '
        "(default: the config's sampling.negative_prompt, empty unless set)",
    )
    parser.add_argument("--out", default="out.mp4", help="output mp4 (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--raw-weights",
        action="store_true",
        help="use the raw trained weights when the checkpoint also holds EMA weights (ema.enabled); "
        "by default the EMA weights are used",
    )
    parser.add_argument(
        "--offload",
        choices=OFFLOAD_MODES,
        default="none",
        help="diffusers' CPU offloading, needs a CUDA GPU: 'model' keeps one model (T5, transformer, "
        "VAE) on the GPU at a time; 'sequential' one layer at a time (least memory, slowest). "
        "Default: %(default)s (everything on the GPU)",
    )
    parser.add_argument(
        "--int8",
        action="store_true",
        help="torchao int8 weight-only quantisation of T5 and the transformer (needs `pip install torchao`)",
    )
    parser.add_argument(
        "--experiment", default=None, help="rebuild from this experiment instead of the checkpoint's config"
    )
    parser.add_argument("--profile", default="tiny", help="with --experiment: a profile in experiments/profiles/")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="e.g. sampling.num_inference_steps=30 sampling.scheduler=ddim sampling.vae_tiling=true",
    )


def check_memory_options(offload: str, int8: bool) -> None:
    """Before loading anything: offloading needs a CUDA GPU, --int8 needs torchao."""
    import torch

    from mm_lightning.config import ConfigError

    if offload != "none" and not torch.cuda.is_available():
        raise ConfigError(
            f"--offload {offload} moves weights between the CPU and a CUDA GPU, and no GPU is visible; "
            "use --offload none"
        )
    if int8 and importlib.util.find_spec("torchao") is None:
        raise ConfigError("--int8 needs torchao, which is not installed: pip install torchao")


def run(args) -> int:
    import torch

    from mm_lightning.config import FacesConfig
    from mm_lightning.data.media import read_image
    from mm_lightning.evaluation.video_io import write_video
    from mm_lightning.faces import face_analyzer
    from mm_lightning.models.magicmirror import compile_blocks
    from mm_lightning.module import MagicMirrorModule
    from mm_lightning.pipeline import encode_prompts_then_load, face_inputs, offload, quantize_int8, sample_video
    from mm_lightning.text import identity_token_mask

    check_memory_options(args.offload, args.int8)
    images = [read_image(p) for p in args.image]
    checkpoint = (
        torch.load(args.checkpoint, map_location="cpu", weights_only=False) if Path(args.checkpoint).is_file() else None
    )
    if checkpoint is None:
        raise FileNotFoundError(f"checkpoint not found: {args.checkpoint}")
    faces_cfg = checkpoint["mm_config"]["faces"]
    analyzer = face_analyzer(FacesConfig(**faces_cfg))
    # Before loading any model: a photo without a face stops here. The faces found feed the pipeline.
    faces = [analyzer.require_face(image, name) for image, name in zip(images, args.image)]

    module = MagicMirrorModule.from_checkpoint(
        checkpoint,  # loaded once, above
        args.overrides,
        args.experiment,
        args.profile,
        raw_weights=args.raw_weights,
        to_device=False,  # the models come to the GPU below: after prompt encoding, or through offloading
    )
    print(f"weights: {module.loaded_weights}")
    cfg = module.cfg
    ref_pixels, id_embedding = face_inputs(images, faces, module.transformer.face_encoder.clip_image_size)
    mask = identity_token_mask(
        module.tokenizer,
        [args.prompt],
        cfg.model.identity_words,
        cfg.model.trigger_word,
        module.transformer.config.max_text_seq_length,
    )
    if mask.sum() == 0:
        words = cfg.model.trigger_word or ", ".join(cfg.model.identity_words)
        print(f"warning: the prompt has no identity word ({words}); the identity branch has nothing to write into")
    pipe = module.sampling_pipeline()
    embeds = None
    if args.offload == "none" and torch.cuda.is_available():  # T5 on the GPU only while it encodes
        embeds = encode_prompts_then_load(pipe, cfg, args.prompt, args.negative_prompt)
    if args.int8:
        quantize_int8(pipe, text_encoder=embeds is None)
    offload(pipe, args.offload)
    if cfg.sampling.compile_blocks:
        compile_blocks(module.transformer.base.transformer_blocks)
    frames = sample_video(pipe, cfg, args.prompt, ref_pixels, id_embedding, args.seed, args.negative_prompt, embeds)
    out = write_video(args.out, frames, cfg.sampling.fps)
    print(f"wrote {out} ({len(frames)} frames, {frames.shape[2]}x{frames.shape[1]}, {cfg.sampling.fps} fps)")
    return 0
