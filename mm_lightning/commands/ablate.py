"""`python -m mm_lightning ablate`: train every (variant, seed) pair of an ablation matrix.

Each pair is its own MLflow run in one experiment, tagged mm.variant, mm.seed,
mm.matrix_id and mm.role=train; `python -m mm_lightning table` reads them back. The
matrix id is derived from what defines the matrix, so running the same command again
skips the pairs that already FINISHED and retries the rest.
"""

import argparse
import hashlib
import json
import sys
import time
import traceback
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--experiments", help="comma-separated variants (default: every experiments/*.yaml except base.yaml)"
    )
    parser.add_argument("--seeds", type=int, default=2, help="seeds 0..N-1 for every variant")
    parser.add_argument("--profile", default="tiny", help="sizes and weight paths: tiny (default) or cogvideox-5b")
    parser.add_argument("--mlflow-experiment", default="ablation", help="MLflow experiment holding every run")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")


def matrix_id(profile: str, overrides: list[str], seeds: list[int], variants: list[str]) -> str:
    # Override order matters (the last one wins); the order variants are listed in does not.
    key = json.dumps([profile, list(overrides), list(seeds), sorted(variants)])
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def _pair_runs(client, experiment_name: str, matrix: str, variant: str, seed: int) -> list:
    """The earlier attempts at this pair in this matrix, of any status."""
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return []
    return client.search_runs(
        [experiment.experiment_id],
        f"tags.`mm.role` = 'train' and tags.`mm.matrix_id` = '{matrix}' "
        f"and tags.`mm.variant` = '{variant}' and tags.`mm.seed` = '{seed}'",
    )


def run_matrix(variants: list[str], seeds: list[int], profile: str, mlflow_experiment: str, overrides: list[str]):
    """Trains every pair not yet FINISHED in this matrix.

    Returns the matrix id, the tracking URI of the runs and the failed pairs as
    (variant, seed, error) tuples.
    """
    # Imported here: the CLI builds every command's parser, and these imports take seconds.
    from mlflow import MlflowClient

    from mm_lightning.config import load_config
    from mm_lightning.tracking import tracking_uri
    from mm_lightning.curriculum import fit

    matrix = matrix_id(profile, overrides, seeds, variants)
    pairs = [(variant, seed) for variant in variants for seed in seeds]
    uri, failures = tracking_uri(), []
    for index, (variant, seed) in enumerate(pairs, 1):
        label = f"[{index}/{len(pairs)}] {variant} seed={seed}"
        started = time.monotonic()
        try:
            cfg = load_config(
                variant, profile, [*overrides, f"seed={seed}", f"tracking.experiment_name={mlflow_experiment}"]
            )
            uri = tracking_uri(cfg)
            earlier = _pair_runs(MlflowClient(uri), mlflow_experiment, matrix, variant, seed)
            if any(run.info.status == "FINISHED" for run in earlier):
                print(f"{label} ... skipped (finished)", flush=True)
                continue
            # Seeds of one variant would otherwise share (and resume from) one output folder.
            cfg.output_dir = str(Path(cfg.output_dir) / matrix / f"seed{seed}")
            print(f"{label} ... started", flush=True)
            tags = {"mm.variant": variant, "mm.seed": str(seed), "mm.matrix_id": matrix, "mm.role": "train"}
            # An earlier attempt that did not finish may have left checkpoints to resume from.
            fit(cfg, resume=bool(earlier), tags=tags)
        except Exception as err:  # one failed pair must not stop the others
            traceback.print_exc(file=sys.stderr)
            failures.append((variant, seed, f"{type(err).__name__}: {err}"))
            print(f"{label} ... FAILED: {failures[-1][2]}", flush=True)
        else:
            print(f"{label} ... done in {time.monotonic() - started:.0f}s", flush=True)
    return matrix, uri, failures


def run(args: argparse.Namespace) -> int:
    from mm_lightning.config import list_experiments
    from mm_lightning.tracking import tracking_uri

    variants = args.experiments.split(",") if args.experiments else list_experiments()
    seeds = list(range(args.seeds))
    matrix, uri, failures = run_matrix(variants, seeds, args.profile, args.mlflow_experiment, args.overrides)
    if failures:
        print(f"\n{len(failures)} of {len(variants) * len(seeds)} pairs FAILED (rerun the same command to retry them):")
        for variant, seed, error in failures:
            print(f"  {variant} seed={seed}: {error}")
    command = f"python -m mm_lightning table --mlflow-experiment {args.mlflow_experiment} --matrix-id {matrix}"
    if uri != tracking_uri():
        command += f" --tracking-uri {uri}"
    print(f"\nmatrix {matrix}; the table:\n  {command}")
    return 1 if failures else 0
