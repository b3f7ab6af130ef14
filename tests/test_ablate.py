"""The ablation runner, with a fake `fit` that logs to a tmp sqlite MLflow store."""

import argparse
import re
import sys
import types
from pathlib import Path

import pytest
from mlflow import MlflowClient

from mm_lightning.commands import ablate
from mm_lightning.commands import table as table_command
from mm_lightning.config import EXPERIMENTS_DIR
from mm_lightning.tracking import ensure_experiment, tracking_uri


class FakeFit:
    """Logs a run as `fit` would; raises for the pairs in `failing`, leaving a FAILED run."""

    def __init__(self):
        self.calls = []
        self.failing = set()

    def __call__(self, cfg, resume=False, tags=None):
        self.calls.append((cfg, resume, tags))
        uri = tracking_uri(cfg)
        client = MlflowClient(uri)
        experiment_id = ensure_experiment(client, cfg.tracking.experiment_name, uri)
        run_id = client.create_run(experiment_id, tags={**tags, "mm.final_stage": "video_finetune"}).info.run_id
        if (tags["mm.variant"], cfg.seed) in self.failing:
            client.set_terminated(run_id, "FAILED")
            raise RuntimeError("CUDA out of memory")
        client.log_metric(run_id, "eval/video_finetune/id_similarity", 0.9 + cfg.seed / 100)
        client.set_terminated(run_id)
        return run_id


@pytest.fixture
def fake_fit(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # the runs' output folders and artifacts land in tmp
    fit = FakeFit()
    # Stands in for the whole module, so the test never imports torch and Lightning.
    monkeypatch.setitem(sys.modules, "mm_lightning.curriculum", types.SimpleNamespace(fit=fit))
    return fit


def _args(*argv, command=ablate):
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return parser.parse_args(argv)


def test_failure_is_reported_and_rerun_skips_finished_pairs(fake_fit, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = _args("--experiments", "full,no_can", "--seeds", "2", f"tracking.tracking_uri={uri}")
    matrix = ablate.matrix_id("tiny", [f"tracking.tracking_uri={uri}"], [0, 1], ["full", "no_can"])
    fake_fit.failing = {("no_can", 1)}

    assert ablate.run(args) == 1
    out = capsys.readouterr().out
    assert re.search(r"^\[1/4\] full seed=0 \.\.\. done in \d+s$", out, re.M)
    assert "[4/4] no_can seed=1 ... FAILED: RuntimeError: CUDA out of memory" in out
    assert "1 of 4 pairs FAILED" in out and "  no_can seed=1: RuntimeError: CUDA out of memory" in out
    table = f"python -m mm_lightning table --mlflow-experiment ablation --matrix-id {matrix} --tracking-uri {uri}"
    assert table in out
    cfg, resume, tags = fake_fit.calls[0]
    assert (cfg.seed, cfg.tracking.experiment_name, resume) == (0, "ablation", False)
    assert tags == {"mm.variant": "full", "mm.seed": "0", "mm.matrix_id": matrix, "mm.role": "train"}
    assert Path(cfg.output_dir) == Path("runs/full") / matrix / "seed0"

    fake_fit.failing = set()
    fake_fit.calls.clear()
    assert ablate.run(args) == 0
    out = capsys.readouterr().out
    for line in ("[1/4] full seed=0", "[2/4] full seed=1", "[3/4] no_can seed=0"):
        assert f"{line} ... skipped (finished)" in out
    assert re.search(r"^\[4/4\] no_can seed=1 \.\.\. done in \d+s$", out, re.M)
    # Only the failed pair trained again, resuming its earlier attempt.
    [(cfg, resume, tags)] = fake_fit.calls
    assert (tags["mm.variant"], cfg.seed, resume) == ("no_can", 1, True)

    client = MlflowClient(uri)
    experiment_id = client.get_experiment_by_name("ablation").experiment_id
    runs = client.search_runs([experiment_id], "tags.`mm.role` = 'train'")
    finished = sorted((r.data.tags["mm.variant"], r.data.tags["mm.seed"]) for r in runs if r.info.status == "FINISHED")
    assert finished == [("full", "0"), ("full", "1"), ("no_can", "0"), ("no_can", "1")]
    assert [r.info.status for r in runs].count("FAILED") == 1

    # The printed table command reads these runs back.
    table_args = _args(*table.split()[4:], "--metrics", "id_similarity", command=table_command)
    assert table_command.run(table_args) == 0
    assert "| no_can | 0.905 ± 0.007 (n=2) | +0.000 |" in capsys.readouterr().out


def test_default_variants_are_the_experiment_yamls(fake_fit, mlflow_uri, capsys):
    assert ablate.run(_args("--seeds", "1")) == 0
    expected = {path.stem for path in EXPERIMENTS_DIR.glob("*.yaml")} - {"base"}
    assert {tags["mm.variant"] for _, _, tags in fake_fit.calls} == expected
    # The store is the default one, so the printed command needs no --tracking-uri.
    assert "--tracking-uri" not in capsys.readouterr().out


def test_matrix_id_is_stable():
    key = ablate.matrix_id("tiny", ["loss.id_weight=0.1"], [0, 1], ["full", "no_can"])
    assert key == ablate.matrix_id("tiny", ["loss.id_weight=0.1"], [0, 1], ["no_can", "full"])
    assert key != ablate.matrix_id("tiny", ["loss.id_weight=0.1"], [0, 1, 2], ["full", "no_can"])
    assert key != ablate.matrix_id("cogvideox-5b", ["loss.id_weight=0.1"], [0, 1], ["full", "no_can"])
    assert key != ablate.matrix_id("tiny", [], [0, 1], ["full", "no_can"])
