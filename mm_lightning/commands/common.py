"""Arguments shared by the commands that load an experiment."""

import argparse

from ..config import load_config


def add_experiment_arguments(parser: argparse.ArgumentParser, default_experiment: str | None = "full") -> None:
    parser.add_argument("--experiment", default=default_experiment, required=default_experiment is None,
                        help="experiment YAML in experiments/ (default: %(default)s)")
    parser.add_argument("--profile", default="tiny", help="sizes and weight paths: tiny (default) or cogvideox-5b")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. seed=3 trainer.precision=bf16-mixed")


def config_from_args(args: argparse.Namespace):
    return load_config(args.experiment, args.profile, args.overrides)
