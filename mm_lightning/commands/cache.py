"""python -m mm_lightning cache --experiment NAME [--profile P] [--stages a,b] [key=value ...]

Precomputes VAE latents and T5 prompt embeddings for each stage's data (see
mm_lightning/data/latent_cache.py); `fit` then uses them while data.use_cache=true."""

from mm_lightning.commands.common import add_experiment_arguments, config_from_args


def add_arguments(parser):
    add_experiment_arguments(parser)
    parser.add_argument("--stages", default=None, help="comma-separated stages (default: all of the experiment's)")


def run(args) -> int:
    import torch

    from mm_lightning.curriculum import build_datamodule
    from mm_lightning.data.latent_cache import write_cache
    from mm_lightning.module import MagicMirrorModule

    cfg = config_from_args(args)
    stages = args.stages.split(",") if args.stages else list(cfg.curriculum.order)
    module = MagicMirrorModule(cfg, stage=stages[0])
    if torch.cuda.is_available():
        module = module.to("cuda", torch.bfloat16 if cfg.trainer.precision.startswith("bf16") else torch.float32)
    for stage in stages:
        datamodule = build_datamodule(cfg, stage, module.transformer.face_encoder.clip_image_size, use_cache=False)
        out = write_cache(module, datamodule, cfg, stage)
        print(f"{stage}: cached {len(datamodule.dataset)} samples in {out}")
    return 0
