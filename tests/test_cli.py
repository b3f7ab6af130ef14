"""The command line: --help everywhere, clear errors for bad names and keys, describe."""

import pytest

from mm_lightning.cli import COMMANDS, build_parser, main
from mm_lightning.config import ConfigError, list_experiments, load_config


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_experiments_cover_the_paper_ablation_rows():
    assert set(list_experiments()) >= {
        "full",
        "no_can",
        "no_pretrain",
        "single_branch",
        "structural_only",
        "dual_branch",
    }


def test_unknown_experiment_profile_and_key_list_the_valid_choices():
    with pytest.raises(ConfigError, match="unknown experiment 'fulll'.*full, no_can"):
        load_config("fulll")
    with pytest.raises(ConfigError, match="unknown profile 'huge'.*cogvideox-2b, cogvideox-5b, cogvideox1.5-5b, tiny"):
        load_config("full", "huge")
    with pytest.raises(ConfigError, match="unknown config key 'model.cann'.*valid keys under model:.*can,"):
        load_config("full", overrides=["model.cann=false"])
    with pytest.raises(ConfigError, match="not key=value"):
        load_config("full", overrides=["model.can"])


def test_config_validation_refuses_impossible_variants():
    with pytest.raises(ConfigError, match="identity_weight > 0 needs a differentiable face embedder"):
        load_config("full", overrides=["loss.identity_weight=0.1"])
    with pytest.raises(ConfigError, match="needs the structural branch"):
        load_config("full", overrides=["model.branches=[identity]"])
    with pytest.raises(ConfigError, match="curriculum.order names stage 'warmup'"):
        load_config("full", overrides=["curriculum.order=[warmup]"])


def test_cli_reports_config_errors_without_a_traceback(capsys):
    assert main(["describe", "--experiment", "nope"]) == 2
    assert "unknown experiment 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("profile", ["tiny", "cogvideox-5b"])
@pytest.mark.parametrize("experiment", list_experiments())
def test_describe_every_experiment_in_both_profiles(experiment, profile, capsys):
    assert main(["describe", "--experiment", experiment, "--profile", profile]) == 0
    out = capsys.readouterr().out
    assert f"experiment: {experiment}" in out and "backbone (CogVideoX transformer)" in out
    if profile == "cogvideox-5b":  # the real sizes, built on the meta device without weights
        assert "5,570,283,072" in out  # CogVideoX-5B transformer
        assert "303,179,776" in out  # CLIP ViT-L/14 vision tower


def test_bench_smoke_runs_on_cpu_and_writes_its_report(tmp_path, capsys):
    # The GPU benchmark's code path, on the tiny profile: the figures are meaningless on a
    # CPU, but the report's structure and the FLOP count's ordering are not.
    import json

    assert (
        main(
            [
                "bench",
                "--profile",
                "tiny",
                "--device",
                "cpu",
                "--steps",
                "1",
                "--warmup",
                "0",
                "--out-dir",
                str(tmp_path),
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "tiny_video_b1.json").read_text())
    assert report["adapted"]["train_flops"] > report["bare"]["train_flops"] > 0
    assert report["train_ratio"] > 0 and report["infer_cfg_ratio"] > 0
    # ConsisID on the same backbone: its face modules (an extractor, cross-attentions) cost FLOPs on top of the bare
    assert report["consisid"]["train_flops"] > report["bare"]["train_flops"]
    assert report["adapted_over_consisid"]["train"] > 0 and report["consisid_over_bare"]["infer_cfg"] > 0
    markdown = (tmp_path / "tiny_video_b1.md").read_text()
    assert "adapted / bare" in markdown and "| consisid |" in markdown and "adapted / ConsisID" in markdown
