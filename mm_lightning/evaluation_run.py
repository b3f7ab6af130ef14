"""The evaluation run: generate the benchmark videos, score them, log everything to MLflow.

One plain function, `evaluate_model`, shared by the evaluation callback (during `fit`) and the
`evaluate` command. For each (identity, prompt) of the eval set it samples one video with the
module's current weights, runs `mm_lightning.evaluation.suite.VideoEvaluator` (the same code as
`python -m mm_lightning score`) and the identity-reliance probe, and logs to the given run:
  metrics    eval/<stage>/<metric>  (id_similarity, no_face_frames, face_rate, videos_without_face,
             similarity_decay, fm_ref, fm_inter, fm_ref_face, fm_inter_face, dynamic_degree,
             motion_smoothness, id_reliance, and text_alignment / inception_score when their weights are set)
  artifacts  eval/<stage>/step<N>/videos/*.mp4, contact_sheets/*.png, id_similarity/*.png,
             per_video.json
Under DDP, FSDP or ZeRO-3 each rank generates its share of the videos and logs them under
step<N>/rank<r>/; torchmetrics syncs the metrics.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from mm_lightning.data.media import read_image
from mm_lightning.evaluation.eval_set import demo_eval_set, load_eval_set
from mm_lightning.evaluation.suite import EvaluatorConfig, Reference, VideoEvaluator
from mm_lightning.evaluation.video_io import write_video
from mm_lightning.faces import NoFaceError
from mm_lightning.pipeline import face_inputs, sample_video
from mm_lightning.reliance import RelianceProbe, write_reliance_artifacts
from mm_lightning.reports.plots import contact_sheet, similarity_plot
from mm_lightning.tracking import TAG_INCEPTION_SCORE, TAG_TEXT_ALIGNMENT


def evaluate_model(
    module,
    cfg: DictConfig,
    prefix: str,
    client: MlflowClient,
    run_id: str,
    step: int,
    rank: int = 0,
    world_size: int = 1,
    probe: RelianceProbe | None = None,
) -> dict[str, float]:
    """Generates and scores the eval set with `module`'s current weights; logs metrics + artifacts.
    It also runs the identity-reliance probe (`probe`, or one built from `cfg`).

    The pass's wall time is logged as eval/<prefix>/seconds (generation and scoring together)."""
    start = time.perf_counter()
    eval_set = cfg.eval.eval_set or demo_eval_set(cfg.cache_dir)
    items = load_eval_set(eval_set)
    if cfg.eval.max_videos:
        items = items[: cfg.eval.max_videos]
    evaluator = VideoEvaluator(EvaluatorConfig.from_mapping(cfg.eval, faces=cfg.faces))
    evaluator.to(module.device)
    if evaluator.text_alignment_skipped and rank == 0:
        client.set_tag(run_id, TAG_TEXT_ALIGNMENT, f"left out: {evaluator.text_alignment_skipped}")
    if evaluator.text_alignment_provenance and rank == 0:
        client.set_tag(run_id, TAG_TEXT_ALIGNMENT, evaluator.text_alignment_provenance)
    if evaluator.inception_score_skipped and rank == 0:
        client.set_tag(run_id, TAG_INCEPTION_SCORE, f"left out: {evaluator.inception_score_skipped}")
    pipe = module.sampling_pipeline()
    clip_size = module.transformer.face_encoder.clip_image_size
    # Each reference set is read and face-detected once, for all its prompts (pipeline inputs and metric references
    # share the faces), and on every rank, so that all ranks leave out the same entries.
    prepared, no_face = {}, {}  # reference set -> (images, ref_pixels, id_embedding, Reference) | error
    for key in dict.fromkeys(tuple(item.references) for item in items):
        try:
            images = [read_image(p) for p in key]
            faces = [evaluator.analyzer.require_face(img, str(p)) for img, p in zip(images, key)]
            prepared[key] = (images, *face_inputs(images, faces, clip_size), Reference.from_faces(images, faces))
        except NoFaceError as err:  # a bad eval-set entry is reported, not fatal
            no_face[key] = str(err)
    per_video = [  # reported once, by rank 0
        {"video": f"{index:03d}_{item.identity}", "prompt": item.prompt, "error": no_face[tuple(item.references)]}
        for index, item in enumerate(items)
        if rank == 0 and tuple(item.references) in no_face
    ]
    todo = [(index, item) for index, item in enumerate(items) if tuple(item.references) in prepared]
    # Every rank samples as many videos: under FSDP and ZeRO-3 each forward pass is collective, so a rank with
    # a smaller share samples a repeat (not scored) while the others sample their last ones.
    rounds = -(-len(todo) // world_size)
    was_training = module.training
    module.eval()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for slot in range(rank, rounds * world_size, world_size):
            index, item = todo[slot % len(todo)]
            images, ref_pixels, id_embedding, reference = prepared[tuple(item.references)]
            frames = sample_video(
                pipe,
                cfg,
                item.prompt,
                ref_pixels,
                id_embedding,
                seed=cfg.seed + index,
                negative_prompt=item.negative_prompt,
            )
            if slot >= len(todo):
                continue
            name = f"{index:03d}_{item.identity}"
            scores = evaluator.score_video(frames, cfg.sampling.fps, reference, item.prompt)
            write_video(out / "videos" / f"{name}.mp4", frames, cfg.sampling.fps)
            contact_sheet(out / "contact_sheets" / f"{name}.png", images[0], frames, item.prompt)
            similarity_plot(out / "id_similarity" / f"{name}.png", scores["per_frame_similarity"], item.prompt)
            per_video.append({"video": name, "identity": item.identity, "prompt": item.prompt, **scores})
        metrics = evaluator.compute()  # every rank calls it: torchmetrics syncs the states here
        # Every rank runs the probe too: FSDP's forward passes are collective.
        reliance = (probe or RelianceProbe.from_config(cfg, clip_size)).measure(module)
        metrics |= reliance.metrics()
        if rank == 0:
            write_reliance_artifacts(out, reliance, f"{prefix}, step {step}: id_reliance by timestep")
        (out / "per_video.json").write_text(json.dumps(per_video, indent=2, default=_json_default))
        # Under DDP each rank logs its own videos into its own folder: no two ranks write one path.
        artifact_path = f"eval/{prefix}/step{step}" + (f"/rank{rank}" if world_size > 1 else "")
        client.log_artifacts(run_id, str(out), artifact_path=artifact_path)
    if rank == 0:
        for key, value in metrics.items():
            client.log_metric(run_id, f"eval/{prefix}/{key}", value, step=step)
        seconds = time.perf_counter() - start
        client.log_metric(run_id, f"eval/{prefix}/seconds", seconds, step=step)
        print(f"evaluation of {prefix} at step {step}: {len(items)} videos in {seconds:.1f} s")
    module.train(was_training)
    return metrics


def _json_default(value):
    return None if isinstance(value, float) and math.isnan(value) else str(value)
