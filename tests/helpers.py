"""What the end-to-end tests share: `python -m mm_lightning ...` run as a user (or a scheduler) runs it, in its
own folder, with its own tracking store and this checkout first on the path."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent

# Training with no evaluation that checkpoints every 4 steps: stage 1 runs on for 16 steps after its first
# checkpoint, time enough for a test to send a signal that lands in it.
SHORT_STEPS = 20
SHORT_TRAINING = [
    "eval.enabled=false",
    f"curriculum.stages.image_pretrain.max_steps={SHORT_STEPS}",
    "curriculum.stages.video_finetune.max_steps=4",
    "trainer.checkpoint_every_n_steps=4",
]
SHORT_FIT = ["fit", "--experiment", "full", *SHORT_TRAINING]
# The paper's training: only the new modules learn. The tiny profile also trains its random backbone and keeps its
# random face perceivers (its recipe, README "The identity-reliance probe"); tests of the model's mechanics use this.
PAPER_TRAINING = ["model.train_backbone=false", "model.train_face_encoder=true"]
# The stages of conftest.py's `finished_fit` (with evaluation): short, since what its readers check is the run's
# shape (stages, metrics, artifacts, output), not what it learnt.
FINISHED_FIT_STEPS = {"image_pretrain": 8, "video_finetune": 4}


def store_uri(workdir: Path) -> str:
    """The sqlite store a command run in `workdir` uses."""
    return f"sqlite:///{workdir}/mlruns/mlflow.db"


def cli_env(workdir: Path, uri: str | None = None, pythonpath: Path = REPO) -> dict:
    """The command's environment: `pythonpath` first on the path, the tracking store `uri` (default: inside
    `workdir`), and no PYTEST_CURRENT_TEST (the command must not see the test runner)."""
    env = dict(os.environ, PYTHONPATH=str(pythonpath), MLFLOW_TRACKING_URI=uri or store_uri(workdir))
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


def run_cli(workdir: Path, *args: str, uri: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m mm_lightning *args` in `workdir`, to the end; with `check`, a non-zero exit fails the test."""
    result = subprocess.run(
        [sys.executable, "-m", "mm_lightning", *args],
        cwd=workdir,
        env=cli_env(workdir, uri),
        capture_output=True,
        text=True,
        timeout=900,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def start_cli(workdir: Path, *args: str, uri: str | None = None, stderr: int = subprocess.PIPE) -> subprocess.Popen:
    """`python -m mm_lightning *args` started in its own session, as a scheduler starts a job: a signal sent to
    it reaches it alone, and a non-interactive shell's "ignore SIGINT in background jobs" does not apply."""
    return subprocess.Popen(
        [sys.executable, "-m", "mm_lightning", *args],
        cwd=workdir,
        env=cli_env(workdir, uri),
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        start_new_session=True,
    )


def wait_for(pattern: str, workdir: Path, proc: subprocess.Popen, timeout: float = 600) -> Path:
    """The first file matching `pattern` under `workdir`, once it exists. If `proc` (from start_cli) ends first
    or the time is up, it and every process it started are killed and the test fails."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        found = list(workdir.glob(pattern))
        if found:
            return found[0]
        time.sleep(0.05)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: the group is it and its descendants
    except ProcessLookupError:
        pass
    out, err = proc.communicate()
    raise AssertionError(f"{pattern} never appeared; the command said:\n{(out or '')[-3000:]}\n{(err or '')[-3000:]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def artifacts(client, run_id: str, path: str | None = None) -> list[str]:
    """Every artifact file of a run, as paths relative to its artifact root."""
    out = []
    for item in client.list_artifacts(run_id, path):
        out += artifacts(client, run_id, item.path) if item.is_dir else [item.path]
    return out


def open_adapters(model: torch.nn.Module) -> None:
    """Gives the zero-initialised trainable tensors of `model` a value (std 0.1), so that its face pathways change
    the output and pass gradients on, as they do once trained."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.abs().sum() == 0:
                p.normal_(std=0.1)
