"""python -m mm_lightning fit --experiment NAME [--profile P] [--resume] [--tag k=v ...] [key=value ...]

Exit codes: 0 finished; 2 bad input (config, weights, tracking store, unreadable checkpoints);
143 stopped by SIGTERM and 130 by SIGINT, after checkpointing (the MLflow run is KILLED and
`--resume` continues it); 1 any other error.
"""

import os
import shlex
import sys

from mm_lightning.commands.common import add_experiment_arguments, config_from_args
from mm_lightning.config import to_yaml


def add_arguments(parser):
    add_experiment_arguments(parser)
    parser.add_argument(
        "--resume", action="store_true", help="continue the newest run of this experiment where it stopped"
    )
    parser.add_argument(
        "--tag",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an extra MLflow tag on the run (repeatable); ablate tags each pair this way",
    )


def run(args) -> int:
    from mm_lightning.checkpoints import ResumeError
    from mm_lightning.curriculum import Preempted, fit

    cfg = config_from_args(args)
    bad = [tag for tag in args.tag if "=" not in tag]
    if bad:
        print(f"error: --tag {bad[0]!r} is not KEY=VALUE", file=sys.stderr)
        return 2
    print(to_yaml(cfg))
    try:
        fit(cfg, resume=args.resume, tags=dict(tag.split("=", 1) for tag in args.tag))
    except ResumeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Preempted as stopped:
        print(
            f"fit: {stopped}; MLflow run KILLED; resume with: {resume_command(args, stopped.run_dir)}",
            file=sys.stderr,
            flush=True,
        )
        return 128 + stopped.signum  # the shell's convention: 143 for SIGTERM, 130 for SIGINT
    return 0


def resume_command(args, run_dir) -> str:
    """The command line that continues a stopped run (naming its folder when it was named for this one)."""
    from mm_lightning.tracking import RUN_DIR_ENV

    argv = [
        "python",
        "-m",
        "mm_lightning",
        "fit",
        "--experiment",
        args.experiment,
        "--profile",
        args.profile,
        *[f"--tag={tag}" for tag in args.tag],
        "--resume",
        *args.overrides,
    ]
    prefix = f"{RUN_DIR_ENV}={shlex.quote(str(run_dir))} " if os.environ.get(RUN_DIR_ENV) else ""
    return prefix + shlex.join(argv)
