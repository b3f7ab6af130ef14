"""python -m mm_lightning prepare --input RAW_DIR --out DATASET_DIR [--experiment E --profile P] [key=value ...]

Builds a training set from raw clips and photos (mm_lightning/data/prepare/): shots, clips at
the video stage's length and fps, quality and face filters, identity grouping, pairs, captions.
Writes DATASET_DIR/metadata.jsonl, the media, the warmed face cache, prepare_report.json and
plots. `--num-shards N --shard-index I` processes one shard; `--merge` then joins them.
"""

import functools
import time
from pathlib import Path

from omegaconf import OmegaConf

from mm_lightning.commands.common import add_experiment_arguments, config_from_args
from mm_lightning.config import ConfigError


def add_arguments(parser):
    parser.add_argument("--input", type=Path, help="folder of raw videos and images (recursive)")
    parser.add_argument("--out", type=Path, required=True, help="dataset folder to write (metadata.jsonl, media)")
    parser.add_argument("--num-shards", type=int, default=1, help="split the input into N shards (array jobs)")
    parser.add_argument("--shard-index", type=int, default=0, help="the shard this run processes, 0..N-1")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="join the shards written under --out: identities, pairs, captions, metadata.jsonl",
    )
    add_experiment_arguments(parser)


def motion_scorer(flow: str, max_side: int | None):
    """(frames, fps) -> dynamic-degree pair scores with the configured flow (static-clip filter)."""
    from mm_lightning.evaluation.dynamic_degree import pair_scores
    from mm_lightning.evaluation.flow import build_flow

    return functools.partial(pair_scores, flow=build_flow(flow, max_side))


def warm_face_cache(cfg, out: Path, kinds: set[str]) -> None:
    """Build the face cache exactly as `fit` will read it, so training starts at once."""
    from mm_lightning.curriculum import build_datamodule

    cfg = OmegaConf.merge(cfg, {"data": {"root": str(out)}})
    # One stage is enough: its data module caches every row of metadata.jsonl, of both kinds.
    stage = next((name for name, spec in cfg.curriculum.stages.items() if spec.data in kinds), None)
    if stage is not None:
        build_datamodule(cfg, stage, clip_image_size=224, use_cache=False).setup("fit")


def run(args) -> int:
    from mm_lightning.data.prepare import pipeline, report
    from mm_lightning.data.prepare.scan import scan_input, shard
    from mm_lightning.faces import face_analyzer

    start = time.perf_counter()
    cfg = config_from_args(args)
    out = args.out.resolve()
    settings = pipeline.file_settings(cfg)
    ignored = []
    if args.merge:
        results = pipeline.stored_results(out, settings)
        if not results:
            raise FileNotFoundError(f"--merge: no shard results with these settings under {out}/.prepare/files")
    else:
        if args.input is None or not args.input.is_dir():
            raise FileNotFoundError(f"--input {args.input}: not a folder of videos and images")
        if not 0 <= args.shard_index < args.num_shards:
            raise ConfigError(f"--shard-index must be in [0, --num-shards={args.num_shards}), got {args.shard_index}")
        files, ignored = scan_input(args.input.resolve(), out)
        files = shard(files, args.num_shards, args.shard_index)
        out.mkdir(parents=True, exist_ok=True)
        make_analyzer = functools.partial(face_analyzer, OmegaConf.to_object(cfg.faces))  # picklable for workers
        make_motion = functools.partial(motion_scorer, cfg.eval.flow, cfg.eval.flow_max_side)
        results = pipeline.process_files(
            files, args.input.resolve(), out, settings, cfg.prepare.num_workers, make_analyzer, make_motion
        )
        if ignored:
            print(f"ignored {len(ignored)} files that are neither media nor sidecars, e.g. {ignored[0]}")
        if args.num_shards > 1:
            print(
                f"shard {args.shard_index}/{args.num_shards}: {len(results)} files processed into {out}; "
                f"when every shard is done: python -m mm_lightning prepare --merge --out {out}"
            )
            return 0
    processed = time.perf_counter()
    summary, plots = pipeline.build_metadata(cfg, out, results)
    kinds = {kind for kind in ("image", "video") if summary["rows"][kind]}
    warm_start = time.perf_counter()
    warm_face_cache(cfg, out, kinds)
    end = time.perf_counter()
    summary["ignored"] = ignored  # neither media nor sidecars
    # Wall seconds: per-file processing (0 for --merge), the face cache pass fit would otherwise run, in all.
    summary |= {"process_seconds": processed - start, "face_cache_seconds": end - warm_start, "seconds": end - start}
    clips = summary["rows"]["video"]
    summary["clips_per_minute"] = 60 * clips / summary["seconds"] if clips else 0.0
    files = [
        report.write_report(out, summary),
        *report.write_plots(out, plots["face_sizes"], plots["identity_sizes"], plots["cosines"], summary["dropped"]),
    ]
    if cfg.prepare.mlflow:
        report.log_to_mlflow(cfg, summary, files)
    rows = summary["rows"]
    print(
        f"{out}/metadata.jsonl: {rows['image']} image rows, {rows['video']} video rows, "
        f"{summary['identities']['count']} identities; dropped {summary['dropped'] or 'nothing'}; "
        f"report in {files[0]}"
    )
    return 0
