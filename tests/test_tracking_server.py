"""Against a real `mlflow server` (sqlite backend, local artifact root) on a free localhost port:
`ablate --launcher local --parallel 2`, `table`, and a `fit` whose server goes away mid-run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from mlflow import MlflowClient

from tests.helpers import SHORT_FIT, SHORT_STEPS, artifacts, free_port, run_cli, start_cli, wait_for

pytestmark = pytest.mark.slow


class MlflowServer:
    """`mlflow server` in its own process group, so stopping it stops every process it started."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process = None

    def start(self, timeout: float = 300) -> None:
        command = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{self.root}/mlflow.db",
            "--artifacts-destination",
            str(self.root / "artifacts"),
        ]
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")  # no background job workers
        log = open(self.root / "server.log", "a")
        self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited:\n{(self.root / 'server.log').read_text()[-3000:]}")
            try:
                if requests.get(f"{self.uri}/health", timeout=2).ok:
                    return
            except requests.RequestException:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer in {timeout:.0f} s")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow_server"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_ablate_in_parallel_and_table_against_a_tracking_server(server, tmp_path):
    out = run_cli(
        tmp_path,
        "ablate",
        "--experiments",
        "full,no_can",
        "--seeds",
        "1",
        "--parallel",
        "2",
        "curriculum.stages.image_pretrain.max_steps=4",
        "curriculum.stages.video_finetune.max_steps=4",
        uri=server.uri,
    ).stdout
    assert "[1/2] full seed=0 ... started" in out and "[2/2] no_can seed=0 ... started" in out
    assert not (tmp_path / "mlruns").exists()  # nothing went to a local store

    client = MlflowClient(server.uri)
    runs = client.search_runs([client.get_experiment_by_name("ablation").experiment_id], "tags.`mm.role` = 'train'")
    assert sorted(r.data.tags["mm.variant"] for r in runs) == ["full", "no_can"]
    for run in runs:
        assert run.info.status == "FINISHED"
        assert "eval/video_finetune/id_similarity" in run.data.metrics
        assert len(client.get_metric_history(run.info.run_id, "train/image_pretrain/loss")) == 4
        logged = artifacts(client, run.info.run_id)
        assert "config.yaml" in logged and "checkpoint/final.ckpt" in logged
        assert any(a.startswith("eval/video_finetune/") and a.endswith(".mp4") for a in logged)
    assert list((server.root / "artifacts").rglob("final.ckpt"))  # stored by the server, under its artifact root

    table = run_cli(
        tmp_path, "table", "--tracking-uri", server.uri, "--metrics", "dynamic_degree", uri=server.uri
    ).stdout
    assert "| full |" in table and "| no_can |" in table and "(n=1)" in table, table


def test_training_goes_on_when_the_server_drops_and_sync_run_pushes_the_rest(server, tmp_path):
    proc = start_cli(tmp_path, *SHORT_FIT, uri=server.uri)
    wait_for("runs/full/*/checkpoints/image_pretrain/last.ckpt", tmp_path, proc)
    server.stop()  # the tracking server goes away in the middle of stage 1
    stderr = proc.communicate(timeout=900)[1]
    assert proc.returncode == 0, stderr[-3000:]
    assert "unreachable" in stderr and "python -m mm_lightning sync-run" in stderr
    (run_dir,) = (tmp_path / "runs" / "full").iterdir()
    assert (run_dir / "tracking_backlog.jsonl").exists()
    assert (run_dir / "checkpoints" / "video_finetune" / "final.ckpt").exists()

    server.start()
    assert "pushed" in run_cli(tmp_path, "sync-run", str(run_dir), uri=server.uri).stdout
    client = MlflowClient(server.uri)
    run = client.get_run(json.loads((run_dir / "run.json").read_text())["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["mm.completed"] == "true"
    steps = sorted({m.step for m in client.get_metric_history(run.info.run_id, "train/image_pretrain/loss")})
    assert steps == list(range(SHORT_STEPS))  # before, during and after the outage
    assert "checkpoint/final.ckpt" in artifacts(client, run.info.run_id)
    assert not (run_dir / "tracking_backlog.jsonl").exists()
