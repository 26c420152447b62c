"""The one config and command-line layer (shards/cli.py), walked over every command: every flag has help,
choice flags list their values, eps is one unit everywhere, config files are TOML (JSON read too) with
unknown keys refused, configs validate on construction, and every user error is `COMMAND: message`."""
from __future__ import annotations

import argparse
import dataclasses
import json

import pytest

from preprocess import build_cli, finalize, info, preview, shuffle_saliency, verify
from preprocess.config import BuildConfig
from preprocess.sources import SOURCES
from sat_train import compare, evaluate, experiment, teacher
from sat_train import config as train_config
from sat_train.config import TrainConfig
from sat_train.evaluate import EvalConfig
from sat_train.explain import ExplainConfig
from shards.cli import Config, ConfigError, number, read_config


def _parsers():
    """(command, parser) for every command and every build-shards source."""
    out = [(f"build-shards {s}", build_cli.make_parser(s)) for s in sorted(SOURCES)]
    out += [("verify", verify.build_parser()), ("info", info.build_parser()), ("preview", preview.build_parser()),
            ("finalize", finalize.build_parser()), ("shuffle-saliency", shuffle_saliency.build_parser()),
            ("teacher-saliency", teacher.build_parser()), ("fit", train_config.build_parser()),
            ("eval", evaluate.build_parser()), ("compare", compare.build_parser()),
            ("experiment", experiment.build_parser())]
    return out


CONFIG_CLASSES = (TrainConfig, EvalConfig, BuildConfig, ExplainConfig, teacher.TeacherRun, shuffle_saliency.ShuffleConfig)


@pytest.mark.parametrize("command,parser", _parsers(), ids=[c for c, _ in _parsers()])
def test_every_option_has_help_and_lists_its_choices(command, parser):
    text = parser.format_help()  # formats every help string (a stray % would raise here)
    opening = (parser.description or "").strip().splitlines()[0] if parser.description else None
    if opening:
        assert text.count(opening) == 1, f"{command}: the docstring's opening is printed more than once"
    choices_of = {f.name: f.metadata["choices"] for cls in CONFIG_CLASSES for f in dataclasses.fields(cls)
                  if f.metadata.get("choices")}
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = action.option_strings[0] if action.option_strings else action.dest
        assert action.help and action.help.strip() and action.help != argparse.SUPPRESS, f"{command} {name}: no help"
        assert action.help.count("(default:") <= 1, f"{command} {name}: two defaults in {action.help!r}"
        listed = list(action.choices or []) or list(choices_of.get(action.dest, []))
        for choice in listed:
            assert str(choice) in action.help, f"{command} {name}: help does not list {choice!r}"
    assert len([a for a in parser._actions if a.option_strings]) >= 1


def test_fit_and_eval_take_eps_in_one_unit():
    fit = train_config.parse_args
    evl = lambda eps: evaluate.config_from_argv(["runs/x", "--shards", "s", "--eps", eps, "--autoattack-eps", eps])[1]  # noqa: E731
    # 8/255 is exactly the float 8 / 255, whichever way it is written, in both commands
    assert fit(["--eps", "8/255"]) == fit(["--eps", "0.03137254901960784"]) == TrainConfig()
    assert fit(["--eps", "8/255"]).eps == 8 / 255
    assert evl("8/255") == evl("0.03137254901960784")
    assert evl("8/255").eps == [8 / 255] and evl("8/255").autoattack_eps == 8 / 255
    # a decimal is stored as given, in the same [0, 1] unit by both commands
    assert fit(["--eps", "0.0314"]).eps == evl("0.0314").eps[0] == evl("0.0314").autoattack_eps == 0.0314
    assert fit(["--pgd-alpha", "2/255"]) == TrainConfig()
    # the old 1/255 unit of eval is refused with a pointer to the new spelling, never misread
    with pytest.raises(ConfigError, match="write 8/255"):
        evl("8")
    with pytest.raises(ConfigError, match="eps must be in"):
        fit(["--eps", "8"])


