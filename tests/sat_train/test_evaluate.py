"""`sat-train eval` end to end on real tiny shards (tests/conftest.py) and a small trained checkpoint:
results JSON, accuracy under attack <= clean, determinism, clear errors, gradient-masking checks."""
import json

import pytest
import torch
import torch.nn.functional as F

from sat_train.checkpoint import checkpoint_path, save_checkpoint
from sat_train.evaluate import EvalConfig, EvalError, format_table, main
from sat_train.loader import make_loader
from sat_train.models import build_model, model_spec

SMALL = ["--eps", "2/255,8/255", "--check-steps", "2,5", "--pgd-steps", "10", "--l2-eps", "0.5", "--cw", "24",
         "--batch-size", "32", "--no-progress"]


def make_run(run_dir, shard_dir, *, steps=40, version=None, drop=()):
    """A run folder as `sat-train fit` leaves it, trained for a few seconds (standard training)."""
    loader = make_loader(shard_dir, 32, train=False, backend="torch", num_workers=0, device="cpu")
    m = loader.manifest
    size = m.image["height"]
    torch.manual_seed(0)
    model = build_model("tiny-cnn", m.num_classes, m.image["channels"], size)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    batches = list(loader)
    for i in range(steps):
        x, _s, y = batches[i % len(batches)]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    state = {"model": model.state_dict(), "model_spec": model_spec("tiny-cnn", m.num_classes, m.image["channels"], size),
             "config": {"method": "standard", "arch": "tiny-cnn"}, "epoch": 1, "classes": m.classes,
             "shards_fingerprint": m.fingerprint}
    for k in drop:
        del state[k]
    path = save_checkpoint(checkpoint_path(run_dir), state)
    if version is not None:  # rewrite as another checkpoint format version
        ckpt = torch.load(path, weights_only=True)
        ckpt["checkpoint_version"] = version
        torch.save(ckpt, path)
    return run_dir


@pytest.fixture
def trained(tiny_shards, tmp_path):
    train = tiny_shards(num_samples=96, size=16, channels=3, num_classes=4, seed=0)
    test = tiny_shards(num_samples=48, size=16, channels=3, num_classes=4, seed=1, split="test")
    return make_run(tmp_path / "run", train), test


def test_eval_writes_results_and_attacks_never_beat_clean(trained, capsys):
    run, test = trained
    # AutoAttack at a budget that breaks every sample in its first stage: its stages are covered (slowly) in
    # test_autoattack.py; here it only has to plug into the suite
    assert main([str(run), "--shards", str(test), "--autoattack", "6", "--autoattack-eps", "64/255", *SMALL]) == 0
    out = capsys.readouterr().out
    result = json.loads((run / "eval" / f"{test.name}.json").read_text())
    rows = result["rows"]
    clean = rows[0]
    assert clean["attack"] == "clean" and clean["n"] == 48 and 0.3 < clean["accuracy"] <= 1.0
    kinds = {(r["attack"], r["norm"]) for r in rows}
    assert {("fgsm", "linf"), ("pgd", "linf"), ("pgd", "l2"), ("cw-l2", "l2"), ("autoattack", "linf"),
            ("contrast", None), ("low-pass", None), ("high-pass", None)} <= kinds
    pgd = {r["eps_255"]: r for r in rows if r["attack"] == "pgd" and r["norm"] == "linf" and r["params"]["steps"] == 10}
    assert set(pgd) == {2, 8} and pgd[8]["params"]["step_size"] == pytest.approx(2 / 255)
    for r in rows:
        assert set(r) >= {"accuracy", "n", "params", "time_s"}
        if r["attack"] in ("fgsm", "pgd", "cw-l2", "autoattack"):
            assert r["accuracy"] <= clean["accuracy"] + 1e-9, r
    assert pgd[8]["accuracy"] < clean["accuracy"]  # 8/255 does hurt an undefended model
    cw = next(r for r in rows if r["attack"] == "cw-l2")
    aa = next(r for r in rows if r["attack"] == "autoattack")
    assert cw["n"] == 24 and aa["n"] == 6 and list(aa["params"]["stages"]) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert aa["params"]["max_linf"] <= 64 / 255 + 1e-6 and aa["accuracy"] <= clean["accuracy"]
    assert len([r for r in rows if r["attack"] == "contrast"]) == 6
    assert result["config"]["eps"] == [2 / 255, 8 / 255] and result["results_version"] == 2 and isinstance(result["sanity"]["warnings"], list)
    assert result["model"] == {"batchnorm_folded": True, "batchnorm_layers": 2, "reason": None}  # which model ran
    # the printed table has every row and the sanity verdict
    assert "autoattack" in out and "high-pass" in out and out.count("\npgd ") == len([r for r in rows if r["attack"] == "pgd"])
    assert ("gradient-masking checks: all passed" in out) == result["sanity"]["passed"]
    assert not list((run / "eval").glob(".*tmp*"))  # written atomically: no temp file left behind


