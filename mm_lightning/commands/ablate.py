"""`python -m mm_lightning ablate`: train every (variant, seed) pair of an ablation matrix.

The pairs come from experiment YAMLs (`--experiments`, default every one) or from a matrix
file (`--matrix NAME|PATH`, see mm_lightning/ablation_matrix.py). Each pair is one job that
runs `python -m mm_lightning fit` in its own process, submitted through submitit:

- `--launcher local` (default) on this machine, `--parallel N` pairs at once (default 1);
- `--launcher slurm`, one SLURM job per pair, with the `launcher.*` config section
  (partition, account, nodes, gpus_per_node, timeout_min, sbatch_flags, setup) given as
  `launcher.key=value` arguments or set in a profile. It submits and returns.

Each run is tagged mm.variant, mm.seed, mm.matrix_id and mm.role=train; the matrix itself is
recorded as a run tagged mm.role=matrix. The matrix id is derived from what defines the
matrix, so the same command again submits only the pairs that are not finished and not
running, and `--status` lists every pair as pending / running / finished / failed /
preempted, from the tracking store.

A pair trains in a fixed run folder, runs/<variant>/<matrix id>/seed<N>, so a job that
starts again on a folder holding run.json runs `fit --resume`. Preemption goes through
submitit's checkpoint hook: on the scheduler's warning signal (USR2, launcher.signal_delay_s
before the time limit, or on preemption) `PairJob.checkpoint` sends SIGTERM to fit, which
checkpoints and marks its run KILLED; submitit then requeues the job, which resumes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

LAUNCHER_PREFIX = "launcher."  # overrides for the launcher only: not passed to fit, not part of the matrix id
STATUS_OF = {
    "FINISHED": "finished",
    "FAILED": "failed",
    "KILLED": "preempted",
    "RUNNING": "running",
    "SCHEDULED": "running",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--experiments", help="comma-separated variants (default: every experiments/*.yaml except base.yaml)"
    )
    which.add_argument("--matrix", help="an ablation matrix: a name in experiments/ablations/ or a YAML path")
    parser.add_argument("--seeds", type=int, default=2, help="seeds 0..N-1 for every variant")
    parser.add_argument("--profile", default="tiny", help="sizes and weight paths: tiny (default) or cogvideox-5b")
    parser.add_argument("--mlflow-experiment", default="ablation", help="MLflow experiment holding every run")
    parser.add_argument(
        "--launcher",
        choices=["local", "slurm"],
        default="local",
        help="local: jobs on this machine (default); slurm: one SLURM job per pair",
    )
    parser.add_argument(
        "--parallel", type=int, help="pairs running at once: locally (default 1), or of the SLURM array (default: all)"
    )
    parser.add_argument(
        "--status", action="store_true", help="show each pair's state from the tracking store, submit nothing"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides for every run; launcher.* ones configure the launcher",
    )


@dataclass(frozen=True)
class Pair:
    """One job of the matrix: a variant (row) trained with one seed."""

    key: str  # the variant or matrix row key; the runs' mm.variant
    seed: int
    experiment: str
    overrides: tuple[str, ...] = ()  # the row's own overrides, after the matrix-wide ones
    tags: tuple[tuple[str, str], ...] = ()  # the row's extra tags (matrix name, label, budget)

    @property
    def name(self) -> str:
        return f"{self.key} seed={self.seed}"


def matrix_id(profile: str, overrides: list[str], seeds: list[int], variants: list[str]) -> str:
    # Override order matters (the last one wins); the order variants are listed in does not.
    key = json.dumps([profile, list(overrides), list(seeds), sorted(variants)])
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def build_pairs(args: argparse.Namespace, overrides: list[str]) -> tuple[str, list[Pair]]:
    """The matrix id and its pairs, rows in order, seeds inner."""
    from mm_lightning.config import list_experiments

    seeds = list(range(args.seeds))
    if args.matrix:
        from mm_lightning.ablation_matrix import load_matrix

        matrix = load_matrix(args.matrix, args.profile, overrides)
        rows = [(row.key, row.experiment, tuple(row.overrides), tuple(row.tags.items())) for row in matrix.rows]
        # The rows' resolved overrides define the matrix: an edited file is a new matrix.
        keys = [f"{key}:{' '.join(row_overrides)}" for key, _, row_overrides, _ in rows]
    else:
        variants = args.experiments.split(",") if args.experiments else list_experiments()
        rows, keys = [(variant, variant, (), ()) for variant in variants], variants
    pairs = [
        Pair(key, seed, experiment, row_overrides, tags)
        for key, experiment, row_overrides, tags in rows
        for seed in seeds
    ]
    return matrix_id(args.profile, overrides, seeds, keys), pairs


def run_dir_of(cfg_output_root: str, pair: Pair, matrix: str) -> Path:
    return Path(cfg_output_root).resolve() / pair.key / matrix / f"seed{pair.seed}"


@dataclass
class PairJob:
    """What a submitit job runs: `fit` for one pair in its run folder, resuming when the folder holds a run.

    submitit pickles it into the job; `checkpoint` is submitit's preemption/timeout hook."""

    fit_args: list[str]
    run_dir: str
    env: dict[str, str] = field(default_factory=dict)

    def __call__(self) -> str:
        from mm_lightning.tracking import RUN_DIR_ENV

        resume = (Path(self.run_dir) / "run.json").exists()
        command = [sys.executable, "-m", "mm_lightning", "fit", *self.fit_args, *(["--resume"] if resume else [])]
        env = {**os.environ, **self.env, RUN_DIR_ENV: self.run_dir}
        self._process = subprocess.Popen(command, env=env)
        # Polled, not wait(): `checkpoint` runs in a signal handler while this loop is interrupted,
        # and Popen.wait() holds a lock that the handler's own poll() would then never get.
        while (code := self._process.poll()) is None:
            time.sleep(1)
        if code != 0:
            reason = {143: " (stopped by SIGTERM: preempted)", 130: " (stopped by SIGINT)", 2: " (bad input)"}
            raise RuntimeError(f"fit exited with {code}{reason.get(code, '')}; see {self.run_dir}")
        return self.run_dir

    def checkpoint(self, *args, **kwargs):
        """Preempted or near the time limit: fit checkpoints on SIGTERM, then the job is requeued (and resumes)."""
        from submitit.helpers import DelayedSubmission

        process = getattr(self, "_process", None)
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            while process.poll() is None:  # fit finishes its batch and writes on_exception.ckpt
                time.sleep(1)
        return DelayedSubmission(PairJob(self.fit_args, self.run_dir, self.env))


