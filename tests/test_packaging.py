"""A non-editable install works away from the source tree, and a user's own experiment YAML runs from
their own folder: build the wheel, install it into a bare folder, load a packaged experiment and run a short
`fit` of the user's own there."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.helpers import REPO, cli_env

SOURCES = ("mm_lightning", "callbacks", "evaluation", "experiments")

MY_VARIANT = """\
# a researcher's variant, outside the package: the full model without the CAN residual
model:
  can: false
"""


def _wheel_name(source: Path) -> str:
    """Where a source file lands in the wheel: the user's top-level callbacks/, evaluation/ and experiments/
    ship inside mm_lightning/ (pyproject.toml's package-dir)."""
    relative = source.relative_to(REPO).as_posix()
    return relative if relative.startswith("mm_lightning/") else "mm_lightning/" + relative


def _build_wheel(tmp_path: Path) -> Path:
    # From a copy, so the build's scratch folders never land in the working tree.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in SOURCES:
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            str(src),
            "-w",
            str(tmp_path / "dist"),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    return next((tmp_path / "dist").glob("mm_lightning-*.whl"))


@pytest.mark.slow
def test_wheel_installs_and_runs_a_user_experiment_away_from_the_source_tree(tmp_path):
    wheel = _build_wheel(tmp_path)
    shipped = set(zipfile.ZipFile(wheel).namelist())
    sources = [
        p
        for name in SOURCES
        for p in (REPO / name).rglob("*")
        if p.suffix in (".py", ".yaml") and "__pycache__" not in p.parts
    ]
    missing = sorted(_wheel_name(p) for p in sources if _wheel_name(p) not in shipped)
    assert not missing, f"pyproject.toml's package list leaves these out of the wheel: {missing}"

    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    user = tmp_path / "user_project"  # the user's own folder: no repo, no experiments/ beside it
    user.mkdir()
    (user / "my_variant.yaml").write_text(MY_VARIANT)
    env = cli_env(user, pythonpath=site)  # the installed copy on the path, not the checkout

    def cli(*args: str) -> subprocess.CompletedProcess:
        result = subprocess.run([sys.executable, *args], cwd=user, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"{args}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        return result

    # One interpreter for what needs no command: where the code and the experiments come from, no generic
    # top-level names, and a packaged experiment found by its name.
    checks = cli(
        "-c",
        "import importlib.util as u, mm_lightning.config as c\n"
        "print(c.__file__, c.EXPERIMENTS_DIR, sep='\\n')\n"
        "print([u.find_spec(n) is None for n in "
        "('callbacks', 'evaluation', 'mm_lightning.callbacks.evaluation', 'mm_lightning.evaluation')])\n"
        "print(c.load_config('no_can').model.can)",
    ).stdout.splitlines()
    module, experiments, namespaced, no_can = checks
    assert Path(module).is_relative_to(site), module  # the installed copy, not the checkout
    assert Path(experiments) == site / "mm_lightning" / "experiments"  # read as package data
    assert namespaced == "[True, True, False, False]"  # no generic top-level names
    assert no_can == "False"  # experiments/no_can.yaml, shipped in the wheel

    fit = cli(
        "-m",
        "mm_lightning",
        "fit",
        "--experiment",
        "./my_variant.yaml",
        "eval.enabled=false",
        "curriculum.stages.image_pretrain.max_steps=1",
        "curriculum.stages.video_finetune.max_steps=1",
    )
    assert "finished my_variant" in fit.stdout
    config = next((user / "runs" / "my_variant").iterdir()) / "config.yaml"
    assert "can: false" in config.read_text()  # the user's file composed over base.yaml and the profile
