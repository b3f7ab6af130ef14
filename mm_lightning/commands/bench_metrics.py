"""Metrics benchmark command: seconds to score one generated-size video with every offline metric.

The video is synthetic (the astronaut photo sliding across a 49x480x720 frame at 16 px per frame,
8 fps, as CogVideoX outputs), so the figure needs no data and no GPU. Target: <= 10 s on 2 cores.
Face models and the reference are prepared before the clock starts, as in a real evaluation.
--flow-table PATH writes instead the flow estimators' readings of known displacements
(evaluation/flow_displacement.py), the table in benchmarks/flow_displacement.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--frames", type=int, default=49)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=720)
    parser.add_argument("--fps", type=float, default=8.0)
    parser.add_argument("--frames-sampled", type=int, help="face-metric frames (default 16)")
    parser.add_argument("--flow", choices=["dis", "farneback", "raft"], help="optical flow (default: dis)")
    parser.add_argument("--flow-weights", help="local RAFT weights file (with --flow raft)")
    parser.add_argument(
        "--flow-max-side",
        type=int,
        help="shrink frames to this longest side for flow (default: full size); 0: full size",
    )
    parser.add_argument(
        "--flow-table", type=Path, help="write the flow estimators' known-displacement table (markdown) here and stop"
    )
    parser.add_argument("--face-backend", choices=["dlib", "insightface"], help="default: dlib")
    parser.add_argument("--insightface-root")


def run(args: argparse.Namespace) -> int:
    if args.flow_table:
        from mm_lightning.evaluation.flow_displacement import displacement_table

        start = time.perf_counter()
        table = displacement_table()
        args.flow_table.parent.mkdir(parents=True, exist_ok=True)
        args.flow_table.write_text(table)
        print(table + f"bench-metrics: wrote {args.flow_table} in {time.perf_counter() - start:.0f} s")
        return 0
    from mm_lightning.config import FacesConfig
    from mm_lightning.evaluation.dynamic_degree import pair_scores
    from mm_lightning.evaluation.motion_smoothness import motion_smoothness
    from mm_lightning.evaluation.sampling import uniform_indices
    from mm_lightning.evaluation.suite import EvaluatorConfig, VideoEvaluator
    from mm_lightning.evaluation.synthetic import astronaut, sliding_photo

    faces = {"backend": args.face_backend, "insightface_root": args.insightface_root}
    overrides = {
        "frames_sampled": args.frames_sampled,
        "faces": FacesConfig(**{k: v for k, v in faces.items() if v is not None}),
        "flow": args.flow,
        "flow_weights": args.flow_weights,
    }
    config = EvaluatorConfig(**{k: v for k, v in overrides.items() if v is not None})
    if args.flow_max_side is not None:
        config.flow_max_side = args.flow_max_side or None
    evaluator = VideoEvaluator(config)
    reference = evaluator.prepare_reference([astronaut()])
    video = sliding_photo(
        astronaut(), args.frames, (args.height, args.width), speed=16, photo_height=round(0.75 * args.height)
    )

    start = time.perf_counter()
    result = evaluator.score_video(video, args.fps, reference, prompt="an astronaut")
    total = time.perf_counter() - start
    # The two costly parts again, alone, to show where the time goes.
    start = time.perf_counter()
    for i in uniform_indices(len(video), config.frames_sampled):
        evaluator.analyzer.largest_face(video[i])
    faces = time.perf_counter() - start
    start = time.perf_counter()
    pair_scores(video, args.fps, evaluator.metrics["dynamic_degree"].flow)
    flow = time.perf_counter() - start
    start = time.perf_counter()
    motion_smoothness(video, args.fps, evaluator.metrics["motion_smoothness"].flow)
    smoothness = time.perf_counter() - start

    flow_size = f"longest side {config.flow_max_side}" if config.flow_max_side else "full size"
    print(
        f"bench-metrics: {args.frames}x{args.height}x{args.width} video at {args.fps:g} fps, "
        f"{result['frames_scored']} face frames ({config.faces.backend}), flow {config.flow} at {flow_size}"
    )
    print(
        f"bench-metrics: all offline metrics {total:.2f} s per video "
        f"(face detection+embedding {faces:.2f} s, dynamic-degree flow {flow:.2f} s, motion smoothness "
        f"{smoothness:.2f} s); target <= 10 s on 2 cores (the CPU may be shared: compare runs made together)"
    )
    print(
        f"bench-metrics: id_similarity {result['id_similarity']:.3f}, dynamic {result['dynamic']}, "
        f"fm_inter {result['fm_inter']:.3f}, fm_inter_face {result['fm_inter_face']:.3f}, "
        f"motion_smoothness {result['motion_smoothness']:.3f}"
    )
    return 0
