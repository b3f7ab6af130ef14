"""The staged curriculum: image pre-training, then video fine-tuning, as declared in the YAML.

`fit` runs the stages of `cfg.curriculum.order` in order on one MagicMirrorModule, so each
stage starts from the previous stage's trained weights. Each stage is one Lightning
`Trainer.fit` with its own data, batch size, step budget and LR schedule. Lightning
writes the checkpoints, through `checkpoints.AtomicCheckpointIO`: a file beside each one, renamed
into place, so a kill mid-write leaves the previous checkpoint whole.

A run lives in `<output_dir>/<timestamp>/`:
  run.json                      MLflow run id and the stages already finished
  config.yaml                   the resolved config
  checkpoints/<stage>/step=N.ckpt  periodic checkpoints (trainable weights + optimiser), the newest kept
  checkpoints/<stage>/last.ckpt    a link to the newest step=N.ckpt
  checkpoints/<stage>/on_exception.ckpt  written when a stage dies of an exception after its first step
  checkpoints/<stage>/final.ckpt         the stage's trained weights, once it finished
Under DeepSpeed the periodic checkpoints are folders of per-rank shards, and final.ckpt is joined
into one file (mm_lightning/checkpoints.py). `fit(..., resume=True)` takes the newest run folder
and continues in the right stage at the right step.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import torch
from filelock import FileLock, Timeout
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from mlflow.entities import Param
from omegaconf import DictConfig, OmegaConf

from mm_lightning.callbacks.exception_checkpoint import ExceptionCheckpoint
from mm_lightning.callbacks.progress import StageProgressBar
from mm_lightning.callbacks.step_checkpoint import StepCheckpoint
from mm_lightning.checkpoints import AtomicCheckpointIO, ResumeError, latest_checkpoint, save_stage_weights
from mm_lightning.config import ConfigError
from mm_lightning.data.datamodule import MagicMirrorDataModule
from mm_lightning.data.latent_cache import open_cache
from mm_lightning.ema import ema_callbacks
from mm_lightning.memory import out_of_memory_error
from mm_lightning.module import MagicMirrorModule
from mm_lightning.strategies import refuse_compiled_training_on_cuda, strategy
from mm_lightning.tracking import (
    RUN_DIR_ENV,
    RUN_LOCK_FILE,
    TAG_COMPLETED,
    TAG_ROLE,
    TAG_RUN_DIR,
    RunClient,
    ensure_experiment,
    flatten_config,
    open_store,
    run_tags,
    tracking_uri,
    ui_command,
)


class RunState:
    """run.json: what survives an interruption besides the checkpoints."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "run.json"
        self.data = (
            json.loads(self.path.read_text()) if self.path.exists() else {"mlflow_run_id": None, "finished_stages": []}
        )

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2))
        tmp.replace(self.path)


class Interrupted(BaseException):
    """SIGTERM/SIGINT outside Lightning's own handling (a BaseException, like KeyboardInterrupt)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Preempted(Exception):
    """fit stopped by a signal after checkpointing; the MLflow run is KILLED and --resume continues it."""

    def __init__(self, signum: int, stage: str | None, step: int, checkpoint: Path | None, run_dir: Path):
        where = f"in stage {stage} at step {step}" if stage else "before training"
        super().__init__(
            f"stopped by {signal.Signals(signum).name} {where}" + (f"; checkpoint {checkpoint}" if checkpoint else "")
        )
        self.signum, self.stage, self.step, self.checkpoint, self.run_dir = signum, stage, step, checkpoint, run_dir


class StopSignals:
    """SIGTERM (what schedulers send before a kill) and SIGINT stop fit cleanly.

    Inside `trainer.fit` Lightning handles SIGTERM itself: it finishes the batch, writes
    on_exception.ckpt and raises SIGTERMException (it calls this handler too). Anywhere else,
    and for SIGINT, the handler raises Interrupted at once; Lightning's exception path still
    writes on_exception.ckpt when that happens inside a stage."""

    def __init__(self):
        self.received: int | None = None
        self.stage: str | None = None
        self.trainer: L.Trainer | None = None
        self.in_trainer = False

    def __enter__(self):
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.received is not None and not self.in_trainer:
            return  # already stopping: a second signal must not cut the checkpoint or the status update short
        self.received = signum
        # Lightning composes this handler into its own once a stage's loop starts; before
        # that (data and model set-up), or for SIGINT, nothing is lost by stopping at once.
        lightning_handles_it = signum == signal.SIGTERM and self.in_trainer and signal.getsignal(signum) != self._handle
        if not lightning_handles_it:
            raise Interrupted(signum)

    def stage_started(self, stage: str) -> None:
        """Between stages: a signal that came during the last stage's evaluation stops fit here."""
        self.stage, self.trainer = stage, None
        if self.received:
            raise Interrupted(self.received)

    @contextmanager
    def training(self, trainer: L.Trainer):
        """Around trainer.fit: SIGTERM is Lightning's to handle."""
        self.trainer, self.in_trainer = trainer, True
        try:
            yield
        finally:
            self.in_trainer = False


