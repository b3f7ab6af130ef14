"""Ablation matrices as data: experiments/ablations/table3.yaml row by row."""

import pytest
import yaml

from mm_lightning.ablation_matrix import FLAGS, load_matrix
from mm_lightning.config import ConfigError, load_config

# Ticks per row that survived the text extraction of the paper's Table 3 (v2).
TICKS = {"A": 1, "B": 1, "C": 2, "D": 2, "E": 2, "F": 3, "G": 4, "full": 5}


def test_table3_rows_follow_the_paper():
    matrix = load_matrix("table3")
    assert [row.key for row in matrix.rows] == list(TICKS)
    assert all(sum(row.flags.values()) == TICKS[row.key] for row in matrix.rows)
    assert all(set(row.flags) == set(FLAGS) for row in matrix.rows)
    assert matrix.row("full").paper["id_similarity"] == 0.911
    assert matrix.row("F").label == "F [w/o CAN]" and not matrix.row("F").flags["can"]


def test_every_row_trains_half_of_each_of_its_stages():
    base = load_config("full", "cogvideox-5b")
    matrix = load_matrix("table3", "cogvideox-5b")
    for row in matrix.rows:
        cfg = load_config(row.experiment, "cogvideox-5b", row.overrides)  # the overrides alone define the run
        expected_stages = ["image_pretrain", "video_finetune"] if row.flags["pretrain"] else ["video_finetune"]
        assert list(cfg.curriculum.order) == expected_stages
        for stage in expected_stages:
            assert cfg.curriculum.stages[stage].max_steps * 2 == base.curriculum.stages[stage].max_steps
        assert ("identity" in cfg.model.branches, "structural" in cfg.model.branches) == (
            row.flags["x_id"],
            row.flags["x_face"],
        )
        assert (cfg.model.face_modality, cfg.model.can) == (row.flags["m_face"], row.flags["can"])
        assert row.tags["mm.variant"] == row.key and row.tags["mm.budget_fraction"] == "0.5"


def test_matrix_wide_overrides_are_halved_too():
    matrix = load_matrix("table3", "tiny", ["curriculum.stages.video_finetune.max_steps=6"])
    assert "curriculum.stages.video_finetune.max_steps=3" in matrix.row("A").overrides


def test_unknown_matrix_lists_the_available_ones():
    with pytest.raises(ValueError, match="available: table3"):
        load_matrix("table9")


def test_a_matrix_file_anywhere_on_disk(tmp_path):
    path = tmp_path / "mine.yaml"
    row = {"key": "x", "label": "only x_face", "flags": dict.fromkeys(FLAGS, False) | {"x_face": True}}
    path.write_text(yaml.safe_dump({"name": "mine", "budget_fraction": 0.25, "rows": [row]}))
    matrix = load_matrix(str(path))
    assert matrix.name == "mine" and matrix.row("x").budget == {"video_finetune": 10}  # tiny: 40 steps

    row["flags"] = dict.fromkeys(FLAGS, False) | {"x_id": True, "m_face": True}  # m_face needs x_face
    path.write_text(yaml.safe_dump({"name": "mine", "rows": [row]}))
    with pytest.raises(ConfigError, match="row x: .*face_modality"):
        load_matrix(str(path))
