"""ablate: pairs from YAMLs or a matrix file, the SLURM job script, each pair's state from the
tracking store, and a real matrix through submitit with one pair SIGKILLed mid-run."""

import argparse
import re
import signal
import subprocess
from pathlib import Path

import psutil
import pytest
from filelock import FileLock
from mlflow import MlflowClient

from mm_lightning.ablation_matrix import load_matrix
from mm_lightning.commands import ablate
from mm_lightning.config import load_config
from mm_lightning.tracking import RUN_LOCK_FILE, ensure_experiment, open_store
from tests.helpers import SHORT_TRAINING, run_cli, start_cli, store_uri, wait_for


def _args(*argv):
    parser = argparse.ArgumentParser()
    ablate.add_arguments(parser)
    return parser.parse_args(argv)


def test_matrix_id_is_stable():
    key = ablate.matrix_id("tiny", ["loss.id_weight=0.1"], [0, 1], ["full", "no_can"])
    assert key == ablate.matrix_id("tiny", ["loss.id_weight=0.1"], [0, 1], ["no_can", "full"])
    assert key != ablate.matrix_id("tiny", ["loss.id_weight=0.1"], [0, 1, 2], ["full", "no_can"])
    assert key != ablate.matrix_id("cogvideox-5b", ["loss.id_weight=0.1"], [0, 1], ["full", "no_can"])
    assert key != ablate.matrix_id("tiny", [], [0, 1], ["full", "no_can"])


def test_matrix_file_rows_become_pairs_tagged_with_the_row():
    matrix = load_matrix("table3")
    _, pairs = ablate.build_pairs(_args("--matrix", "table3", "--seeds", "2"), [])
    assert [(p.key, p.seed) for p in pairs] == [(row.key, seed) for row in matrix.rows for seed in (0, 1)]
    first = pairs[0]
    assert first.experiment == matrix.rows[0].experiment and list(first.overrides) == matrix.rows[0].overrides
    assert dict(first.tags)["mm.budget"] == matrix.rows[0].tags["mm.budget"]


def test_slurm_job_script_carries_the_launcher_settings(tmp_path):
    cfg = load_config(
        "full",
        "tiny",
        [
            "launcher.partition=gpu",
            "launcher.account=proj42",
            "launcher.nodes=2",
            "launcher.gpus_per_node=8",
            "launcher.timeout_min=600",
            "launcher.sbatch_flags.qos=high",
            "launcher.setup=[module load cuda]",
        ],
    )
    from submitit.slurm.slurm import _make_sbatch_string  # what SlurmExecutor writes; it needs srun to exist

    script = _make_sbatch_string(
        "python -m submitit.core._submit X", tmp_path, **ablate.slurm_parameters(cfg.launcher, parallel=4)
    )
    for line in (
        "--partition=gpu",
        "--account=proj42",
        "--nodes=2",
        "--gpus-per-node=8",
        "--ntasks-per-node=8",
        "--time=600",
        "--qos=high",
        "--signal=USR2@120",
    ):
        assert f"#SBATCH {line}" in script, line
    assert "module load cuda" in script
    assert ablate.gpu_overrides("slurm", cfg.launcher) == ["trainer.devices=8", "trainer.num_nodes=2"]
    assert ablate.gpu_overrides("local", cfg.launcher) == []


