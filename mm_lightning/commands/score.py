"""`python -m mm_lightning score`: the benchmark metrics of existing videos (issue 7).

Input, either a manifest (JSON lines; relative paths are resolved against its folder):
    {"video": "ours/0001.mp4", "references": ["refs/anna_1.png"], "prompt": "...", "method": "ours"}
or one video: --video X.mp4 --reference REF.png [--reference ...] [--prompt ...].
Output in --out: per_video.jsonl (every metric of every video, or `error` when the video is
missing/unreadable or a reference has no face; the run carries on) and table.<format> (per method,
mean ± std over videos), the table also on stdout. --mlflow-experiment logs all of it as one run.
Scoring goes through evaluation.suite.VideoEvaluator, the path the training callback uses.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path


class ManifestError(ValueError):
    """A manifest line that is not a valid row; the message names the file and line."""


@dataclass
class Row:
    video: Path
    references: list[Path]
    prompt: str
    method: str


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifest", type=Path, help="JSONL: video, references, prompt, method per line")
    source.add_argument("--video", type=Path, help="score one video (with --reference)")
    parser.add_argument("--reference", type=Path, action="append", default=[], help="reference image; repeatable")
    parser.add_argument("--prompt", default="", help="prompt of --video (text alignment)")
    parser.add_argument("--method", default="default", help="method name of --video in the table")
    parser.add_argument("--out", type=Path, default=Path("runs/score"), help="folder for per_video.jsonl and the table")
    parser.add_argument("--format", choices=["md", "csv", "latex"], default="md")
    parser.add_argument("--mlflow-experiment", help="log params, metrics, table and per_video.jsonl as one run")
    parser.add_argument(
        "--tracking-uri", help="MLflow URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db)"
    )
    parser.add_argument("--face-backend", choices=["dlib", "insightface"], help="default: dlib")
    parser.add_argument("--insightface-root", help="folder holding models/<insightface-model>/*.onnx")
    parser.add_argument("--insightface-model", help="default: antelopev2")
    parser.add_argument("--clip-path", help="local CLIP folder for text alignment; without it the metric is left out")
    parser.add_argument(
        "--inception-weights",
        help="torch-fidelity Inception-v3 weights file for the inception score (needs torchvision)",
    )
    parser.add_argument(
        "--flow",
        choices=["dis", "farneback", "raft"],
        help="optical flow for dynamic degree (default: dis; raft: torchvision and --flow-weights)",
    )
    parser.add_argument("--flow-weights", help="local RAFT weights file (torchvision raft_large state dict)")
    parser.add_argument(
        "--flow-max-side",
        type=int,
        help="shrink frames to this longest side for flow (default: full size); 0: full size",
    )
    parser.add_argument("--frames-sampled", type=int, help="frames per video for face metrics and CLIP (default 16)")
    parser.add_argument(
        "--no-face-similarity",
        type=_no_face_policy,
        help="frames without a face: 'skip' (default: ID mean over face frames; a video with no "
        "face has no value), 'zero' (they score 0), or a number they score",
    )


def _no_face_policy(text: str) -> float | str:
    if text == "skip":
        return text
    if text == "zero":
        return 0.0
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'skip', got {text!r}") from None


def load_manifest(path: Path) -> list[Row]:
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
            rows.append(_row(data, path.parent))
        except (json.JSONDecodeError, ManifestError) as err:
            raise ManifestError(f"{path}, line {number}: {err}") from None
    if not rows:
        raise ManifestError(f"{path}: no rows")
    return rows


def _row(data, folder: Path) -> Row:
    if not isinstance(data, dict):
        raise ManifestError("expected a JSON object")
    video, refs = data.get("video"), data.get("references")
    if not isinstance(video, str) or not video:
        raise ManifestError("'video' must be a path string")
    if isinstance(refs, str):
        refs = [refs]
    if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
        raise ManifestError("'references' must be a non-empty list of path strings")
    prompt, method = data.get("prompt", ""), data.get("method", "default")
    if not isinstance(prompt, str) or not isinstance(method, str):
        raise ManifestError("'prompt' and 'method' must be strings")
    return Row(folder / video, [folder / r for r in refs], prompt, method)


def evaluator_config(args: argparse.Namespace):
    from mm_lightning.config import FacesConfig
    from mm_lightning.evaluation.suite import EvaluatorConfig

    faces = {
        "backend": args.face_backend,
        "insightface_root": args.insightface_root,
        "insightface_model": args.insightface_model,
    }
    given = {
        "faces": FacesConfig(**{k: v for k, v in faces.items() if v is not None}),
        "clip_path": args.clip_path,
        "flow": args.flow,
        "flow_weights": args.flow_weights,
        "frames_sampled": args.frames_sampled,
        "inception_weights": args.inception_weights,
    }
    config = {k: v for k, v in given.items() if v is not None}
    if args.flow_max_side is not None:
        config["flow_max_side"] = args.flow_max_side or None
    if args.no_face_similarity is not None:
        config["no_face_similarity"] = None if args.no_face_similarity == "skip" else args.no_face_similarity
    return EvaluatorConfig(**config)


def _jsonable(value):
    """NaN (an undefined metric) becomes null: JSON has no NaN."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def score_rows(rows: list[Row], evaluator, out_file: Path) -> list[dict]:
    """Score every row, writing each record to out_file as soon as it is done."""
    from mm_lightning.data.media import MediaReadError, read_image
    from mm_lightning.evaluation.video_io import read_video
    from mm_lightning.faces import NoFaceError

    references: dict[tuple[Path, ...], object] = {}  # one Reference (or its error) per reference set

    def reference(paths: tuple[Path, ...]):
        if paths not in references:
            try:
                references[paths] = evaluator.prepare_reference([read_image(p) for p in paths], [str(p) for p in paths])
            except (MediaReadError, NoFaceError) as err:
                references[paths] = err
        if isinstance(references[paths], Exception):
            raise references[paths]
        return references[paths]

    records = []
    with out_file.open("w") as f:
        for row in rows:
            record = {
                "video": str(row.video),
                "method": row.method,
                "prompt": row.prompt,
                "references": [str(p) for p in row.references],
            }
            start = time.perf_counter()
            try:
                ref = reference(tuple(row.references))
                frames, fps = read_video(row.video)
                record.update(evaluator.score_video(frames, fps, ref, row.prompt or None))
            except (MediaReadError, NoFaceError) as err:
                record["error"] = str(err)
            record["seconds"] = round(time.perf_counter() - start, 3)
            record = {k: _jsonable(v) for k, v in record.items()}
            f.write(json.dumps(record) + "\n")
            f.flush()
            records.append(record)
            status = record.get("error") or f"id_similarity {record['id_similarity']}, dynamic {record['dynamic']}"
            print(f"score: {row.video.name} ({record['seconds']:.1f} s): {status}", file=sys.stderr)
    return records


