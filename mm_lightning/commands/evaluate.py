"""python -m mm_lightning evaluate --checkpoint CKPT [--experiment NAME] [key=value ...]

The evaluation the training callback runs at the end of each stage, standalone: generate
the eval set with the checkpoint, score it, run the identity-reliance probe at the
checkpoint's stage (eval/<stage>/id_reliance, mm_lightning/reliance.py), log metrics and
artifacts to a new MLflow run."""


def add_arguments(parser):
    parser.add_argument("--checkpoint", required=True, help="a final.ckpt (or last.ckpt) written by fit")
    parser.add_argument(
        "--experiment", default=None, help="rebuild from this experiment instead of the checkpoint's config"
    )
    parser.add_argument(
        "--profile", default="tiny", help="with --experiment: a profile name (tiny, cogvideox-5b, ...) or a YAML path"
    )
    parser.add_argument(
        "--mlflow-experiment", default=None, help="MLflow experiment (default: the config's tracking.experiment_name)"
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="e.g. eval.eval_set=my_set.yaml eval.max_videos=0"
    )


def run(args) -> int:
    from mlflow.tracking import MlflowClient

    from mm_lightning.evaluation_run import evaluate_model
    from mm_lightning.module import MagicMirrorModule
    from mm_lightning.tracking import (
        MLFLOW_RUN_NAME,
        TAG_CHECKPOINT,
        TAG_ROLE,
        ensure_experiment,
        run_tags,
        tracking_uri,
        ui_command,
    )

    module = MagicMirrorModule.from_checkpoint(args.checkpoint, args.overrides, args.experiment, args.profile)
    cfg = module.cfg
    uri = tracking_uri(cfg)
    client = MlflowClient(uri)
    experiment_id = ensure_experiment(client, args.mlflow_experiment or cfg.tracking.experiment_name, uri)
    tags = {
        **run_tags(cfg),
        TAG_ROLE: "evaluate",
        TAG_CHECKPOINT: str(args.checkpoint),
        MLFLOW_RUN_NAME: f"eval-{cfg.experiment}",
    }
    run_id = client.create_run(experiment_id, tags=tags).info.run_id
    metrics = evaluate_model(module, cfg, module.stage, client, run_id, step=0)
    client.set_terminated(run_id, "FINISHED")
    width = max(map(len, metrics))
    print("\n".join(f"{k:<{width}}  {v:.4f}" for k, v in metrics.items()))
    print(f"MLflow run {run_id}; browse it with:\n  {ui_command(uri, run_id)}")
    return 0