class RunLogger(MLFlowLogger):
    """Lightning's MLFlowLogger on fit's RunClient (so a store outage never stops training).

    fit sets the run's status itself: KILLED on a signal, FAILED on an error, FINISHED after the
    last stage, so the logger's own end-of-stage status update is left out."""

    def __init__(self, client: RunClient, run_id: str):
        super().__init__(tracking_uri=client.tracking_uri, run_id=run_id)
        self._run_client = client

    @property
    def experiment(self) -> RunClient:
        return self._run_client

    def finalize(self, status: str = "success") -> None:
        pass


def _run_dir(cfg: DictConfig, resume: bool) -> Path:
    """The run folder, the same on every rank of a multi-process run.

    $MM_LIGHTNING_RUN_DIR names it when set: rank 0 sets it for the processes Lightning
    launches, and users set it for torchrun. Under SLURM it is <output_dir>/slurm-<job id>.
    Otherwise rank 0 makes a new timestamped folder, or takes the newest one on --resume."""
    if os.environ.get(RUN_DIR_ENV):
        run_dir = Path(os.environ[RUN_DIR_ENV])
    elif os.environ.get("SLURM_JOB_ID") and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        run_dir = Path(cfg.output_dir) / f"slurm-{os.environ['SLURM_JOB_ID']}"
    elif rank_zero_only.rank != 0:
        raise RuntimeError(
            f"rank {rank_zero_only.rank} cannot tell which run folder rank 0 uses: "
            f"set ${RUN_DIR_ENV} to the same folder on every node"
        )
    elif resume:
        runs = sorted(p for p in Path(cfg.output_dir).glob("*") if (p / "run.json").exists())
        if not runs:
            raise FileNotFoundError(f"--resume: no run to resume under {cfg.output_dir}")
        run_dir = runs[-1]
    else:
        run_dir = Path(cfg.output_dir) / time.strftime("%Y%m%d-%H%M%S")
        while run_dir.exists():  # two runs started in the same second
            run_dir = run_dir.with_name(run_dir.name + "_")
    if resume and rank_zero_only.rank == 0 and not (run_dir / "run.json").exists():
        raise FileNotFoundError(f"--resume: {run_dir} holds no run.json")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _wait_for_run_id(state: RunState, timeout_s: float = 600) -> str:
    """On ranks other than 0: the MLflow run id, once rank 0 has written it to run.json."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if state.path.exists():
            run_id = json.loads(state.path.read_text())["mlflow_run_id"]
            if run_id:
                return run_id
        time.sleep(1)
    raise TimeoutError(
        f"rank {rank_zero_only.rank}: rank 0 wrote no MLflow run id to {state.path} in {timeout_s:.0f} s"
    )


def build_datamodule(cfg: DictConfig, stage: str, clip_image_size: int, use_cache: bool | None = None):
    """The stage's data: its latent cache when one was built (`cache` command), else decoded media."""
    if cfg.data.use_cache if use_cache is None else use_cache:
        cached = open_cache(cfg, stage)
        if cached is not None:
            return cached
    s = cfg.curriculum.stages[stage]
    return MagicMirrorDataModule(
        root=cfg.data.root,
        cache_dir=cfg.cache_dir,
        kind=s.data,
        frames=s.frames,
        height=s.height,
        width=s.width,
        batch_size=s.batch_size,
        num_workers=cfg.data.num_workers,
        clip_image_size=clip_image_size,
        faces=cfg.faces,
        seed=cfg.seed,
        fps=cfg.data.fps,
    )