def make_executor(kind: str, folder: Path, launcher, parallel: int):
    """A submitit executor from the config's launcher section."""
    import submitit

    if kind == "local":
        executor = submitit.LocalExecutor(folder=folder, max_num_timeout=launcher.max_requeues)
        executor.update_parameters(timeout_min=launcher.timeout_min, signal_delay_s=launcher.signal_delay_s)
        return executor
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=launcher.max_requeues)
    executor.update_parameters(**slurm_parameters(launcher, parallel))
    return executor


def slurm_parameters(launcher, parallel: int) -> dict:
    """submitit's SlurmExecutor parameters (its names for the #SBATCH options)."""
    gpus = launcher.gpus_per_node
    optional = {
        "partition": launcher.partition,
        "account": launcher.account,
        "gpus_per_node": gpus or None,
        "cpus_per_task": launcher.cpus_per_task,
        "additional_parameters": dict(launcher.sbatch_flags) or None,
        "setup": list(launcher.setup) or None,
    }
    return {
        "time": launcher.timeout_min,
        "nodes": launcher.nodes,
        "ntasks_per_node": max(1, gpus),  # a task per GPU
        "signal_delay_s": launcher.signal_delay_s,
        "array_parallelism": parallel,
        **{key: value for key, value in optional.items() if value is not None},
    }


