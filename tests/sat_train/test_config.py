import json

import pytest

from sat_train.config import ConfigError, TrainConfig, from_dict, load_toml, parse_args, parse_argv, resume_values
from sat_train.fit import main


def test_defaults_are_valid_and_printable():
    cfg = from_dict({})
    assert cfg == TrainConfig() and cfg.eps == 8 / 255 and cfg.sat_a == 0.6 and cfg.label_smoothing == 0.0
    assert "method" in cfg.pretty() and json.loads(json.dumps(cfg.to_dict()))["pgd_steps"] == 7


def test_toml_then_flags_win(tmp_path):
    f = tmp_path / "fit.toml"
    f.write_text('method = "pgd"\nepochs = 3\nlr = 0.05\nmilestones = [0.3, 0.6]\naugment = false\nsat_p = 0.5\n')
    cfg = parse_args(["--config", str(f), "--epochs", "7", "--augment", "--adam-betas", "0.8,0.9"])
    assert cfg.method == "pgd" and cfg.lr == 0.05 and cfg.milestones == (0.3, 0.6)
    assert cfg.epochs == 7 and cfg.augment is True and cfg.adam_betas == (0.8, 0.9) and cfg.sat_p == 0.5
    assert parse_args(["--no-flip", "--sat-p", "none"]).flip is False


def test_unknown_keys_and_bad_values_rejected(tmp_path, capsys):
    f = tmp_path / "bad.toml"
    f.write_text('method = "sat"\nlearning_rate = 0.1\n')
    with pytest.raises(ConfigError, match=r"bad.toml: unknown config key\(s\) learning_rate"):
        load_toml(f)
    with pytest.raises(ConfigError, match="unknown config key"):
        from_dict({"epoch": 3})
    with pytest.raises(ConfigError, match="method 'satt'"):
        parse_args(["--method", "satt"])
    with pytest.raises(ConfigError, match="epochs = 'two'"):
        parse_args(["--epochs", "two"])
    with pytest.raises(ConfigError, match="loader_decode 'nvjpeg' is not one of auto, gpu, cpu"):
        parse_args(["--loader-decode", "nvjpeg"])
    assert parse_args(["--loader-decode", "cpu"]).loader_decode == "cpu"
    f2 = tmp_path / "wrongtype.toml"
    f2.write_text("epochs = 2.5\n")
    with pytest.raises(ConfigError, match="wrongtype.toml: epochs"):
        load_toml(f2)
    with pytest.raises(SystemExit):
        parse_argv(["--no-such-flag", "1"])
    capsys.readouterr()
    # through the entry point: exit code 2 and one line naming the file and key, no traceback
    assert main(["--config", str(f)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.toml" in err[0] and "learning_rate" in err[0] and "Traceback" not in err[0]


def test_resume_may_change_only_runtime_fields():
    saved = TrainConfig(shards="s", method="sat", epochs=2, schedule="constant").to_dict()
    merged = resume_values({"epochs": 4, "resume": True, "num_workers": 0, "verify_shards": "size"}, saved)
    assert merged["epochs"] == 4 and merged["method"] == "sat" and merged["verify_shards"] == "size"
    with pytest.raises(ConfigError, match="cannot change lr, method"):
        resume_values({"method": "pgd", "lr": 0.3, "resume": True}, saved)


@pytest.mark.parametrize("schedule", ["cosine", "piecewise"])
def test_resume_refuses_new_epochs_where_the_schedule_depends_on_them(schedule):
    saved = TrainConfig(shards="s", epochs=2, schedule=schedule).to_dict()
    with pytest.raises(ConfigError, match=rf"cannot change epochs \(2 -> 4\) of a run with the {schedule} schedule"):
        resume_values({"epochs": 4, "resume": True}, saved)
    assert resume_values({"epochs": 2, "resume": True}, saved)["epochs"] == 2  # the same value is no change