def frozen_models_needed(cfg: DictConfig) -> dict[str, bool]:
    """Whether fit must load T5 and the VAE: not when every stage trains from its latent cache,
    unless evaluation samples videos (both) or the identity loss decodes frames (the VAE)."""
    cached = cfg.data.use_cache and all(open_cache(cfg, stage) is not None for stage in cfg.curriculum.order)
    return {
        "text_encoder": not cached or cfg.eval.enabled,
        "vae": not cached or cfg.eval.enabled or cfg.loss.identity_weight > 0,
    }


def gradient_accumulation(stage_cfg: DictConfig, world_size: int, stage: str) -> int:
    """Micro-batches per optimizer step: global_batch = batch_size x accumulation x world_size."""
    if stage_cfg.global_batch is None:
        return stage_cfg.accumulate_grad_batches
    per_step = stage_cfg.batch_size * world_size
    if stage_cfg.global_batch % per_step:
        raise ConfigError(
            f"curriculum.stages.{stage}: global_batch {stage_cfg.global_batch} cannot be met with batch_size "
            f"{stage_cfg.batch_size} on {world_size} device(s): it must be a multiple of {per_step}; "
            f"change curriculum.stages.{stage}.batch_size or .global_batch"
        )
    return stage_cfg.global_batch // per_step


def build_trainer(cfg: DictConfig, stage: str, logger, callbacks: list, run_dir: Path) -> L.Trainer:
    s, t = cfg.curriculum.stages[stage], cfg.trainer
    refuse_compiled_training_on_cuda(cfg)
    trainer = L.Trainer(
        max_steps=s.max_steps,
        accumulate_grad_batches=s.accumulate_grad_batches,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=strategy(cfg),
        plugins=[] if t.strategy.startswith("deepspeed_stage_") else [AtomicCheckpointIO()],
        precision=t.precision,
        gradient_clip_val=cfg.optim.gradient_clip_val,
        deterministic=t.deterministic,
        log_every_n_steps=t.log_every_n_steps,
        logger=logger,
        callbacks=callbacks,
        default_root_dir=run_dir,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_model_summary=False,
    )
    # Only the built trainer knows the world size ("auto" devices, nodes); nothing has run yet.
    trainer.accumulate_grad_batches = gradient_accumulation(s, trainer.world_size, stage)
    return trainer


def fit(cfg: DictConfig, resume: bool = False, tags: dict[str, str] | None = None) -> str:
    """Trains every stage of the curriculum; returns the MLflow run id."""
    # The frozen backbone, VAE, T5 and CLIP stay in eval mode on purpose.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    uri = tracking_uri(cfg)
    open_store(uri)  # an unusable store stops fit here, before any training
    L.seed_everything(cfg.seed, workers=True)
    run_dir = _run_dir(cfg, resume)
    inherited = os.environ.get(RUN_DIR_ENV)
    os.environ[RUN_DIR_ENV] = str(run_dir.resolve())  # for the processes Lightning launches
    lock = FileLock(run_dir / RUN_LOCK_FILE)
    try:
        if rank_zero_only.rank == 0:
            try:
                lock.acquire(timeout=0)
            except Timeout:
                raise ResumeError(f"run folder {run_dir} is in use by another running fit") from None
        with StopSignals() as stop:
            try:
                return _fit_stages(cfg, run_dir, resume, tags, stop)
            except (Interrupted, SIGTERMException) as err:
                signum = err.signum if isinstance(err, Interrupted) else signal.SIGTERM
                trainer = stop.trainer
                ckpt = latest_checkpoint(run_dir / "checkpoints" / stop.stage) if stop.stage else None
                step = trainer.global_step if trainer else 0
                _mark_run(uri, run_dir, "KILLED")
                raise Preempted(signum, stop.stage, step, ckpt, run_dir) from None
            except Exception:
                _mark_run(uri, run_dir, "FAILED")
                raise
    finally:  # fit may run again in this process, for another run
        lock.release()
        if inherited is None:
            del os.environ[RUN_DIR_ENV]


def _mark_run(uri: str, run_dir: Path, status: str) -> None:
    """Ends the run's MLflow run with `status` (rank 0; nothing when the run was never created)."""
    run_id = RunState(run_dir).data["mlflow_run_id"]
    if rank_zero_only.rank == 0 and run_id:
        RunClient(uri, run_dir).set_terminated(run_id, status)


