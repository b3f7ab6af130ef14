"""python -m mm_lightning sync-run RUN_DIR [--tracking-uri URI]

While the tracking store is down, fit keeps training and writes the tracking calls it could
not make to RUN_DIR/tracking_backlog.jsonl (artifacts next to it). This pushes them, in
order, to the store the run was created in (or --tracking-uri), then removes the backlog.
"""

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="the run folder (runs/<experiment>/<timestamp>)")
    parser.add_argument("--tracking-uri", help="the store to push to (default: the one recorded in RUN_DIR/run.json)")


def run(args: argparse.Namespace) -> int:
    from mm_lightning.tracking import BACKLOG_FILE, sync_run

    if not (args.run_dir / "run.json").exists():
        raise FileNotFoundError(f"{args.run_dir} is not a run folder (no run.json)")
    pushed = sync_run(args.run_dir, args.tracking_uri)
    print(
        f"sync-run: pushed {pushed} tracking calls from {args.run_dir / BACKLOG_FILE}"
        if pushed
        else f"sync-run: nothing to push in {args.run_dir}"
    )
    return 0
