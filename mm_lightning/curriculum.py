"""The staged curriculum: image pre-training, then video fine-tuning, as declared in the YAML.

`fit` runs the stages of `cfg.curriculum.order` in order on one MagicMirrorModule, so each
stage starts from the previous stage's trained weights. Each stage is one Lightning
`Trainer.fit` with its own data, batch size, step budget and LR schedule. Lightning
writes the checkpoints (atomically: it saves through an fsspec transaction, i.e. a
temporary file that is moved into place).

A run lives in `<output_dir>/<timestamp>/`:
  run.json                      MLflow run id and the stages already finished
  config.yaml                   the resolved config
  checkpoints/<stage>/last.ckpt  latest periodic checkpoint (trainable weights + optimiser)
  checkpoints/<stage>/on_exception.ckpt  written when a stage dies of an exception
  checkpoints/<stage>/final.ckpt         the stage's trained weights, once it finished
`fit(..., resume=True)` takes the newest run folder and continues in the right stage at
the right step.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only
from mlflow.entities import Param
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from callbacks.progress import StageProgressBar

from .data.datamodule import MagicMirrorDataModule
from .data.latent_cache import open_cache
from .module import MagicMirrorModule
from .tracking import ensure_experiment, flatten_config, run_tags, tracking_uri, ui_command


class RunState:
    """run.json: what survives an interruption besides the checkpoints."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "run.json"
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {"mlflow_run_id": None, "finished_stages": []}

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2))
        tmp.replace(self.path)


RUN_DIR_ENV = "MM_LIGHTNING_RUN_DIR"


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
        raise RuntimeError(f"rank {rank_zero_only.rank} cannot tell which run folder rank 0 uses: "
                           f"set ${RUN_DIR_ENV} to the same folder on every node")
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
    raise TimeoutError(f"rank {rank_zero_only.rank}: rank 0 wrote no MLflow run id to {state.path} in {timeout_s:.0f} s")


def _latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The checkpoint with the most steps among last.ckpt and on_exception.ckpt."""
    best, best_step = None, -1
    for path in (ckpt_dir / "last.ckpt", ckpt_dir / "on_exception.ckpt"):
        if path.exists():
            step = torch.load(path, map_location="cpu", weights_only=False).get("global_step", 0)
            if step > best_step:
                best, best_step = path, step
    return best


def build_datamodule(cfg: DictConfig, stage: str, clip_image_size: int, use_cache: bool | None = None):
    """The stage's data: its latent cache when one was built (`cache` command), else decoded media."""
    if cfg.data.use_cache if use_cache is None else use_cache:
        cached = open_cache(cfg, stage)
        if cached is not None:
            return cached
    s = cfg.curriculum.stages[stage]
    return MagicMirrorDataModule(
        root=cfg.data.root, cache_dir=cfg.cache_dir, kind=s.data, frames=s.frames, height=s.height, width=s.width,
        batch_size=s.batch_size, num_workers=cfg.data.num_workers, clip_image_size=clip_image_size,
        face_backend=cfg.faces.backend, insightface_root=cfg.faces.insightface_root,
        insightface_model=cfg.faces.insightface_model, seed=cfg.seed, fps=cfg.data.fps,
    )


