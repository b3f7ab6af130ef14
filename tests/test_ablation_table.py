"""The ablation table, read from a real (sqlite) MLflow store that MLflow's own API fills."""

import argparse
import csv
import io
import math
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from mm_lightning.ablation_matrix import load_matrix
from mm_lightning.commands import table as table_command
from mm_lightning.config import load_config
from mm_lightning.reports import ablation_table

NAN = math.nan
# The latest matrix: variant -> seed -> final-stage metrics. single_branch never logs
# fm_inter; no_can's seed 1 has an undefined id_similarity (no face detected).
MATRIX = {
    "full": {
        "0": {"text_alignment": 0.24, "fm_inter": 0.6, "id_similarity": 0.9},
        "1": {"text_alignment": 0.25, "fm_inter": 0.7, "id_similarity": 0.92},
    },
    "no_can": {
        "0": {"text_alignment": 0.23, "fm_inter": 0.55, "id_similarity": 0.88},
        "1": {"text_alignment": 0.236, "fm_inter": 0.57, "id_similarity": NAN},
    },
    "single_branch": {
        "0": {"text_alignment": 0.238, "id_similarity": 0.86},
        "1": {"text_alignment": 0.242, "id_similarity": 0.87},
    },
}

# Paper numbers for the rendering tests, in the paper's row order (values of Table 3's rows A, F and Full).
PAPER = {
    "single_branch": {"text_alignment": 0.238, "fm_inter": 0.572, "id_similarity": 0.865},
    "no_can": {"text_alignment": 0.236, "fm_inter": 0.568, "id_similarity": 0.886},
    "full": {"text_alignment": 0.240, "fm_inter": 0.665, "id_similarity": 0.911},
}


def _log_run(client, experiment_id, start, tags, metrics, status="FINISHED"):
    run_id = client.create_run(experiment_id, start_time=start, tags=tags).info.run_id
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    client.set_terminated(run_id, status)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("ablation", artifact_location=(root / "artifacts").as_uri())

    def train_tags(variant, seed, matrix):
        return {
            "mm.role": "train",
            "mm.variant": variant,
            "mm.seed": seed,
            "mm.matrix_id": matrix,
            "mm.final_stage": "video_finetune",
        }

    # An older matrix that must not leak into the default table.
    _log_run(client, experiment_id, 1_000, train_tags("full", "0", "old"), {"eval/video_finetune/text_alignment": 0.1})
    start = 2_000
    for variant, seeds in MATRIX.items():
        for seed, metrics in seeds.items():
            start += 1
            if (variant, seed) == ("single_branch", "1"):
                # A failed attempt the finished rerun below replaces.
                _log_run(
                    client,
                    experiment_id,
                    start,
                    train_tags(variant, seed, "new"),
                    {"eval/video_finetune/id_similarity": 0.0},
                    status="FAILED",
                )
                start += 1
            logged = {f"eval/video_finetune/{name}": value for name, value in metrics.items()}
            # An earlier stage's metric must not stand in for the final stage's.
            logged["eval/image_pretrain/fm_inter"] = 0.99
            _log_run(client, experiment_id, start, train_tags(variant, seed, "new"), logged)
    client.create_run(experiment_id, start_time=9_000, tags={"mm.role": "summary", "mm.matrix_id": "new"})
    return uri


@pytest.fixture(scope="module")
def table(store):
    client = MlflowClient(store)
    _, runs = ablation_table.fetch_train_runs(client, "ablation")
    matrix_id, runs = ablation_table.select_matrix(runs)
    assert matrix_id == "new"
    return ablation_table.aggregate("ablation", matrix_id, runs, ablation_table.TABLE3_METRICS, PAPER)


def test_aggregate_means_stds_deltas(table):
    assert table.variants == ("full", "single_branch", "no_can")  # full first, then the paper's order
    full = table.cells["full", "text_alignment"]
    assert (full.n, full.mean, full.std) == (2, pytest.approx(0.245), pytest.approx(math.sqrt(0.00005)))
    no_can = table.cells["no_can", "fm_inter"]
    assert (no_can.mean, no_can.std) == (pytest.approx(0.56), pytest.approx(math.sqrt(0.0002)))
    assert table.delta("no_can", "fm_inter") == pytest.approx(-0.09)
    assert table.delta("full", "id_similarity") == 0
    # The FAILED attempt of single_branch seed 1 is ignored, the finished rerun counts.
    assert table.cells["single_branch", "id_similarity"].values == (0.86, 0.87)
    # NaN: that seed drops out, n says so, and a note says why.
    nan_cell = table.cells["no_can", "id_similarity"]
    assert (nan_cell.n, nan_cell.mean, nan_cell.std) == (1, 0.88, None)
    assert nan_cell.notes == ("no_can: id_similarity undefined, NaN, e.g. no face detected (seed 1)",)
    assert table.delta("no_can", "id_similarity") == pytest.approx(-0.03)
    # Not logged by any seed: no mean, no delta, a note; an earlier stage's value is not used.
    missing = table.cells["single_branch", "fm_inter"]
    assert (missing.n, missing.mean) == (0, None)
    assert missing.notes == ("single_branch: fm_inter not logged at the final stage (seeds 0, 1)",)
    assert table.delta("single_branch", "fm_inter") is None


