"""--experiment / --profile take YAML files anywhere; they compose over base.yaml like the built-in ones,
and a mistake in them is reported with the file and line."""

import pytest

from mm_lightning.cli import main
from mm_lightning.config import EXPERIMENTS_DIR, ConfigError, load_config


def _write(folder, name, text):
    path = folder / name
    path.write_text(text)
    return path


def test_a_user_experiment_composes_over_base_and_profile_like_a_builtin(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path, "no_can_copy.yaml", (EXPERIMENTS_DIR / "no_can.yaml").read_text())
    user, builtin = load_config("./no_can_copy.yaml"), load_config("no_can")
    assert user.experiment == "no_can_copy" and user.output_dir == "runs/no_can_copy"
    user.experiment = user.output_dir = builtin.experiment = builtin.output_dir = "x"
    assert user == builtin  # same layers, same result


def test_a_user_profile_file_is_a_profile(tmp_path):
    profile = _write(tmp_path, "small.yaml", "architecture:\n  transformer:\n    num_layers: 2\n")
    cfg = load_config("full", str(profile))
    assert cfg.profile == "small" and cfg.architecture.transformer.num_layers == 2
    assert cfg.model.can  # base.yaml and the experiment still apply


@pytest.mark.parametrize(
    "text, message",
    [
        ("model:\n  can: false\n  cann: true\n", r"bad\.yaml, line 3: unknown config key 'model\.cann'; valid keys"),
        ("model:\n  can: [1, 2\ntrainer: {}\n", r"bad\.yaml, line 3: not valid YAML"),
        ("seed: 1\nmodel:\n  num_id_tokens: many\n", r"bad\.yaml, line 3: invalid value: .*'many'.*num_id_tokens\)$"),
        ("- a list\n", r"bad\.yaml: expected a mapping"),
    ],
)
def test_mistakes_in_a_user_file_name_the_file_and_line(tmp_path, text, message):
    path = _write(tmp_path, "bad.yaml", text)
    with pytest.raises(ConfigError, match=message):
        load_config(str(path))


def test_a_missing_file_or_name_is_a_clear_cli_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["describe", "--experiment", "./nowhere.yaml"]) == 2
    assert "experiment file ./nowhere.yaml not found" in capsys.readouterr().err
    assert main(["describe", "--experiment", "full", "--profile", "huge"]) == 2
    assert "or a path to a .yaml file" in capsys.readouterr().err


def test_describe_takes_a_user_experiment_from_the_current_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path, "my_variant.yaml", "model:\n  can: false\n")
    assert main(["describe", "--experiment", "my_variant.yaml"]) == 0
    out = capsys.readouterr().out
    assert "experiment: my_variant" in out and "  can: false" in out
