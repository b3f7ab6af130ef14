"""MLflow evaluation callback: generate the benchmark videos, score them, log everything.

At the end of each curriculum stage (and every `eval.every_n_steps` steps when set) it
samples one video per (identity, prompt) of the eval set with the current weights, runs
`evaluation.suite.VideoEvaluator` (the same code as `python -m mm_lightning score`) and logs
to the stage's MLflow run:
  metrics    eval/<stage>/<metric>  (id_similarity, no_face_frames, face_rate, videos_without_face,
             similarity_decay, fm_ref, fm_inter, fm_ref_face, fm_inter_face, dynamic_degree,
             motion_smoothness, and text_alignment / inception_score when their weights are set)
  artifacts  eval/<stage>/step<N>/videos/*.mp4, contact_sheets/*.png, id_similarity/*.png,
             per_video.json
Under DDP each rank generates its share of the videos and logs them under step<N>/rank<r>/;
torchmetrics syncs the metrics.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from evaluation.eval_set import demo_eval_set, load_eval_set  # noqa: E402
from evaluation.suite import EvaluatorConfig, VideoEvaluator  # noqa: E402
from evaluation.video_io import write_video  # noqa: E402
from mm_lightning.data.media import read_image  # noqa: E402
from mm_lightning.ema import find_ema  # noqa: E402
from mm_lightning.faces import NoFaceError  # noqa: E402
from mm_lightning.pipeline import reference_inputs, sample_video  # noqa: E402
from mm_lightning.reliance import RelianceProbe, write_reliance_artifacts  # noqa: E402
from mm_lightning.tracking import TAG_INCEPTION_SCORE, TAG_TEXT_ALIGNMENT  # noqa: E402


def evaluate_model(module, cfg: DictConfig, prefix: str, client: MlflowClient, run_id: str, step: int,
                   rank: int = 0, world_size: int = 1, probe: RelianceProbe | None = None) -> dict[str, float]:
    """Generates and scores the eval set with `module`'s current weights; logs metrics + artifacts.
    It also runs the identity-reliance probe (`probe`, or one built from `cfg`).

    The pass's wall time is logged as eval/<prefix>/seconds (generation and scoring together)."""
    start = time.perf_counter()
    eval_set = cfg.eval.eval_set or demo_eval_set(cfg.cache_dir)
    items = load_eval_set(eval_set)
    if cfg.eval.max_videos:
        items = items[: cfg.eval.max_videos]
    evaluator = VideoEvaluator(EvaluatorConfig.from_mapping(cfg.eval, face_backend=cfg.faces.backend,
                                                            insightface_root=cfg.faces.insightface_root,
                                                            insightface_model=cfg.faces.insightface_model))
    evaluator.to(module.device)
    if evaluator.text_alignment_skipped and rank == 0:
        client.set_tag(run_id, TAG_TEXT_ALIGNMENT, f"left out: {evaluator.text_alignment_skipped}")
    if evaluator.text_alignment_provenance and rank == 0:
        client.set_tag(run_id, TAG_TEXT_ALIGNMENT, evaluator.text_alignment_provenance)
    if evaluator.inception_score_skipped and rank == 0:
        client.set_tag(run_id, TAG_INCEPTION_SCORE, f"left out: {evaluator.inception_score_skipped}")
    pipe = module.sampling_pipeline()
    clip_size = module.transformer.face_encoder.clip_image_size
    per_video = []
    prepared = {}  # per reference set, shared by its prompts: (images, ref_pixels, id_embedding, Reference)
    was_training = module.training
    module.eval()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for index in range(rank, len(items), world_size):
            item = items[index]
            name = f"{index:03d}_{item.identity}"
            key = tuple(item.references)
            try:
                if key not in prepared:
                    images, names = [read_image(p) for p in key], [str(p) for p in key]
                    prepared[key] = (images, *reference_inputs(evaluator.analyzer, images, clip_size, names),
                                     evaluator.prepare_reference(images, names))
            except NoFaceError as err:  # a bad eval-set entry is reported, not fatal
                per_video.append({"video": name, "prompt": item.prompt, "error": str(err)})
                continue
            images, ref_pixels, id_embedding, reference = prepared[key]
            frames = sample_video(pipe, cfg, item.prompt, ref_pixels, id_embedding, seed=cfg.seed + index,
                                  negative_prompt=item.negative_prompt)
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


