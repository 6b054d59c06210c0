from pathlib import Path

import pytest

from selfreward.run.config import Config, ConfigError, apply_overrides, from_dict, load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_parses(path):
    config = load_config(path)
    assert isinstance(config, Config)
    data = [config.data.ift, config.data.eft, *([config.data.heldout_eft] if config.data.heldout_eft else [])]
    made = [f for f in data if f.startswith("data/oasst/")]  # written by scripts/prepare_data.py, not shipped
    if made:
        assert "scripts/prepare_data.py" in path.read_text() and "data/oasst/" in (REPO / ".gitignore").read_text()
    assert all((REPO / f).is_file() for f in data if f not in made)


def test_unknown_key_is_named_with_the_nearest_valid_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("dpo:\n  betta: 0.2\n")
    with pytest.raises(
        ConfigError, match=r"unknown config key 'dpo.betta' in .*bad.yaml \(did you mean 'dpo.beta'\?\)"
    ):
        load_config(bad)


def test_unknown_section_and_wrong_type():
    with pytest.raises(ConfigError, match="unknown config key 'judgee'"):
        from_dict({"judgee": {"num_samples": 2}})
    with pytest.raises(ConfigError, match="'judge.num_samples' expects an integer"):
        from_dict({"judge": {"num_samples": "three"}})
    with pytest.raises(ConfigError, match="'model.load_in_4bit' expects true or false"):
        from_dict({"model": {"load_in_4bit": "yes"}})


def test_overrides_are_typed():
    config = apply_overrides(Config(), {"dpo.beta": 1, "lora.target_modules": ["q_proj"]}, "cli")
    assert config.dpo.beta == 1.0 and isinstance(config.dpo.beta, float)
    assert config.lora.target_modules == ["q_proj"]
    with pytest.raises(ConfigError, match="did you mean 'judge.num_samples'"):
        apply_overrides(Config(), {"judge.num_sample": 2}, "cli")


def test_a_learning_rate_written_2e_4_is_a_number_in_a_file_and_on_the_command_line(tmp_path):
    """YAML 1.1 reads 2e-4 (no dot) as a string; TRL and transformers users write learning rates that way."""
    path = tmp_path / "c.yaml"
    path.write_text("sft:\n  learning_rate: 2e-4\ndpo:\n  beta: 1E-1\n")
    config = load_config(path, {"dpo.learning_rate": "5e-6"})
    assert (config.sft.learning_rate, config.dpo.beta, config.dpo.learning_rate) == (2e-4, 0.1, 5e-6)
    for word in ("fast", "1e", "inf", "nan", "0x10"):
        with pytest.raises(ConfigError, match="'dpo.beta' expects a number"):
            apply_overrides(Config(), {"dpo.beta": word}, "cli")


def test_script_rejects_a_mistyped_flag(run_stage, tmp_path):
    proc = run_stage(
        "04_gen_preferences",
        "--run-dir",
        str(tmp_path),
        "--iteration",
        "1",
        "--config",
        "configs/tiny.yaml",
        "--preferences.min_margn",
        "1",
        check=False,
    )
    assert proc.returncode == 2
    assert "did you mean --preferences.min_margin" in proc.stderr


def test_script_reports_a_bad_config_key_in_one_line(run_stage, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("judge:\n  temprature: 0.5\n")
    proc = run_stage("03_gen_scores", "--run-dir", str(tmp_path), "--iteration", "1", "--config", str(bad), check=False)
    assert proc.returncode == 2
    assert "did you mean 'judge.temperature'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_keys_with_a_few_allowed_words():
    assert apply_overrides(Config(), {"preferences.min_margin": "auto"}, "t").preferences.min_margin == "auto"
    assert apply_overrides(Config(), {"preferences.min_margin": 0.5}, "t").preferences.min_margin == 0.5
    for key, value in (("preferences.min_margin", "atuo"), ("judge.mode", "logit"), ("judge.gate", "halt")):
        with pytest.raises(ConfigError, match=f"config key '{key}' must be one of"):
            apply_overrides(Config(), {key: value}, "t")


def test_wandb_without_the_package_is_refused_when_the_config_is_read(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"'dpo.report_to' is wandb, but the wandb package is not installed"):
        apply_overrides(Config(), {"dpo.report_to": "wandb"}, "test")
    assert apply_overrides(Config(), {"dpo.report_to": "tensorboard"}, "test").dpo.report_to == "tensorboard"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "wandb" else real(name, *a))
    assert apply_overrides(Config(), {"sft.report_to": "wandb"}, "test").sft.report_to == "wandb"
