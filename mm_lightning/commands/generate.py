"""python -m mm_lightning generate --checkpoint CKPT --image FACE.jpg [--image ...] --prompt "..." --out out.mp4"""

from pathlib import Path


def add_arguments(parser):
    parser.add_argument("--checkpoint", required=True, help="a final.ckpt (or last.ckpt) written by fit")
    parser.add_argument("--image", action="append", required=True, help="reference face photo; repeat for up to 4")
    parser.add_argument("--prompt", required=True, help='text prompt with a class word, e.g. "a woman walking on a beach"')
    parser.add_argument("--out", default="out.mp4", help="output mp4 (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--experiment", default=None, help="rebuild from this experiment instead of the checkpoint's config")
    parser.add_argument("--profile", default="tiny", help="with --experiment: tiny or cogvideox-5b")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. sampling.num_inference_steps=30 sampling.scheduler=ddim")


def run(args) -> int:
    import torch

    from evaluation.video_io import write_video

    from ..data.media import read_image
    from ..faces import build_face_analyzer
    from ..module import MagicMirrorModule
    from ..pipeline import reference_inputs, sample_video
    from ..text import identity_token_mask

    images = [read_image(p) for p in args.image]
    checkpoint = torch.load(args.checkpoint, map_location="cpu", weights_only=False) if Path(args.checkpoint).is_file() else None
    if checkpoint is None:
        raise FileNotFoundError(f"checkpoint not found: {args.checkpoint}")
    faces_cfg = checkpoint["mm_config"]["faces"]
    analyzer = build_face_analyzer(faces_cfg["backend"], faces_cfg["insightface_root"], faces_cfg["insightface_model"])
    for image, name in zip(images, args.image):  # before loading any model: a photo without a face stops here
        analyzer.require_face(image, name)

    module = MagicMirrorModule.from_checkpoint(args.checkpoint, args.overrides, args.experiment, args.profile)
    cfg = module.cfg
    ref_pixels, id_embedding = reference_inputs(analyzer, images, module.transformer.face_encoder.clip_image_size, args.image)
    mask = identity_token_mask(module.tokenizer, [args.prompt], cfg.model.identity_words, cfg.model.trigger_word,
                               module.transformer.config.max_text_seq_length)
    if mask.sum() == 0:
        words = cfg.model.trigger_word or ", ".join(cfg.model.identity_words)
        print(f"warning: the prompt has no identity word ({words}); the identity branch has nothing to write into")
    frames = sample_video(module.sampling_pipeline(), cfg, args.prompt, ref_pixels, id_embedding, args.seed)
    out = write_video(args.out, frames, cfg.sampling.fps)
    print(f"wrote {out} ({len(frames)} frames, {frames.shape[2]}x{frames.shape[1]}, {cfg.sampling.fps} fps)")
    return 0
