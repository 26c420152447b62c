"""`sat-train fit` end to end on real tiny shard sets (tests/conftest.py), tiny CNN, CPU."""
import json

import pytest
import torch

from sat_train.checkpoint import load_model
from sat_train.config import TrainConfig, from_dict
from sat_train.fit import fit, main
from sat_train.methods import METHODS, curriculum_p

METRIC_KEYS = {"epoch", "loss", "train_acc", "input_acc", "p", "lr", "images_per_s", "epoch_time_s"}


def tiny_cfg(shards, run, **kw):
    base = dict(shards=str(shards), run=str(run), arch="tiny-cnn", epochs=2, batch_size=16, loader_backend="torch",
                num_workers=0, progress=False, lr=0.05, schedule="constant", pgd_steps=3, trades_steps=3)
    return from_dict(base | kw)


def read_metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_two_epochs_and_lowers_the_loss(method, tiny_shards, tmp_path):
    shards = tiny_shards(num_samples=128, per_shard=32)
    run = tmp_path / "run"
    summary = fit(tiny_cfg(shards, run, method=method))
    rows = read_metrics(run)
    assert [r["epoch"] for r in rows] == [0, 1] and all(METRIC_KEYS <= set(r) for r in rows)
    assert rows[1]["loss"] < rows[0]["loss"] - 0.05, rows  # seeded: the margin seen is >= 0.18
    assert all(r["images"] == 128 for r in rows) and sum(rows[0]["perturbations"].values()) == 8
    if "sat" in method:  # the curriculum p per epoch
        assert [r["p"] for r in rows] == [curriculum_p(0), curriculum_p(1)] == [0.0, 1 - 0.6 ** 0.1]
    assert summary["method"] == method and summary["final_loss"] == rows[1]["loss"] and summary["epochs"] == 2


def test_run_folder_contract(tiny_shards, tmp_path):
    shards = tiny_shards(num_samples=64, channels=1, size=16)
    run = tmp_path / "run"
    cfg = tiny_cfg(shards, run, method="sat", sat_p=0.5)
    fit(cfg)
    assert json.loads((run / "config.json").read_text()) == json.loads(json.dumps(cfg.to_dict()))
    assert set(json.loads((run / "config.json").read_text())) == set(TrainConfig().to_dict())
    assert [r["p"] for r in read_metrics(run)] == [0.5, 0.5]
    model, ckpt = load_model(run)
    assert not model.training and ckpt["epoch"] == 2 and ckpt["classes"] == ["class0", "class1", "class2", "class3"]
    assert ckpt["model_spec"] == {"arch": "tiny-cnn", "num_classes": 4, "in_channels": 1, "image_size": 16}
    assert ckpt["shards_fingerprint"] == {"digest": "tiny-0-64"} and ckpt["config"]["method"] == "sat"
    assert {"optimizer", "scheduler", "rng", "satpipe_version"} <= set(ckpt)
    assert model(torch.rand(2, 1, 16, 16)).shape == (2, 4)
    summary = json.loads((run / "summary.json").read_text())
    for key in ("method", "saliency_source", "epochs", "train_time_s", "images_per_s", "final_loss", "final_train_acc"):
        assert key in summary
    assert not list(run.rglob(".*tmp*"))


def test_cli_errors_are_one_line(tiny_shards, tmp_path, capsys):
    shards = tiny_shards(num_samples=32)
    run = tmp_path / "run"
    args = ["--shards", str(shards), "--run", str(run), "--arch", "tiny-cnn", "--epochs", "1", "--batch-size", "16",
            "--loader-backend", "torch", "--num-workers", "0", "--no-progress"]
    assert main(args) == 0
    assert (run / "summary.json").exists()
    capsys.readouterr()
    assert main(args) == 2  # would mix two runs in one folder
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a run" in err[0] and str(run) in err[0]
    assert main(args + ["--overwrite", "--method", "standard"]) == 0
    assert json.loads((run / "config.json").read_text())["method"] == "standard"
    capsys.readouterr()
    assert main(["--shards", str(tmp_path / "nope"), "--run", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0]
    assert main(["--run", str(tmp_path / "r3"), "--resume"]) == 2
    assert "config.json" in capsys.readouterr().err
    assert main(["--epochs", "1"]) == 2 and "--shards" in capsys.readouterr().err
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(args[:2] + ["--run", str(blocker / "run")] + args[4:]) == 2  # run folder cannot be made
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a-file" in err[0]


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["sat", "sat+trades"])
def test_cuda_bf16_channels_last(method, tiny_shards, tmp_path):
    shards = tiny_shards(num_samples=128, per_shard=32)
    run = tmp_path / "run"
    summary = fit(tiny_cfg(shards, run, method=method, device="cuda", amp="bf16", channels_last=True,
                           loader_backend="auto", num_workers=2))
    rows = read_metrics(run)
    assert summary["device"].startswith("cuda") and rows[1]["loss"] < rows[0]["loss"]
    model, ckpt = load_model(run, device="cpu")
    assert next(model.parameters()).device.type == "cpu" and ckpt["epoch"] == 2