def test_eval_is_deterministic_with_a_seed(trained, tmp_path):
    run, test = trained
    args = [str(run), "--shards", str(test), *SMALL, "--no-distortions", "--seed", "3"]
    outs = [tmp_path / "a.json", tmp_path / "b.json"]
    for out in outs:
        assert main([*args, "--out", str(out)]) == 0
    a, b = (json.loads(p.read_text())["rows"] for p in outs)
    assert [(r["attack"], r["eps"], r["correct"]) for r in a] == [(r["attack"], r["eps"], r["correct"]) for r in b]
    # batching does not change clean accuracy (eval mode: no batch statistics), and --limit cuts exactly
    assert main([*args, "--out", str(tmp_path / "c.json"), "--batch-size", "7"]) == 0
    assert json.loads((tmp_path / "c.json").read_text())["rows"][0]["correct"] == a[0]["correct"]
    assert main([*args, "--out", str(tmp_path / "d.json"), "--limit", "20"]) == 0
    d = json.loads((tmp_path / "d.json").read_text())
    assert d["n"] == 20 and all(r["n"] == 20 for r in d["rows"] if r["attack"] != "cw-l2")


def test_wrong_number_of_classes_is_a_one_line_error(trained, tiny_shards, capsys):
    run, _ = trained
    other = tiny_shards(num_samples=16, size=16, channels=3, num_classes=3, seed=2, split="test")
    assert main([str(run), "--shards", str(other), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "4 classes" in err and "has 3" in err and "manifest.json" in err


def test_wrong_image_size_or_channels_is_a_one_line_error(trained, tiny_shards, capsys):
    run, _ = trained
    grey = tiny_shards(num_samples=16, size=16, channels=1, num_classes=4, seed=2, split="test")
    assert main([str(run), "--shards", str(grey), "--no-progress"]) == 2
    assert "3-channel" in capsys.readouterr().err
    big = tiny_shards(num_samples=16, size=20, channels=3, num_classes=4, seed=2, split="test")
    assert main([str(run), "--shards", str(big), "--no-progress"]) == 2
    assert "16px" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["old-version", "no-model-spec", "no-checkpoint"])
def test_old_or_missing_checkpoint_is_a_one_line_error(kind, tiny_shards, tmp_path, capsys):
    shards = tiny_shards(num_samples=32, size=16, channels=3, num_classes=4)
    run = tmp_path / "run"
    if kind == "old-version":
        make_run(run, shards, steps=1, version=0)
    elif kind == "no-model-spec":
        make_run(run, shards, steps=1, drop=("model_spec",))
    else:
        run.mkdir()
    assert main([str(run), "--shards", str(shards), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "last.pt" in err and "Traceback" not in err
    assert {"old-version": "format 0", "no-model-spec": "model_spec", "no-checkpoint": "no checkpoint"}[kind] in err


def test_bad_inputs_and_config(trained, tmp_path, capsys):
    run, test = trained
    assert main([str(tmp_path / "nope"), "--shards", str(test)]) == 2
    assert "no such run folder" in capsys.readouterr().err
    assert main([str(run), "--shards", str(tmp_path)]) == 2
    assert "manifest" in capsys.readouterr().err
    cfg = tmp_path / "eval.toml"
    cfg.write_text('eps = ["1/255", 0.0078]\npgd_stepz = 3\n')
    assert main([str(run), "--shards", str(test), "--config", str(cfg)]) == 2
    assert "unknown config key(s) pgd_stepz" in capsys.readouterr().err
    with pytest.raises(EvalError, match="pgd_restarts"):
        EvalConfig.from_dict({"pgd_restarts": 0})
    with pytest.raises(EvalError, match="pgd_steps = 'ten' is not a valid int"):
        EvalConfig.from_dict({"pgd_steps": "ten"})
    with pytest.raises(EvalError, match="eps = 8 is not a valid list"):
        EvalConfig.from_dict({"eps": 8})
    assert EvalConfig.from_dict({"distortion_grey": 0.4423, "sanity_tol": 1}).sanity_tol == 1
    with pytest.raises(EvalError, match="eps = 2 is over 1: .* write 2/255"):  # the old unit is refused, not misread
        EvalConfig.from_dict({"eps": [2, 8]})
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "sat-train eval runs/sat --shards" in capsys.readouterr().out


def test_masking_checks_flag_a_masked_model():
    """A model whose gradient is zero (a hard step function) fools PGD and FGSM but not a real attack:
    the sanity checks must speak up when accuracy rises with eps or PGD beats FGSM."""
    from sat_train.sanity import masking_checks

    def row(attack, eps, steps, correct, norm="linf"):
        t = torch.tensor(correct, dtype=torch.bool)
        return {"attack": attack, "norm": norm, "eps": eps, "params": {"steps": steps}, "n": len(t), "per_sample": t,
                "accuracy": t.float().mean().item()}

    good = [row("clean", None, None, [1, 1, 1, 1], None), row("fgsm", 2 / 255, 1, [1, 1, 1, 0]),
            row("pgd", 2 / 255, 10, [1, 1, 0, 0]), row("pgd", 8 / 255, 10, [1, 0, 0, 0]),
            row("pgd", 8 / 255, 5, [1, 1, 0, 0]), row("autoattack", 8 / 255, None, [1, 0])]
    assert masking_checks(good, main_steps=10) == []
    bad = [row("clean", None, None, [1, 1, 1, 0], None), row("fgsm", 2 / 255, 1, [1, 0, 0, 0]),
           row("pgd", 2 / 255, 10, [1, 1, 0, 0]), row("pgd", 8 / 255, 10, [1, 1, 1, 0]),
           row("pgd", 8 / 255, 5, [1, 0, 0, 0]), row("autoattack", 8 / 255, None, [0, 0, 0])]
    text = "\n".join(masking_checks(bad, main_steps=10))
    assert "rises with eps" in text and "more PGD steps" in text and "weaker than FGSM" in text
    assert "AutoAttack" in text and "points below" in text


def test_format_table_lists_every_row():
    rows = [{"attack": "clean", "norm": None, "eps": None, "eps_255": None, "level": None, "params": {}, "n": 10,
             "accuracy": 0.9, "time_s": 0.1},
            {"attack": "pgd", "norm": "linf", "eps": 8 / 255, "eps_255": 8.0, "level": None, "params": {"steps": 20},
             "n": 10, "accuracy": 0.4, "time_s": 1.0},
            {"attack": "low-pass", "norm": None, "eps": None, "eps_255": None, "level": 4.0, "params": {}, "n": 10,
             "accuracy": 0.7, "time_s": 0.2}]
    table = format_table(rows)
    assert "90.00" in table and "8/255" in table and "40.00" in table and "sigma=4" in table


def test_prepare_for_attack_folds_batchnorm_into_the_same_function():
    from sat_train.robustness import prepare_for_attack

    torch.manual_seed(0)
    model = build_model("cnn4", 10, 1, 28)
    for m in model.modules():  # non-trivial running statistics, as after training
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    x = torch.rand(8, 1, 28, 28)
    folded, record = prepare_for_attack(model, x[:2])
    assert record == {"batchnorm_folded": True, "batchnorm_layers": 4, "reason": None}
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert not any(p.requires_grad for p in folded.parameters()) and not folded.training
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-5)
    # input gradients (what attacks use) agree too
    from sat_train.attacks import input_grad

    y = torch.arange(8) % 10
    torch.testing.assert_close(input_grad(folded, x, y), input_grad(model, x, y), rtol=1e-3, atol=1e-6)

    class Branchy(torch.nn.Module):  # data-dependent control flow: fx cannot trace it, used as is
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, z):
            return self.fc(z) if z.sum() > 0 else -self.fc(z)

    b = Branchy()
    assert prepare_for_attack(b, torch.rand(2, 4)) == (b, {"batchnorm_folded": False, "batchnorm_layers": 0,
                                                          "reason": "the model has no BatchNorm layers"})


def test_a_batchnorm_folding_failure_is_recorded_not_swallowed():
    """A model fx cannot trace is attacked unfolded, and the results say so and why (it used to be silent)."""
    from sat_train.robustness import prepare_for_attack

    class BranchyBN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)

        def forward(self, z):
            z = self.bn(self.conv(z))
            return z.mean((2, 3)) if z.sum() > 0 else -z.mean((2, 3))

    model = BranchyBN()
    same, record = prepare_for_attack(model, torch.rand(2, 3, 8, 8))
    assert same is model and record["batchnorm_folded"] is False and record["batchnorm_layers"] == 1
    assert record["reason"].startswith("torch.fx could not trace the model: TraceError")
    # (eval writes the record into its results: see test_eval_writes_results_and_attacks_never_beat_clean)


def test_results_written_in_1_255_units_compare_equal_to_todays_config():
    """`experiment` keeps evaluations written before eps moved to [0, 1] units (results_version 1): the same
    budgets, written in either unit, must not look like a changed config."""
    from sat_train.evaluate import comparable_config

    old = {"eps": [2, 8, 25.5], "autoattack_eps": 25.5, "pgd_steps": 20}
    new = EvalConfig.from_dict({"eps": ["2/255", "8/255", 0.1], "autoattack_eps": "25.5/255"}).to_dict()
    a, b = comparable_config(old, 1), comparable_config(new)
    assert a["eps"] == b["eps"] and a["autoattack_eps"] == b["autoattack_eps"] == 0.1
    assert comparable_config(new)["eps"] != comparable_config({"eps": [2 / 255, 8 / 255, 0.2]})["eps"]
