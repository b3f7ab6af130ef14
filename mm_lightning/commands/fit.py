"""python -m mm_lightning fit --experiment NAME [--profile P] [--resume] [key=value ...]"""

from ..config import to_yaml
from .common import add_experiment_arguments, config_from_args


def add_arguments(parser):
    add_experiment_arguments(parser)
    parser.add_argument("--resume", action="store_true", help="continue the newest run of this experiment where it stopped")


def run(args) -> int:
    from ..curriculum import fit

    cfg = config_from_args(args)
    print(to_yaml(cfg))
    fit(cfg, resume=args.resume)
    return 0