def test_markdown(table):
    text = ablation_table.render(table, "md", with_paper=True)
    assert "| variant | text_alignment | Δ full | paper | fm_inter | Δ full | paper |" in text
    assert (
        "| full | 0.245 ± 0.007 (n=2) | +0.000 | 0.240 | 0.650 ± 0.071 (n=2) | +0.000 | 0.665 "
        "| 0.910 ± 0.014 (n=2) | +0.000 | 0.911 |" in text
    )
    assert (
        "| single_branch | 0.240 ± 0.003 (n=2) | -0.005 | 0.238 | — [1] | — | 0.572 "
        "| 0.865 ± 0.007 (n=2) | -0.045 | 0.865 |" in text
    )
    assert "| no_can | 0.233 ± 0.004 (n=2) | -0.012 | 0.236 | 0.560 ± 0.014 (n=2) | -0.090 | 0.568 " in text
    assert "| 0.880 (n=1) [2] | -0.030 | 0.886 |" in text
    assert "[1] single_branch: fm_inter not logged at the final stage (seeds 0, 1)" in text
    assert "[2] no_can: id_similarity undefined, NaN, e.g. no face detected (seed 1)" in text
    assert "paper" not in ablation_table.render(table, "md").splitlines()[2]


def test_csv(table):
    rows = list(csv.DictReader(io.StringIO(ablation_table.render(table, "csv", with_paper=True))))
    assert len(rows) == 9
    by_key = {(row["variant"], row["metric"]): row for row in rows}
    assert by_key["full", "text_alignment"] == {
        "variant": "full",
        "metric": "text_alignment",
        "mean": "0.245",
        "std": "0.00707107",
        "n": "2",
        "delta_vs_full": "0",
        "paper": "0.24",
        "note": "",
    }
    missing = by_key["single_branch", "fm_inter"]
    assert (missing["mean"], missing["n"], missing["delta_vs_full"]) == ("—", "0", "—")
    assert missing["note"] == "single_branch: fm_inter not logged at the final stage (seeds 0, 1)"
    nan_row = by_key["no_can", "id_similarity"]
    assert (nan_row["mean"], nan_row["std"], nan_row["n"], nan_row["delta_vs_full"]) == ("0.88", "—", "1", "-0.03")
    assert "undefined, NaN" in nan_row["note"]


def test_latex(table):
    text = ablation_table.render(table, "latex")
    assert (
        r"variant & text\_alignment & $\Delta$ full & fm\_inter & $\Delta$ full & id\_similarity & $\Delta$ full \\"
        in text
    )
    assert r"full & 0.245 $\pm$ 0.007 (n=2) & +0.000 &" in text
    assert r"single\_branch & 0.240 $\pm$ 0.003 (n=2) & -0.005 & ---\textsuperscript{1} & --- &" in text
    assert r"0.880 (n=1)\textsuperscript{2} & -0.030 \\" in text
    assert r"\textsuperscript{1} single\_branch: fm\_inter not logged at the final stage (seeds 0, 1)\\" in text
    assert text.count(r"\begin{tabular}") == text.count(r"\end{tabular}") == 1


def test_paper_results_cover_table3_and_table1():
    paper = ablation_table.load_paper_results()
    assert list(paper["table3"]) == ["dual_branch", "no_pretrain", "full"]  # experiments that equal a paper row
    matrix = {row.key: row for row in load_matrix("table3").rows}
    for experiment, row in (("dual_branch", "F"), ("no_pretrain", "G"), ("full", "full")):
        assert paper["table3"][experiment] == matrix[row].paper
        cfg = load_config(experiment)
        flags = (
            "identity" in cfg.model.branches,
            "structural" in cfg.model.branches,
            cfg.model.face_modality,
            cfg.model.can,
            "image_pretrain" in cfg.curriculum.order,
        )
        assert flags == tuple(matrix[row].flags.values()), experiment
    assert all(set(row) == set(ablation_table.TABLE3_METRICS) for row in paper["table3"].values())
    assert paper["table1"]["MagicMirror"]["id_similarity"] == 0.922
    assert paper["table1"]["ConsisID"]["dynamic_degree"] == 0.615