def pair_states(client, experiment_name: str, matrix: str, pairs: list[Pair]) -> dict[Pair, tuple[str, object]]:
    """Each pair's state and its newest run (None when pending), from the tracking store.

    A run left RUNNING by a process that died without a word (SIGKILL, node failure) counts
    as failed: no fit holds its run folder's lock any more."""
    from filelock import FileLock, Timeout

    from mm_lightning.tracking import RUN_LOCK_FILE, TAG_RUN_DIR, TAG_SEED, TAG_VARIANT

    experiment = client.get_experiment_by_name(experiment_name)
    runs = (
        []
        if experiment is None
        else client.search_runs(
            [experiment.experiment_id],
            f"tags.`mm.role` = 'train' and tags.`mm.matrix_id` = '{matrix}'",
            order_by=["attributes.start_time DESC"],
            max_results=10000,
        )
    )
    newest = {}
    for run in runs:
        newest.setdefault((run.data.tags.get(TAG_VARIANT), run.data.tags.get(TAG_SEED)), run)
    states = {}
    for pair in pairs:
        run = newest.get((pair.key, str(pair.seed)))
        state = "pending" if run is None else STATUS_OF.get(run.info.status, run.info.status.lower())
        run_dir = Path(run.data.tags.get(TAG_RUN_DIR, "")) if run else None
        if state == "running" and run_dir and run_dir.is_dir():
            try:
                with FileLock(run_dir / RUN_LOCK_FILE, timeout=0):
                    state = "failed"  # nobody holds it: the process is gone
            except Timeout:
                pass
        states[pair] = (state, run)
    return states


def record_matrix(client, experiment_id: str, matrix: str, pairs: list[Pair], argv: list[str]) -> None:
    """The matrix as its own run (mm.role=matrix), once: its pairs and the command line."""
    from mm_lightning.tracking import TAG_MATRIX_ID, TAG_ROLE

    existing = client.search_runs([experiment_id], f"tags.`mm.role` = 'matrix' and tags.`mm.matrix_id` = '{matrix}'")
    if existing:
        return
    run = client.create_run(
        experiment_id, run_name=f"matrix-{matrix}", tags={TAG_ROLE: "matrix", TAG_MATRIX_ID: matrix}
    )
    listing = [
        {"variant": p.key, "seed": p.seed, "experiment": p.experiment, "overrides": list(p.overrides)} for p in pairs
    ]
    client.log_dict(run.info.run_id, {"matrix_id": matrix, "command": argv, "pairs": listing}, "matrix.json")
    client.set_terminated(run.info.run_id)