def log_to_mlflow(
    args, config, evaluator, columns, table_rows, files: list[Path], seconds: list[float], overall: dict[str, float]
) -> str:
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    from mm_lightning.tracking import TAG_ROLE, TAG_SOURCE, ensure_experiment, tracking_uri

    uri = args.tracking_uri or tracking_uri()
    client = MlflowClient(uri)
    experiment_id = ensure_experiment(client, args.mlflow_experiment, uri)
    source = str(args.manifest or args.video)
    tags = {TAG_ROLE: "score", TAG_SOURCE: source}
    if evaluator.text_alignment_skipped:
        tags["text_alignment_skipped"] = evaluator.text_alignment_skipped
    if evaluator.text_alignment_provenance:
        tags["text_alignment"] = evaluator.text_alignment_provenance
    if evaluator.inception_score_skipped:
        tags["inception_score_skipped"] = evaluator.inception_score_skipped
    run = client.create_run(experiment_id, run_name=f"score {Path(source).stem}", tags=tags)
    now = int(time.time() * 1000)
    params = [Param(k, str(v)) for k, v in asdict(config).items()]
    metrics = [Metric("seconds_per_video", statistics.fmean(seconds), now, 0)] if seconds else []
    metrics += [Metric(name, value, now, 0) for name, value in overall.items()]
    for r in table_rows:
        name = "".join(c if c.isalnum() or c in "_-. " else "_" for c in r.method)
        metrics += [Metric(f"{name}/{m}", r.cells[m].mean, now, 0) for m in columns if r.cells[m].n]
        metrics += [
            Metric(f"{name}/errors", r.errors, now, 0),
            Metric(f"{name}/no_face_frames", r.no_face_frames, now, 0),
        ]
        if r.frames_scored:
            metrics += [
                Metric(f"{name}/face_rate", r.face_rate, now, 0),
                Metric(f"{name}/videos_without_face", r.cells["id_similarity"].undefined, now, 0),
            ]
    client.log_batch(run.info.run_id, metrics=metrics, params=params)
    for path in files:
        client.log_artifact(run.info.run_id, str(path))
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def run(args: argparse.Namespace) -> int:
    if args.video and not args.reference:
        print("score: --video needs at least one --reference", file=sys.stderr)
        return 2
    try:
        rows = (
            load_manifest(args.manifest)
            if args.manifest
            else [Row(args.video, list(args.reference), args.prompt, args.method)]
        )
    except (ManifestError, OSError) as err:
        print(f"score: {err}", file=sys.stderr)
        return 2
    # Imported here: the CLI builds every command's parser, and torch/dlib take seconds to load.
    from mm_lightning.evaluation.suite import VideoEvaluator
    from mm_lightning.reports.score_table import build_table, render

    config = evaluator_config(args)
    try:
        evaluator = VideoEvaluator(config)
    except (OSError, ValueError, ImportError) as err:  # e.g. --flow raft without weights or torchvision
        print(f"score: {err}", file=sys.stderr)
        return 2
    for skipped in (evaluator.text_alignment_skipped, evaluator.inception_score_skipped):
        if skipped:
            print(f"score: {skipped}", file=sys.stderr)
    if evaluator.text_alignment_provenance:
        print(f"score: text_alignment by {evaluator.text_alignment_provenance}", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    per_video = args.out / "per_video.jsonl"
    records = score_rows(rows, evaluator, per_video)
    columns, table_rows = build_table(records)
    text = render(columns, table_rows, args.format)
    table_file = args.out / f"table.{args.format}"
    table_file.write_text(text)
    sys.stdout.write(text)

    seconds = [r["seconds"] for r in records if "error" not in r]
    failed = len(records) - len(seconds)
    timing = (
        f"{statistics.fmean(seconds):.2f} s per video (median {statistics.median(seconds):.2f} s, "
        f"total {sum(seconds):.1f} s)"
        if seconds
        else "no video scored"
    )
    print(f"score: {len(seconds)} videos scored, {failed} failed; {timing}; wrote {per_video} and {table_file}")
    # Set-level metrics have no per-video value: over every video of the manifest, whatever its method.
    overall = {}
    if "inception_score" in evaluator.metrics and seconds:
        overall["inception_score_all_videos"] = float(evaluator.metrics["inception_score"].compute())
        print(f"score: inception score over all {len(seconds)} videos: {overall['inception_score_all_videos']:.3f}")
    if args.mlflow_experiment:
        run_id = log_to_mlflow(args, config, evaluator, columns, table_rows, [per_video, table_file], seconds, overall)
        print(f"score: logged to MLflow run {run_id} (experiment {args.mlflow_experiment})")
    return 0 if seconds else 1
