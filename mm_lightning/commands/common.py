"""Arguments shared by the commands that load an experiment."""

import argparse

from mm_lightning.config import load_config


def add_experiment_arguments(parser: argparse.ArgumentParser, default_experiment: str | None = "full") -> None:
    parser.add_argument(
        "--experiment",
        default=default_experiment,
        required=default_experiment is None,
        help="a built-in experiment (experiments/<name>.yaml) or a path to your own .yaml, which "
        "composes over base.yaml the same way (default: %(default)s)",
    )
    parser.add_argument(
        "--profile",
        default="tiny",
        help="sizes and weight paths: tiny (default), cogvideox-5b, cogvideox-2b, "
        "cogvideox1.5-5b, or a path to a .yaml",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. seed=3 trainer.precision=bf16-mixed"
    )


def config_from_args(args: argparse.Namespace):
    return load_config(args.experiment, args.profile, args.overrides)