def run(args: argparse.Namespace) -> int:
    # Imported here: the CLI builds every command's parser, and these imports take seconds.
    from mlflow import MlflowClient

    from mm_lightning.config import load_config
    from mm_lightning.tracking import (
        TAG_MATRIX_ID,
        TAG_ROLE,
        TAG_SEED,
        TAG_VARIANT,
        ensure_experiment,
        open_store,
        tracking_uri,
    )

    if args.parallel is not None and args.parallel < 1:
        print("error: --parallel must be at least 1", file=sys.stderr)
        return 2
    launcher_overrides = [o for o in args.overrides if o.startswith(LAUNCHER_PREFIX)]
    overrides = [o for o in args.overrides if not o.startswith(LAUNCHER_PREFIX)]
    matrix, pairs = build_pairs(args, overrides)
    first = load_config(pairs[0].experiment, args.profile, [*overrides, *pairs[0].overrides, *launcher_overrides])
    uri = tracking_uri(first)
    if uri.startswith("sqlite:///"):  # jobs may start elsewhere (another folder, a cluster node)
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///") :]).resolve())
    open_store(uri)
    client = MlflowClient(uri)
    states = pair_states(client, args.mlflow_experiment, matrix, pairs)
    if args.status:
        return print_status(matrix, states)

    experiment_id = ensure_experiment(client, args.mlflow_experiment, uri)
    record_matrix(client, experiment_id, matrix, pairs, sys.argv)
    todo = [p for p in pairs if states[p][0] in ("pending", "failed", "preempted")]
    for pair in pairs:
        if pair not in todo:
            print(f"{pair.name} ... skipped ({states[pair][0]})", flush=True)
    output_root = str(Path(first.output_dir).parent)  # output_dir is runs/<experiment>
    parallel = args.parallel or (1 if args.launcher == "local" else max(1, len(todo)))
    threads = max(1, (os.cpu_count() or 1) // parallel) if args.launcher == "local" else None
    jobs = []
    for pair in todo:
        tags = {
            TAG_VARIANT: pair.key,
            TAG_SEED: str(pair.seed),
            TAG_MATRIX_ID: matrix,
            TAG_ROLE: "train",
            **dict(pair.tags),
        }
        fit_args = [
            "--experiment",
            pair.experiment,
            "--profile",
            args.profile,
            *[f"--tag={k}={v}" for k, v in tags.items()],
            *overrides,
            *pair.overrides,
            f"seed={pair.seed}",
            f"tracking.experiment_name={args.mlflow_experiment}",
            f"tracking.tracking_uri={uri}",
            *gpu_overrides(args.launcher, first.launcher),
        ]
        env = {"OMP_NUM_THREADS": str(threads)} if threads and "OMP_NUM_THREADS" not in os.environ else {}
        jobs.append((pair, PairJob(fit_args, str(run_dir_of(output_root, pair, matrix)), env)))
    if not jobs:
        print(f"matrix {matrix}: nothing to submit")
        return 0
    folder = Path(first.launcher.folder) / matrix
    executor = make_executor(args.launcher, folder, first.launcher, parallel)
    if args.launcher == "slurm":
        return submit_slurm(executor, jobs, matrix)
    failures = run_local(executor, jobs, parallel)
    if failures:
        print(f"\n{len(failures)} of {len(pairs)} pairs FAILED (rerun the same command to retry them):")
        for pair, error in failures:
            print(f"  {pair.name}: {error}")
    command = f"python -m mm_lightning table --mlflow-experiment {args.mlflow_experiment} --matrix-id {matrix}"
    if uri != tracking_uri():
        command += f" --tracking-uri {uri}"
    print(f"\nmatrix {matrix}; the table:\n  {command}")
    return 1 if failures else 0


def gpu_overrides(kind: str, launcher) -> list[str]:
    """SLURM: fit's trainer spans the job's nodes and GPUs (Lightning reads the ranks from SLURM)."""
    if kind != "slurm" or not launcher.gpus_per_node:
        return []
    return [f"trainer.devices={launcher.gpus_per_node}", f"trainer.num_nodes={launcher.nodes}"]


def run_local(executor, jobs: list, parallel: int) -> list[tuple[Pair, str]]:
    """Runs the jobs, `parallel` at a time; returns the failed pairs with their errors."""
    waiting, running, failures = list(enumerate(jobs, 1)), [], []
    while waiting or running:
        while waiting and len(running) < parallel:
            index, (pair, job) = waiting.pop(0)
            submitted = executor.submit(job)
            print(f"[{index}/{len(jobs)}] {pair.name} ... started (log {submitted.paths.stdout})", flush=True)
            running.append((index, pair, submitted, time.monotonic()))
        time.sleep(0.5)
        for entry in [e for e in running if e[2].done()]:
            running.remove(entry)
            index, pair, submitted, started = entry
            try:
                error = submitted.exception()
            except Exception as err:  # noqa: BLE001 - e.g. the job's own process was killed
                error = err
            if error is None:
                print(f"[{index}/{len(jobs)}] {pair.name} ... done in {time.monotonic() - started:.0f}s", flush=True)
            else:
                message = error_line(error)
                failures.append((pair, message))
                print(f"[{index}/{len(jobs)}] {pair.name} ... FAILED: {message}", flush=True)
    return failures


def error_line(error: Exception) -> str:
    """The exception line of a failed job's traceback (submitit wraps it with log paths)."""
    lines = str(error).strip().splitlines()
    raised = [line for line in lines if re.match(r"[\w.]+(Error|Exception)\b", line)]
    return raised[-1] if raised else lines[0]


def submit_slurm(executor, jobs: list, matrix: str) -> int:
    with executor.batch():  # one SLURM array; --parallel bounds how many of it run at once
        submitted = [(pair, executor.submit(job)) for pair, job in jobs]
    for pair, job in submitted:
        print(f"{pair.name} ... submitted as SLURM job {job.job_id}", flush=True)
    print(f"\nmatrix {matrix}: {len(submitted)} jobs submitted; follow them with the same command and --status")
    return 0


def print_status(matrix: str, states: dict) -> int:
    print(f"matrix {matrix}")
    for pair, (state, run) in states.items():
        detail = f"  run {run.info.run_id}" if run else ""
        print(f"  {pair.name:<28} {state:<10}{detail}")
    counts = {}
    for state, _ in states.values():
        counts[state] = counts.get(state, 0) + 1
    print("  " + ", ".join(f"{n} {state}" for state, n in sorted(counts.items())))
    return 0