def test_numbers_accept_fractions():
    assert number("8/255") == 8 / 255 and number(" 25.5 / 255 ") == 25.5 / 255 and number("0.1") == 0.1
    for bad in ("1/0", "8/", "a/b", "8/255/2", True):
        with pytest.raises((TypeError, ValueError)):
            number(bad)


def test_configs_validate_on_construction():
    with pytest.raises(ConfigError, match="method 'x' is not one of"):
        TrainConfig(method="x")
    with pytest.raises(ConfigError, match="lr"):
        dataclasses.replace(TrainConfig(), lr=-1.0)
    with pytest.raises(ConfigError, match="every number must be finite"):
        TrainConfig(lr=float("nan"))
    with pytest.raises(ConfigError, match="unit 'bogus' is not one of"):
        BuildConfig(unit="bogus")
    with pytest.raises(ConfigError, match="PGD steps must be >= 1"):
        EvalConfig(pgd_steps=0)
    assert TrainConfig(eps="8/255").eps == 8 / 255  # values are coerced to the field's type, too
    assert TrainConfig(adam_betas="0.8,0.99").adam_betas == (0.8, 0.99)


def _build_from(path, capsys=None):
    cfg, _ = build_cli.config_from_args(["fashion-mnist", "--config", str(path)])
    return cfg


def test_build_config_from_toml_equals_json(tmp_path):
    values = {"split": "test", "size": 32, "image_format": "png", "sigma_frac": 0.1, "shard_size": 7,
              "allow_outside_root": True, "source_options": {"limit": 5}}
    (tmp_path / "build.json").write_text(json.dumps(values))
    (tmp_path / "build.toml").write_text('split = "test"\nsize = 32\nimage_format = "png"\nsigma_frac = 0.1\n'
                                         'shard_size = 7\nallow_outside_root = true\n[source_options]\nlimit = 5\n')
    toml_cfg, json_cfg = _build_from(tmp_path / "build.toml"), _build_from(tmp_path / "build.json")
    assert toml_cfg == json_cfg and toml_cfg.size == 32 and toml_cfg.source_options == {"limit": 5}
    assert toml_cfg.digest() == json_cfg.digest()
    # flags override the file
    cfg, _ = build_cli.config_from_args(["fashion-mnist", "--config", str(tmp_path / "build.toml"), "--size", "48",
                                         "--limit", "9"])
    assert cfg.size == 48 and cfg.source_options == {"limit": 9}


@pytest.mark.parametrize("suffix", ["toml", "json"])
def test_unknown_keys_are_refused_naming_file_and_key(tmp_path, suffix):
    path = tmp_path / f"cfg.{suffix}"
    path.write_text('sizee = 3\n' if suffix == "toml" else '{"sizee": 3}')
    with pytest.raises(ConfigError, match=rf"cfg.{suffix}: unknown config key\(s\) sizee"):
        _build_from(path)
    path.write_text('lrr = 3\n' if suffix == "toml" else '{"lrr": 3}')
    with pytest.raises(ConfigError, match=rf"cfg.{suffix}: unknown config key\(s\) lrr"):
        train_config.parse_args(["--config", str(path)])
    with pytest.raises(ConfigError, match=rf"cfg.{suffix}: unknown config key\(s\) lrr"):
        evaluate.config_from_argv(["runs/x", "--shards", "s", "--config", str(path)])
    # a file holding one [eval] / [fit] table is read as that table
    table = tmp_path / "t.toml"
    table.write_text('[eval]\neps = ["2/255", 0.1]\n')
    assert read_config(table, EvalConfig, table="eval") == {"eps": ["2/255", 0.1]}
    assert evaluate.config_from_argv(["r", "--shards", "s", "--config", str(table)])[1].eps == [2 / 255, 0.1]


@dataclasses.dataclass
class _Demo(Config):
    steps: int = 3