def contact_sheet(path: Path, reference: np.ndarray, frames: np.ndarray, title: str, columns: int = 6) -> None:
    """The reference photo followed by uniformly sampled frames, in one row."""
    picks = np.linspace(0, len(frames) - 1, columns).round().astype(int)
    fig, axes = plt.subplots(1, columns + 1, figsize=(2 * (columns + 1), 2.3))
    axes[0].imshow(reference)
    axes[0].set_title("reference", fontsize=8)
    for ax, i in zip(axes[1:], picks):
        ax.imshow(frames[i])
        ax.set_title(f"frame {i}", fontsize=8)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)


def similarity_plot(path: Path, similarities: list, title: str) -> None:
    """ID similarity per sampled frame; frames without a detected face are marked with x at 0."""
    fig, ax = plt.subplots(figsize=(5, 2.5))
    xs = range(len(similarities))
    ax.plot([x for x in xs if similarities[x] is not None], [s for s in similarities if s is not None], "o-", label="face found")
    missing = [x for x in xs if similarities[x] is None]
    if missing:
        ax.plot(missing, [0] * len(missing), "rx", label="no face")
    ax.set(xlabel="sampled frame", ylabel="ID similarity", ylim=(-0.05, 1.05), title=title[:60])
    ax.legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)


class MLflowEvaluationCallback(Callback):
    def __init__(self, cfg: DictConfig, stage: str):
        self.cfg, self.stage = cfg, stage
        self.probe = None  # the identity-reliance probe: its fixed batch is built once
        self.reliance_step = None  # the step the probe last ran at

    def _probe(self, module) -> RelianceProbe:
        if self.probe is None:
            self.probe = RelianceProbe.from_config(self.cfg, module.transformer.face_encoder.clip_image_size)
        return self.probe

    def _run(self, trainer, module) -> None:
        logger = trainer.logger
        run_id = trainer.strategy.broadcast(getattr(logger, "run_id", None) if trainer.is_global_zero else None)
        if run_id is None:
            return
        # Under bf16-mixed the frozen modules are bf16 and the trainable ones fp32: sample in the
        # same autocast as the training step. With ema.enabled, the EMA weights are evaluated.
        ema = find_ema(trainer)
        with torch.no_grad(), trainer.precision_plugin.forward_context(), ema.swapped_in() if ema else nullcontext():
            evaluate_model(module, self.cfg, self.stage, logger.experiment, run_id,  # fit's outage-proof client
                           trainer.global_step, trainer.global_rank, trainer.world_size, self._probe(module))
        self.reliance_step = trainer.global_step

    def _run_reliance(self, trainer, module) -> None:
        """The identity-reliance probe alone, every eval.reliance_every_n_steps: a learning curve in MLflow."""
        logger = trainer.logger
        run_id = trainer.strategy.broadcast(getattr(logger, "run_id", None) if trainer.is_global_zero else None)
        if run_id is None or self.reliance_step == trainer.global_step:  # gradient accumulation repeats a step
            return
        ema = find_ema(trainer)
        with torch.no_grad(), trainer.precision_plugin.forward_context(), ema.swapped_in() if ema else nullcontext():
            result = self._probe(module).measure(module)  # every rank: FSDP's forward passes are collective
        self.reliance_step = trainer.global_step
        if trainer.is_global_zero:
            for key, value in result.metrics().items():
                logger.experiment.log_metric(run_id, f"eval/{self.stage}/{key}", value, step=trainer.global_step)

    def on_train_start(self, trainer, module):
        if self.cfg.eval.reliance_every_n_steps:
            self._run_reliance(trainer, module)  # the curve's first point: exactly 0 on a fresh model

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        n = self.cfg.eval.every_n_steps
        if n and trainer.global_step % n == 0 and trainer.global_step < trainer.max_steps:
            self._run(trainer, module)
        r = self.cfg.eval.reliance_every_n_steps
        if r and trainer.global_step % r == 0 and trainer.global_step < trainer.max_steps:
            self._run_reliance(trainer, module)

    def on_train_end(self, trainer, module):
        self._run(trainer, module)