def _args(*argv):
    parser = argparse.ArgumentParser()
    table_command.add_arguments(parser)
    return parser.parse_args(argv)


def test_command_writes_table_and_logs_summary_run(store, tmp_path, capsys):
    out = tmp_path / "table.tex"
    args = _args(
        "--tracking-uri", store, "--format", "latex", "--out", str(out), "--paper", "--metrics", "+dynamic_degree"
    )
    assert table_command.run(args) == 0
    text = out.read_text()
    assert r"dynamic\_degree" in text and "not reported in the paper's Table 3" in text
    assert capsys.readouterr().out == ""

    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("ablation")
    summaries = client.search_runs(
        [experiment.experiment_id], "tags.`mm.role` = 'summary' and attributes.status = 'FINISHED'"
    )
    assert len(summaries) == 1 and summaries[0].data.tags["mm.matrix_id"] == "new"
    artifacts = {a.path for a in client.list_artifacts(summaries[0].info.run_id)}
    assert artifacts == {"ablation_table.md", "ablation_table.tex", "ablation_table.csv", "ablation_chart.png"}
    local = client.download_artifacts(summaries[0].info.run_id, "ablation_chart.png", str(tmp_path))
    assert open(local, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_command_matrix_choice(store, capsys):
    assert table_command.run(_args("--tracking-uri", store, "--matrix-id", "old", "--format", "csv")) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert (rows[0]["variant"], rows[0]["mean"]) == ("full", "0.1")
    assert table_command.run(_args("--tracking-uri", store, "--matrix-id", "nope")) == 1
    assert "this experiment has: new, old" in capsys.readouterr().err
    assert table_command.run(_args("--tracking-uri", store, "--mlflow-experiment", "absent")) == 1


def test_choose_metrics():
    assert ablation_table.choose_metrics(None) == ablation_table.DEFAULT_METRICS
    assert ablation_table.choose_metrics("fm_ref,id_similarity") == ("fm_ref", "id_similarity")
    assert ablation_table.choose_metrics("+fm_ref,id_similarity") == (*ablation_table.DEFAULT_METRICS, "fm_ref")


def test_every_format_is_a_choice():
    for fmt in ablation_table.FORMATS:
        assert _args("--format", fmt).format == fmt


def test_command_modules_import_cheaply():
    # The CLI imports every command to build its parser; neither may pull in mlflow or torch.
    code = (
        "import sys, mm_lightning.commands.table, mm_lightning.commands.ablate; "
        "print('mlflow' in sys.modules, 'torch' in sys.modules)"
    )
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]


def test_command_matrix_file_prints_paper_rows_in_order(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("ablation", artifact_location=(tmp_path / "artifacts").as_uri())
    tags = {
        "mm.role": "train",
        "mm.seed": "0",
        "mm.matrix_id": "m3",
        "mm.matrix": "table3",
        "mm.final_stage": "video_finetune",
    }
    _log_run(client, experiment_id, 1, tags | {"mm.variant": "full"}, {"eval/video_finetune/id_similarity": 0.5})
    _log_run(client, experiment_id, 2, tags | {"mm.variant": "C"}, {"eval/video_finetune/id_similarity": 0.4})
    # A later ad-hoc matrix must not be picked for --matrix table3.
    _log_run(client, experiment_id, 3, tags | {"mm.variant": "full", "mm.matrix_id": "other", "mm.matrix": ""}, {})
    assert table_command.run(_args("--tracking-uri", uri, "--matrix", "table3")) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "matrix m3" in lines[0]
    rows = [line.split(" | ")[0].lstrip("| ") for line in lines if line.startswith("| ") and "[" in line]
    assert rows == [
        "A [identity branch]",
        "B [structural branch]",
        "C [dual branch]",
        "D [Eq.6, m_face]",
        "E [Eq.7, m_txt, m_vid]",
        "F [w/o CAN]",
        "G [w/o pretrain]",
        "Full [MagicMirror]",
    ]
    full = next(line for line in lines if line.startswith("| Full"))
    assert "0.500 (n=1)" in full and "0.911" in full and "0.665" in full  # ours beside the paper's
    c_row = next(line for line in lines if line.startswith("| C ["))
    assert "-0.100" in c_row and "0.870" in c_row
    assert table_command.run(_args("--tracking-uri", uri, "--matrix", "table9")) == 2
    assert "available: table3" in capsys.readouterr().err