def test_config_mixin_reports_the_source():
    with pytest.raises(ConfigError, match=r"grid.toml \[fit\]: steps = 'x' is not a valid int"):
        _Demo.from_dict({"steps": "x"}, "grid.toml [fit]")
    with pytest.raises(ConfigError, match=r"here: unknown config key\(s\) stepz"):
        _Demo.from_dict({"stepz": 1}, "here")


USER_ERRORS = [
    ("preprocess", ["build-shards", "fashion-mnist", "--unit", "bogus"], "preprocess build-shards: unit 'bogus'"),
    ("preprocess", ["build-shards", "fashion-mnist", "--bogus"], "preprocess build-shards: unrecognized arguments"),
    ("preprocess", ["verify", "{tmp}/none", "--no-progress"], "preprocess verify: "),
    ("preprocess", ["info", "{tmp}/none"], "preprocess info: "),
    ("preprocess", ["preview", "{tmp}/none", "--out", "{tmp}/p.png"], "preprocess preview: "),
    ("preprocess", ["finalize", "{tmp}/none"], "preprocess finalize: "),
    ("preprocess", ["shuffle-saliency", "{tmp}/none", "--out", "{tmp}/o", "--seed", "abc"],
     "preprocess shuffle-saliency: seed = 'abc'"),
    ("preprocess", ["shuffle-saliency", "{tmp}/none", "--out", "{tmp}/o"], "preprocess shuffle-saliency: "),
    ("sat_train", ["teacher-saliency", "{tmp}/none", "--teacher", "{tmp}/t", "--out", "{tmp}/o", "--explainer", "lime"],
     "sat-train teacher-saliency: explainer 'lime'"),
    ("sat_train", ["fit", "--method", "x"], "sat-train fit: method 'x'"),
    ("sat_train", ["fit", "--epochs", "two"], "sat-train fit: --epochs: epochs = 'two'"),
    ("sat_train", ["eval", "{tmp}/run", "--shards", "{tmp}/s", "--eps", "8"], "sat-train eval: eps = 8 is over 1"),
    ("sat_train", ["eval", "{tmp}/run"], "sat-train eval: the following arguments are required: --shards"),
    ("sat_train", ["compare", "{tmp}/none"], "sat-train compare: "),
    ("sat_train", ["experiment", "{tmp}/none.toml"], "sat-train experiment: "),
]


@pytest.mark.parametrize("package,argv,start", USER_ERRORS, ids=[" ".join(a[:2]) for _, a, _ in USER_ERRORS])
def test_every_user_error_is_one_line_without_traceback(package, argv, start, tmp_path, capsys):
    import importlib

    main = importlib.import_module(f"{package}.cli").main
    try:
        rc = main([a.format(tmp=tmp_path) for a in argv])
    except SystemExit as e:  # argparse refuses from inside the parser
        rc = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert rc not in (0, None) and len(err) == 1, (rc, err)
    assert err[0].startswith(start) and "error:" not in err[0] and "Traceback" not in err[0], err


@pytest.mark.parametrize("command,parser", _parsers(), ids=[c for c, _ in _parsers()])
def test_progress_is_the_same_pair_everywhere(command, parser):
    flags = {s for a in parser._actions for s in a.option_strings}
    assert ("--progress" in flags) == ("--no-progress" in flags), command
    has_bar = command.startswith("build-shards") or command in ("verify", "shuffle-saliency", "teacher-saliency",
                                                                 "fit", "eval", "experiment")
    assert ("--progress" in flags) == has_bar, command


def test_run_folder_and_out_spellings():
    """fit writes its run folder: --run, also --out (what every command writes) and --run-dir (torchrun)."""
    parse = train_config.parse_args
    assert parse(["--run", "runs/a"]) == parse(["--out", "runs/a"]) == parse(["--run-dir", "runs/a"])
    assert parse(["--out", "runs/a"]).run == "runs/a"
