"""Faults a cluster run meets: SIGTERM/SIGINT to a real `fit`, unusable or concurrently created
tracking stores, a store that goes away mid-run, corrupt checkpoints."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from mlflow import MlflowClient

from mm_lightning.checkpoints import AtomicCheckpointIO, ResumeError, latest_checkpoint
from mm_lightning.cli import main
from mm_lightning.tracking import BACKLOG_FILE, RunClient, ensure_experiment, open_store, sync_run
from tests.helpers import SHORT_FIT, SHORT_STEPS, cli_env, free_port, run_cli, start_cli, store_uri, wait_for


@pytest.mark.slow
def test_sigterm_checkpoints_marks_killed_and_resume_finishes_past_a_corrupt_last_ckpt(tmp_path):
    proc = start_cli(tmp_path, *SHORT_FIT)
    wait_for("runs/full/*/checkpoints/image_pretrain/step=8.ckpt", tmp_path, proc)  # two checkpoints kept
    os.kill(proc.pid, signal.SIGTERM)  # what SLURM sends before it kills a job
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 143, stderr[-3000:]
    (line,) = [line for line in stderr.splitlines() if line.startswith("fit: ")]
    assert "stopped by SIGTERM in stage image_pretrain at step" in line and "MLflow run KILLED" in line
    assert "resume with: python -m mm_lightning fit --experiment full --profile tiny --resume" in line
    run_dir = next((tmp_path / "runs" / "full").iterdir())
    state = json.loads((run_dir / "run.json").read_text())
    client = MlflowClient(store_uri(tmp_path))
    assert client.get_run(state["mlflow_run_id"]).info.status == "KILLED"
    stopped_at = int(line.split("at step ")[1].split(";")[0])
    assert 8 <= stopped_at < SHORT_STEPS

    ckpt_dir = run_dir / "checkpoints" / "image_pretrain"
    last = ckpt_dir / "last.ckpt"
    with open(last, "r+b") as f:  # a truncated last.ckpt (it links to the newest step=N.ckpt)
        f.truncate(1000)
    (ckpt_dir / "on_exception.ckpt").unlink()  # so the previous step=N.ckpt is the good one left

    result = run_cli(tmp_path, *SHORT_FIT, "--resume")
    assert "image_pretrain/last.ckpt is unreadable" in result.stderr
    assert "resuming from the previous good checkpoint" in result.stderr
    run = client.get_run(state["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert torch.load(ckpt_dir / "final.ckpt", weights_only=False)["global_step"] == SHORT_STEPS
    steps = {m.step for m in client.get_metric_history(run.info.run_id, "train/image_pretrain/loss")}
    assert max(steps) == SHORT_STEPS - 1


@pytest.mark.slow
def test_a_kill_during_the_stages_last_evaluation_resumes_into_that_evaluation(tmp_path, monkeypatch):
    # The stage's last evaluation runs before its last step's checkpoint is written: --resume from that checkpoint
    # skips the training loop, so a stage killed in its last evaluation must resume from the checkpoint before.
    # (On four H200s a run was cut while writing final.ckpt after its evaluation; see benchmarks/real_scale.)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))  # the evaluation writes its videos under $TMPDIR
    (tmp_path / "tmp").mkdir()
    fit = ["fit", "--experiment", "full", "curriculum.order=[video_finetune]", "trainer.checkpoint_every_n_steps=1"]
    fit += ["curriculum.stages.video_finetune.max_steps=2", "eval.reliance_every_n_steps=0"]
    proc = start_cli(tmp_path, *fit)
    wait_for("tmp/*/videos/*.mp4", tmp_path, proc)  # the evaluation at step 2 has sampled its first video
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    (run_dir,) = (tmp_path / "runs" / "full").iterdir()
    ckpt_dir = run_dir / "checkpoints" / "video_finetune"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["last.ckpt", "step=1.ckpt"]

    result = run_cli(tmp_path, *fit, "--resume")
    assert "resuming stage video_finetune from runs/full/" in result.stdout  # last.ckpt, its link to step=1.ckpt
    run_id = json.loads((run_dir / "run.json").read_text())["mlflow_run_id"]
    client = MlflowClient(store_uri(tmp_path))
    assert [m.step for m in client.get_metric_history(run_id, "eval/video_finetune/seconds")] == [2]
    assert torch.load(ckpt_dir / "final.ckpt", weights_only=False)["global_step"] == 2
    # Killed after step 2's checkpoint, before final.ckpt (as on the GPUs; here final.ckpt is removed and the stage
    # unmarked): --resume writes final.ckpt and evaluates no more.
    (ckpt_dir / "final.ckpt").unlink()
    state = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**state, "finished_stages": []}))
    run_cli(tmp_path, *fit, "--resume")
    assert torch.load(ckpt_dir / "final.ckpt", weights_only=False)["global_step"] == 2
    assert len(client.get_metric_history(run_id, "eval/video_finetune/seconds")) == 1


@pytest.mark.slow
def test_sigint_stops_fit_with_130_and_a_killed_run(tmp_path):
    proc = start_cli(tmp_path, *SHORT_FIT)
    wait_for("runs/full/*/checkpoints/image_pretrain/last.ckpt", tmp_path, proc)
    os.kill(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 130, stderr[-3000:]
    assert "fit: stopped by SIGINT in stage image_pretrain" in stderr
    run_dir = next((tmp_path / "runs" / "full").iterdir())
    assert (run_dir / "checkpoints" / "image_pretrain" / "on_exception.ckpt").exists()
    run_id = json.loads((run_dir / "run.json").read_text())["mlflow_run_id"]
    assert MlflowClient(store_uri(tmp_path)).get_run(run_id).info.status == "KILLED"


class _Stop(BaseException):  # as fit's StopSignals raises on SIGINT
    pass


def test_a_stop_signal_during_a_tracking_write_waits_for_it_and_leaves_the_store_writable(tmp_path):
    # CI once saw the SIGINT test above leave its run RUNNING: the signal's exception landed inside MLflow's SQLite
    # transaction, whose lock then sent fit's KILLED status to the backlog. Here a real SIGINT arrives while a
    # metric's transaction commits (SQLAlchemy's commit event).
    from sqlalchemy import event

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = RunClient(uri, tmp_path)
    run_id = client.create_run(client.create_experiment("fit")).info.run_id

    def stop(signum, frame):
        raise _Stop

    previous = signal.signal(signal.SIGINT, stop)
    try:
        engine = client._tracking_client.store.engine
        event.listen(engine, "commit", lambda connection: os.kill(os.getpid(), signal.SIGINT), once=True)
        with pytest.raises(_Stop):
            client.log_metric(run_id, "loss", 1.0, step=0)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert [m.value for m in client.get_metric_history(run_id, "loss")] == [1.0]  # the write ended first
    RunClient(uri, tmp_path).set_terminated(run_id, "KILLED")  # as fit marks a stopped run
    assert client.get_run(run_id).info.status == "KILLED"
    assert not (tmp_path / BACKLOG_FILE).exists()


def test_latest_checkpoint_passes_over_a_truncated_file(tmp_path, capsys):
    for step in (4, 8):
        torch.save({"global_step": step}, tmp_path / f"step={step}.ckpt")
    (tmp_path / "last.ckpt").symlink_to("step=8.ckpt")
    assert latest_checkpoint(tmp_path) == tmp_path / "last.ckpt"
    (tmp_path / "step=8.ckpt").write_bytes((tmp_path / "step=8.ckpt").read_bytes()[:100])
    assert latest_checkpoint(tmp_path) == tmp_path / "step=4.ckpt"
    assert f"checkpoint {tmp_path / 'last.ckpt'} is unreadable" in capsys.readouterr().err
    (tmp_path / "step=4.ckpt").write_bytes(b"")
    with pytest.raises(ResumeError, match="no readable checkpoint") as err:
        latest_checkpoint(tmp_path)
    assert str(tmp_path / "step=4.ckpt") in str(err.value) and str(tmp_path / "last.ckpt") in str(err.value)


@pytest.mark.slow
def test_a_kill_while_a_checkpoint_is_written_leaves_the_previous_one_whole(tmp_path):
    # fit's checkpoint writer in a real process, SIGKILLed while it writes 1 GiB (Lightning's own writer put the
    # file in $TMPDIR first, and on another filesystem then copied it into place, where a kill truncated it)
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 1}, path)
    save = "AtomicCheckpointIO().save_checkpoint({'global_step': 2, 'blob': torch.ones(2**28)}, sys.argv[1])"
    writer = subprocess.Popen(
        [sys.executable, "-c", f"import sys, torch; from mm_lightning.checkpoints import AtomicCheckpointIO; {save}"]
        + [str(path)],
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    partial = wait_for("last.ckpt.partial", tmp_path, writer, timeout=120)
    writer.send_signal(signal.SIGKILL)
    assert writer.wait() == -signal.SIGKILL  # killed mid-write, not finished
    assert partial.exists() and torch.load(path, weights_only=False)["global_step"] == 1
    assert latest_checkpoint(tmp_path) == path  # the .partial is no checkpoint to resume from
    AtomicCheckpointIO().save_checkpoint({"global_step": 2}, path)
    assert not partial.exists()  # the next save of that name takes the leftover's place


@pytest.mark.parametrize("store", ["file_in_the_way", "unreachable_server"])
def test_an_unusable_store_stops_fit_and_ablate_with_one_line_before_training(store, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    if store == "file_in_the_way":
        (tmp_path / "mlruns").write_text("not a folder")
        uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    else:
        uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for argv in (["fit", "--experiment", "full"], ["ablate", "--experiments", "full", "--seeds", "1"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: tracking s") and uri in err[0], err
    assert not (tmp_path / "runs").exists()  # nothing started


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only files")
def test_a_read_only_store_is_refused(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    open_store(uri)
    os.chmod(tmp_path / "mlflow.db", 0o444)
    from mm_lightning.tracking import TrackingStoreError

    with pytest.raises(TrackingStoreError, match="readonly|read-only"):
        open_store(uri)


def test_concurrent_first_use_of_a_sqlite_store(tmp_path):
    # Three processes that create the store, its experiment and a run at the same moment.
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    ready = tmp_path / "ready"  # a barrier: each process, once it has imported mlflow, waits for the others
    ready.mkdir()
    script = (
        "import os, sys, time\n"
        "from pathlib import Path\n"
        "from mlflow import MlflowClient\n"
        "from mm_lightning.tracking import ensure_experiment, open_store\n"
        "(Path(sys.argv[2]) / str(os.getpid())).touch()\n"
        "while len(list(Path(sys.argv[2]).iterdir())) < 3:\n"
        "    time.sleep(0.005)\n"
        "open_store(sys.argv[1])\n"
        "client = MlflowClient(sys.argv[1])\n"
        "client.create_run(ensure_experiment(client, 'shared', sys.argv[1]))\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, uri, str(ready)], env=cli_env(tmp_path), stderr=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 3, "\n".join(errors)[-3000:]
    client = MlflowClient(uri)
    assert len(client.search_runs([client.get_experiment_by_name("shared").experiment_id])) == 3


def test_an_outage_is_kept_in_the_run_folder_and_sync_run_pushes_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    store = f"sqlite:///{tmp_path}/mlflow.db"
    open_store(store)
    run_id = MlflowClient(store).create_run(ensure_experiment(MlflowClient(store), "e", store)).info.run_id
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"mlflow_run_id": run_id, "tracking_uri": store}))
    outside = tmp_path / "eval_out"  # an artifact folder outside the run folder (a temp dir in fit)
    outside.mkdir()
    (outside / "per_video.json").write_text("[]")

    down = RunClient(f"http://127.0.0.1:{free_port()}", run_dir)  # nothing listens there
    for step in range(3):
        down.log_metric(run_id, "train/loss", 1.0 / (step + 1), step=step)
    down.set_tag(run_id, "mm.completed", "true")
    down.log_artifacts(run_id, str(outside), "eval")
    down.set_terminated(run_id, "FINISHED")
    assert down.unlogged == 6 and "unreachable" in capsys.readouterr().err
    assert len((run_dir / BACKLOG_FILE).read_text().splitlines()) == 6

    assert sync_run(run_dir) == 6
    client = MlflowClient(store)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["mm.completed"] == "true"
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [0, 1, 2]
    assert [a.path for a in client.list_artifacts(run_id, "eval")] == ["eval/per_video.json"]
    assert not (run_dir / BACKLOG_FILE).exists() and sync_run(run_dir) == 0


def test_an_error_before_the_first_step_is_not_replaced_by_a_checkpoint_save(tmp_path):
    # Under DeepSpeed a save before the engine exists raised its own AttributeError in place of the setup's error.
    import lightning as L
    from lightning.pytorch.demos.boring_classes import BoringModel

    from mm_lightning.callbacks.exception_checkpoint import ExceptionCheckpoint

    class FailingSetup(BoringModel):
        def setup(self, stage):
            raise ValueError("setup failed")

    trainer = L.Trainer(
        max_steps=1, callbacks=[ExceptionCheckpoint(dirpath=tmp_path)], logger=False, enable_progress_bar=False
    )
    with pytest.raises(ValueError, match="setup failed"):
        trainer.fit(FailingSetup())
    assert not (tmp_path / "on_exception.ckpt").exists()


def test_a_diverged_run_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path):
    # lr 1e30: the first update makes the weights useless, and the next loss is NaN. No on_exception.ckpt of the
    # weights that gave it (--resume would start from the newest checkpoint); the periodic ones stay.
    result = run_cli(
        tmp_path,
        "fit",
        "--experiment",
        "full",
        "eval.enabled=false",
        "curriculum.stages.image_pretrain.max_steps=6",
        "curriculum.stages.image_pretrain.lr=1e30",
        "trainer.checkpoint_every_n_steps=1",
        check=False,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: non-finite loss in stage 'image_pretrain'")
    assert "Traceback" not in result.stderr
    stage_dir = next(tmp_path.glob("runs/*/*/checkpoints/image_pretrain"))
    assert not (stage_dir / "on_exception.ckpt").exists()
    assert latest_checkpoint(stage_dir) is not None
