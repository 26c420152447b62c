"""Every flag of `sat-train fit` and `sat-train eval` (and every EvalConfig field, which has no flag for
some) given non-finite, negative, zero and wrong-type values: each is refused with one line, or, where
the value is legal, accepted. The parsers and dataclasses are walked, so a new flag or field is covered
without editing this file; a new flag that accepts 0 or 1.5 must be listed in ACCEPTED on purpose.

Validation goes through the functions the CLIs use (`config_from_argv`), which start nothing."""
from __future__ import annotations

import argparse
import dataclasses

import pytest

from sat_train import evaluate
from sat_train.config import ConfigError, build_parser, config_from_argv
from sat_train.evaluate import EvalConfig, EvalError
from sat_train.fit import main as fit_main

BAD = ["nan", "inf", "-inf", "-1", "0", "abc", "1.5", "1e400"]
# a folder / file name: anything goes, except what argparse takes for a flag ("-inf": write --shards=-inf)
FREE = ["nan", "inf", "-1", "0", "abc", "1.5", "1e400"]
# (flag dest, value) pairs that are legal; every other pair must be refused
FIT_ACCEPTED = {
    **{(dest, v): True for dest in ("shards", "run") for v in FREE},
    **{(dest, "0"): True for dest in ("num_workers", "crop_padding", "eps", "sat_p", "mix_prob", "trades_beta",
                                       "momentum", "weight_decay", "warmup_epochs", "label_smoothing", "seed",
                                       "limit_batches", "stop_after_epochs")},
    **{(dest, "1.5"): True for dest in ("trades_beta", "fgsm_alpha", "lr", "weight_decay", "gamma", "warmup_epochs",
                                         "sat_tau")},
}
EVAL_ACCEPTED = {
    **{(dest, v): True for dest in ("shards", "out") for v in FREE},
    **{(dest, "0"): True for dest in ("cw", "autoattack", "limit", "seed", "distortion_grey")},
    **{(dest, "0"): True for dest in ("cw_confidence", "sanity_tol", "aa_gap", "contrast")},
    **{(dest, "1.5"): True for dest in ("l2_eps", "cw_lr", "cw_initial_const", "cw_confidence", "low_pass",
                                         "high_pass", "sanity_tol", "aa_gap")},
}


def _value_flags(parser: argparse.ArgumentParser):
    """(flag, dest, takes a value) for every optional flag but --help."""
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        takes_value = action.nargs != 0 and not isinstance(action, argparse.BooleanOptionalAction)
        yield action.option_strings[0], action.dest, takes_value


def _outcome(make, argv, capsys) -> str:
    """'accepted', or 'refused' after checking the refusal is one line without a traceback."""
    try:
        make(argv)
    except (ConfigError, EvalError) as e:
        assert "\n" not in str(e), (argv, str(e))
        return "refused"
    except SystemExit as e:  # argparse: wrong type, unknown argument
        err = capsys.readouterr().err.strip()
        assert e.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, (argv, err)
        return "refused"
    return "accepted"


def test_every_fit_flag_refuses_bad_values_in_one_line(capsys):
    flags = list(_value_flags(build_parser()))
    assert len(flags) > 40 and ("--lr", "lr", True) in flags and ("--augment", "augment", False) in flags
    wrong = []
    for flag, dest, takes_value in flags:
        if not takes_value:  # --augment/--no-augment take no value: one given is an unknown argument
            if _outcome(config_from_argv, [flag, "nan"], capsys) != "refused":
                wrong.append((flag, "nan"))
            continue
        for value in BAD:
            want = "accepted" if FIT_ACCEPTED.get((dest, value)) else "refused"
            if _outcome(config_from_argv, [flag, value], capsys) != want:
                wrong.append((flag, value, want))
    assert not wrong, wrong


def test_every_eval_flag_refuses_bad_values_in_one_line(capsys):
    parser = evaluate.build_parser()
    flags = list(_value_flags(parser))
    assert ("--verify-shards", "verify_shards", True) in flags and ("--eps", "eps", True) in flags
    base = ["runs/x", "--shards", "shards/y"]
    wrong = []
    for flag, dest, takes_value in flags:
        for value in (BAD if takes_value else ["nan"]):
            argv = base + [flag, value] if flag != "--shards" else ["runs/x", flag, value]
            want = "accepted" if takes_value and EVAL_ACCEPTED.get((dest, value)) else "refused"
            if _outcome(evaluate.config_from_argv, argv, capsys) != want:
                wrong.append((flag, value, want))
    assert not wrong, wrong


# EvalConfig fields as a TOML file gives them (several have no flag): value -> accepted?
EVAL_FIELD_ACCEPTED = {("cw", 0), ("autoattack", 0), ("limit", 0), ("seed", 0), ("cw_confidence", 0),
                       ("distortion_grey", 0), ("sanity_tol", 0), ("aa_gap", 0), ("contrast", 0),
                       ("distortion_grey", None)}


def test_every_eval_config_field_refuses_bad_values():
    wrong = []
    for f in dataclasses.fields(EvalConfig):
        is_list = isinstance(getattr(EvalConfig(), f.name), list)
        for value in (float("nan"), float("inf"), -1, 0, "abc", None):
            given = [value] if is_list and value is not None else value
            want = (f.name, value) in EVAL_FIELD_ACCEPTED
            try:
                EvalConfig.from_dict({f.name: given})
                got = True
            except EvalError as e:
                assert "\n" not in str(e)
                got = False
            if got != want:
                wrong.append((f.name, value, "accepted" if want else "refused"))
    assert not wrong, wrong


@pytest.mark.parametrize("argv,words", [
    (["--lr", "inf"], "lr = inf"), (["--weight-decay", "nan"], "weight_decay = nan"),
    (["--momentum", "inf"], "momentum = inf"), (["--warmup-epochs", "nan"], "warmup_epochs = nan"),
    (["--arch", "foo"], "unknown architecture 'foo'"), (["--adam-betas", "0.9,nan"], "adam_betas"),
    (["--epochs", "2.5"], "epochs = '2.5'"), (["--no-augment", "x"], "unrecognized arguments: x"),
])
def test_fit_entry_point_refuses_with_one_line_and_exit_2(argv, words, capsys, tmp_path):
    try:
        rc = fit_main(["--shards", str(tmp_path), "--run", str(tmp_path / "run"), *argv])
    except SystemExit as e:  # argparse's own refusals exit from inside the parser
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0] and err[0].startswith("sat-train fit:"), err
    assert not (tmp_path / "run").exists()  # refused before anything was written
