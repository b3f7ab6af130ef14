"""`python -m mm_lightning <command> --help`. Each command lives in mm_lightning/commands/<name>.py
and exposes `add_arguments(parser)` and `run(args) -> exit code`."""

from __future__ import annotations

import argparse
import importlib
import sys

from mm_lightning.quiet import quiet_third_party

COMMANDS = {
    "describe": "print the resolved config and per-component parameter counts",
    "fit": "train an experiment through its curriculum (image pre-training, video fine-tuning)",
    "generate": "generate a video from face photo(s) and a prompt with a trained checkpoint",
    "evaluate": "run the evaluation benchmark on a checkpoint and log it to MLflow",
    "ablate": "run the ablation matrix (variants x seeds), one MLflow run each",
    "table": "regenerate the ablation table from the MLflow store",
    "score": "score any videos with the paper's metrics (Table-1-style comparison)",
    "prepare": "build a training set (metadata.jsonl) from a folder of raw clips and photos",
    "cache": "precompute VAE latents and T5 prompt embeddings for a dataset",
    "bench": "time the adapted model against the bare backbone and ConsisID (GPU benchmark)",
    "bench-metrics": "time the offline metrics on one 49-frame 480x720 video",
    "snapshot": "write a random-weights snapshot of a profile (e.g. CogVideoX-5B) for checks without real weights",
    "sync-run": "push what a tracking-store outage kept in a run folder to the store",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mm_lightning", description="MagicMirror experiments on Lightning.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f"mm_lightning.commands.{name.replace('-', '_')}")
        command = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(command)
        command.add_argument(
            "--verbose",
            action="store_true",
            help="show third-party warnings, logs and weight-loading bars (hidden by default)",
        )
        command.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with quiet_third_party(enabled=not args.verbose):  # before the imports below: some libraries warn on import
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from mm_lightning.config import ConfigError
    from mm_lightning.faces import NoFaceError
    from mm_lightning.memory import TrainingOutOfMemoryError
    from mm_lightning.models.loading import MissingWeightsError
    from mm_lightning.tracking import TrackingStoreError

    try:
        return args.run(args)
    except (
        ConfigError,
        MissingWeightsError,
        NoFaceError,
        FileNotFoundError,
        TrainingOutOfMemoryError,
        TrackingStoreError,
        FloatingPointError,  # the module's NonFiniteLossError: a non-finite loss or gradient, weights kept
    ) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