def build_trainer(cfg: DictConfig, stage: str, logger, callbacks: list, run_dir: Path) -> L.Trainer:
    s, t = cfg.curriculum.stages[stage], cfg.trainer
    return L.Trainer(
        max_steps=s.max_steps,
        accumulate_grad_batches=s.accumulate_grad_batches,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=strategy(cfg),
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


def strategy(cfg: DictConfig):
    """Lightning's own strategies; FSDP shards at the CogVideoX block level."""
    name = cfg.trainer.strategy
    if name == "fsdp":
        from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock
        from lightning.pytorch.strategies import FSDPStrategy

        from .models.adapter import MagicMirrorBlock

        # use_orig_params: frozen and trainable weights share the wrapped units.
        return FSDPStrategy(auto_wrap_policy={CogVideoXBlock, MagicMirrorBlock}, use_orig_params=True)
    if name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        # The frozen backbone takes no part in the gradient all-reduce; unused adapters
        # (e.g. CAN in a variant without it) do not exist, so no unused-parameter search.
        return DDPStrategy(find_unused_parameters=False)
    return name  # "auto", "deepspeed_stage_2", ...


def fit(cfg: DictConfig, resume: bool = False, tags: dict[str, str] | None = None) -> str:
    """Trains every stage of the curriculum; returns the MLflow run id."""
    # The frozen backbone, VAE, T5 and CLIP stay in eval mode on purpose.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    L.seed_everything(cfg.seed, workers=True)
    run_dir = _run_dir(cfg, resume)
    inherited = os.environ.get(RUN_DIR_ENV)
    os.environ[RUN_DIR_ENV] = str(run_dir.resolve())  # for the processes Lightning launches
    try:
        return _fit_stages(cfg, run_dir, resume, tags)
    finally:  # ablate calls fit again in this process, for another run
        if inherited is None:
            del os.environ[RUN_DIR_ENV]


def _fit_stages(cfg: DictConfig, run_dir: Path, resume: bool, tags: dict[str, str] | None) -> str:
    state = RunState(run_dir)
    rank_zero = rank_zero_only.rank == 0  # the other ranks train; they log and write nothing
    uri = tracking_uri(cfg)
    client = MlflowClient(uri)
    if not rank_zero:
        state.data["mlflow_run_id"] = _wait_for_run_id(state)
    elif state.data["mlflow_run_id"] is None:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        experiment_id = ensure_experiment(client, cfg.tracking.experiment_name, uri)
        run = client.create_run(experiment_id, tags={**run_tags(cfg), "mm.role": "train", **(tags or {})})
        params = list(flatten_config(cfg).items())
        for i in range(0, len(params), 100):
            client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params[i : i + 100]])
        client.log_artifact(run.info.run_id, str(run_dir / "config.yaml"))
        client.set_tag(run.info.run_id, "mm.run_dir", str(run_dir.resolve()))
        state.data["mlflow_run_id"] = run.info.run_id
        state.save()
    run_id = state.data["mlflow_run_id"]

    module = MagicMirrorModule(cfg, stage=cfg.curriculum.order[0])
    for stage in cfg.curriculum.order:
        ckpt_dir = run_dir / "checkpoints" / stage
        if stage in state.data["finished_stages"]:
            module.load_trainable(torch.load(ckpt_dir / "final.ckpt", map_location="cpu", weights_only=False)["state_dict"])
            continue
        module.set_stage(stage)
        datamodule = build_datamodule(cfg, stage, module.transformer.face_encoder.clip_image_size)
        callbacks = [
            ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0, every_n_train_steps=cfg.trainer.checkpoint_every_n_steps),
            OnExceptionCheckpoint(dirpath=ckpt_dir),
            StageProgressBar(stage),
            *stage_callbacks(cfg, stage),
        ]
        logger = MLFlowLogger(experiment_name=cfg.tracking.experiment_name, tracking_uri=uri, run_id=run_id)
        trainer = build_trainer(cfg, stage, logger, callbacks, run_dir)
        ckpt_path = _latest_checkpoint(ckpt_dir) if resume else None
        trainer.fit(module, datamodule=datamodule, **({"ckpt_path": ckpt_path} if ckpt_path else {}))
        if trainer.interrupted:
            raise KeyboardInterrupt(f"stage {stage} interrupted; continue with --resume")
        trainer.save_checkpoint(ckpt_dir / "final.ckpt", weights_only=True)  # every rank joins; rank 0 writes
        state.data["finished_stages"].append(stage)
        if not rank_zero:
            continue
        for reason, count in datamodule.skipped.items():
            client.log_metric(run_id, f"data/{stage}/skipped/{reason}", count)
        state.save()
        # Lightning's MLFlowLogger marks the run FINISHED after every trainer.fit; only the
        # last stage may leave it so (ablate and table count FINISHED runs as complete).
        client.update_run(run_id, status="RUNNING")

    final = run_dir / "checkpoints" / cfg.curriculum.order[-1] / "final.ckpt"
    if not rank_zero:
        return run_id
    client.log_artifact(run_id, str(final), artifact_path="checkpoint")
    client.set_tag(run_id, "mm.completed", "true")
    client.set_terminated(run_id, "FINISHED")
    print(f"\nfinished {cfg.experiment}: checkpoint {final}\nMLflow run {run_id}; browse it with:\n  {ui_command(uri)}")
    return run_id


def stage_callbacks(cfg: DictConfig, stage: str) -> list:
    """Per-stage extras: the MLflow evaluation callback when enabled."""
    if not cfg.eval.enabled:
        return []
    from callbacks.evaluation import MLflowEvaluationCallback

    return [MLflowEvaluationCallback(cfg, stage)]