def _fit_stages(cfg: DictConfig, run_dir: Path, resume: bool, tags: dict[str, str] | None, stop: StopSignals) -> str:
    state = RunState(run_dir)
    rank_zero = rank_zero_only.rank == 0  # the other ranks train; they log and write nothing
    uri = tracking_uri(cfg)
    client = RunClient(uri, run_dir)
    if not rank_zero:
        state.data["mlflow_run_id"] = _wait_for_run_id(state)
    elif state.data["mlflow_run_id"] is None:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        experiment_id = ensure_experiment(client, cfg.tracking.experiment_name, uri)
        run = client.create_run(experiment_id, tags={**run_tags(cfg), TAG_ROLE: "train", **(tags or {})})
        params = list(flatten_config(cfg).items())
        for i in range(0, len(params), 100):
            client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params[i : i + 100]])
        client.log_artifact(run.info.run_id, str(run_dir / "config.yaml"))
        client.set_tag(run.info.run_id, TAG_RUN_DIR, str(run_dir.resolve()))
        state.data["mlflow_run_id"] = run.info.run_id
        state.data["tracking_uri"] = uri  # where sync-run pushes what an outage kept back
        state.save()
    else:  # resumed: a KILLED (or FAILED) run is running again
        client.update_run(state.data["mlflow_run_id"], status="RUNNING")
    run_id = state.data["mlflow_run_id"]

    module = MagicMirrorModule(cfg, stage=cfg.curriculum.order[0], **frozen_models_needed(cfg))
    for stage in cfg.curriculum.order:
        ckpt_dir = run_dir / "checkpoints" / stage
        stop.stage_started(stage)
        if stage in state.data["finished_stages"]:
            module.load_trainable(
                torch.load(ckpt_dir / "final.ckpt", map_location="cpu", weights_only=False)["state_dict"]
            )
            continue
        module.set_stage(stage)
        datamodule = build_datamodule(cfg, stage, module.transformer.face_encoder.clip_image_size)
        callbacks = [
            # The newest keep_checkpoints step=N.ckpt files; last.ckpt links to the newest, so a
            # corrupt one leaves the previous to resume from.
            StepCheckpoint(
                dirpath=ckpt_dir,
                filename="{step}",
                monitor="step",
                mode="max",
                save_last="link",
                save_top_k=cfg.trainer.keep_checkpoints,
                every_n_train_steps=cfg.trainer.checkpoint_every_n_steps,
            ),
            ExceptionCheckpoint(dirpath=ckpt_dir),
            StageProgressBar(stage),
            *ema_callbacks(cfg),  # before evaluation: an eval at step N sees the EMA updated at N
            *stage_callbacks(cfg, stage),
        ]
        logger = RunLogger(client, run_id)
        trainer = build_trainer(cfg, stage, logger, callbacks, run_dir)
        ckpt_path = latest_checkpoint(ckpt_dir) if resume else None
        if ckpt_path and rank_zero:
            print(f"resuming stage {stage} from {ckpt_path}", flush=True)
        try:
            with stop.training(trainer):
                trainer.fit(module, datamodule=datamodule, **({"ckpt_path": ckpt_path} if ckpt_path else {}))
        except torch.cuda.OutOfMemoryError as err:  # last.ckpt / on_exception.ckpt stay for --resume
            raise out_of_memory_error(cfg, stage, err) from None
        save_stage_weights(trainer, ckpt_dir / "final.ckpt")
        state.data["finished_stages"].append(stage)
        if not rank_zero:
            continue
        for reason, count in datamodule.skipped.items():
            client.log_metric(run_id, f"data/{stage}/skipped/{reason}", count)
        state.save()

    final = run_dir / "checkpoints" / cfg.curriculum.order[-1] / "final.ckpt"
    if not rank_zero:
        return run_id
    client.log_artifact(run_id, str(final), artifact_path="checkpoint")
    client.set_tag(run_id, TAG_COMPLETED, "true")
    client.set_terminated(run_id, "FINISHED")
    if client.unlogged:
        print(
            f"the tracking store missed {client.unlogged} calls; push them with: "
            f"python -m mm_lightning sync-run {run_dir}",
            file=sys.stderr,
        )
    print(
        f"\nfinished {cfg.experiment}: checkpoint {final}\n"
        f"MLflow run {run_id}; browse it with:\n  {ui_command(uri, run_id)}"
    )
    return run_id


def stage_callbacks(cfg: DictConfig, stage: str) -> list:
    """Per-stage extras: the MLflow evaluation callback when enabled."""
    if not cfg.eval.enabled:
        return []
    from mm_lightning.callbacks.evaluation import MLflowEvaluationCallback

    return [MLflowEvaluationCallback(cfg, stage)]