def test_pair_states_come_from_the_tracking_store(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    open_store(uri)
    client = MlflowClient(uri)
    experiment_id = ensure_experiment(client, "ablation", uri)
    pairs = [ablate.Pair(key, 0, key) for key in ("done", "broken", "preempted", "alive", "died", "queued")]
    for pair, status in zip(pairs, ["FINISHED", "FAILED", "KILLED", "RUNNING", "RUNNING"]):
        run_dir = tmp_path / pair.key
        run_dir.mkdir()
        run = client.create_run(
            experiment_id,
            tags={
                "mm.role": "train",
                "mm.matrix_id": "m1",
                "mm.variant": pair.key,
                "mm.seed": "0",
                "mm.run_dir": str(run_dir),
            },
        )
        if status != "RUNNING":
            client.set_terminated(run.info.run_id, status)
    client.create_run(
        experiment_id, tags={"mm.role": "train", "mm.matrix_id": "other", "mm.variant": "queued", "mm.seed": "0"}
    )  # another matrix's run does not count
    with FileLock(tmp_path / "alive" / RUN_LOCK_FILE):  # a live fit holds its run folder
        states = ablate.pair_states(client, "ablation", "m1", pairs)
    assert {p.key: state for p, (state, _) in states.items()} == {
        "done": "finished",
        "broken": "failed",
        "preempted": "preempted",
        "alive": "running",
        "died": "failed",
        "queued": "pending",
    }


def _start_until_checkpoint(workdir: Path, args: list[str], variant: str) -> subprocess.Popen:
    """`python -m mm_lightning *args` in its own session, returned once `variant`'s seed-0 fit has written
    a last.ckpt."""
    proc = start_cli(workdir, *args, stderr=subprocess.STDOUT)
    wait_for(f"runs/{variant}/*/seed0/checkpoints/*/last.ckpt", workdir, proc)
    return proc


@pytest.mark.slow
def test_a_sigkilled_pair_is_the_only_one_that_runs_again(tmp_path):
    args = [
        "ablate",
        "--experiments",
        "full,no_can",
        "--seeds",
        "1",
        "--parallel",
        "2",
        *SHORT_TRAINING,
    ]
    proc = _start_until_checkpoint(tmp_path, args, "no_can")
    # The no_can pair's fit, among this ablate's own descendants (launcher, job, fit).
    (fit,) = [
        p
        for p in psutil.Process(proc.pid).children(recursive=True)
        if "fit" in p.cmdline() and "--tag=mm.variant=no_can" in p.cmdline()
    ]
    fit.kill()  # SIGKILL: no checkpoint, no status update, the MLflow run stays RUNNING
    out = proc.communicate(timeout=900)[0]
    assert proc.returncode == 1, out[-3000:]
    assert re.search(r"full seed=0 \.\.\. done in \d+s", out)
    assert re.search(r"no_can seed=0 \.\.\. FAILED: RuntimeError: fit exited with -9", out), out[-3000:]

    status = run_cli(tmp_path, *args, "--status").stdout
    assert re.search(r"full seed=0\s+finished", status) and re.search(r"no_can seed=0\s+failed", status), status

    out = run_cli(tmp_path, *args).stdout
    assert "full seed=0 ... skipped (finished)" in out
    assert re.search(r"\[1/1\] no_can seed=0 \.\.\. done in \d+s", out), out
    client = MlflowClient(store_uri(tmp_path))
    runs = client.search_runs([client.get_experiment_by_name("ablation").experiment_id], "tags.`mm.role` = 'train'")
    # One run per pair: the killed pair resumed its own run, from its last checkpoint.
    assert sorted((r.data.tags["mm.variant"], r.info.status) for r in runs) == [
        ("full", "FINISHED"),
        ("no_can", "FINISHED"),
    ]
    logs = "".join(p.read_text() for p in tmp_path.glob("runs/ablate/*/*_0_log.out"))
    assert re.search(r"resuming stage image_pretrain from \S+/runs/no_can/\w+/seed0/checkpoints/image_pretrain/", logs)


@pytest.mark.slow
def test_a_preempted_job_checkpoints_requeues_and_resumes(tmp_path):
    # The scheduler's preemption warning (USR2) reaches the submitit job: PairJob.checkpoint stops
    # fit with SIGTERM, submitit requeues the job, and the job resumes the pair's run.
    args = [
        "ablate",
        "--experiments",
        "full",
        "--seeds",
        "1",
        *SHORT_TRAINING,
    ]
    proc = _start_until_checkpoint(tmp_path, args, "full")
    (job,) = [p for p in psutil.Process(proc.pid).children(recursive=True) if "submitit.core._submit" in p.cmdline()]
    job.send_signal(signal.SIGUSR2)
    out = proc.communicate(timeout=900)[0]
    assert proc.returncode == 0, out[-3000:]
    logs = "".join(p.read_text() for p in tmp_path.glob("runs/ablate/*/*_0_log.*"))
    assert "fit: stopped by SIGTERM in stage" in logs and "this job is preempted" in logs
    assert re.search(r"resuming stage \w+ from ", logs)
    client = MlflowClient(store_uri(tmp_path))
    (run,) = client.search_runs([client.get_experiment_by_name("ablation").experiment_id], "tags.`mm.role` = 'train'")
    assert run.info.status == "FINISHED"
