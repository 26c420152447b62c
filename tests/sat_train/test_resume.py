"""A run stopped after epoch k and resumed ends bit-identical to an uninterrupted run (CPU)."""
import json

import torch

from sat_train.checkpoint import load_checkpoint
from sat_train.fit import main


def _args(shards, run, *extra):
    return ["--shards", str(shards), "--run", str(run), "--arch", "tiny-cnn", "--epochs", "3", "--batch-size", "16",
            "--loader-backend", "torch", "--num-workers", "0", "--no-progress", "--method", "sat+pgd",
            "--pgd-steps", "2", "--lr", "0.05", "--deterministic", *extra]


def _metrics(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in ("epoch", "loss", "train_acc", "input_acc", "p", "lr", "perturbations")} for r in rows]


def test_resume_is_bit_identical(tiny_shards, tmp_path):
    shards = tiny_shards(num_samples=64, per_shard=16)
    full, parts = tmp_path / "full", tmp_path / "parts"
    assert main(_args(shards, full)) == 0
    assert main(_args(shards, parts, "--stop-after-epochs", "1")) == 0
    assert load_checkpoint(parts)["epoch"] == 1 and not (parts / "summary.json").exists()
    # a crash after epoch 2's metrics line but before its checkpoint: resume must drop that stale line
    with open(parts / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 1, "loss": 123.0}) + "\n")
    assert main(["--run", str(parts), "--resume", "--stop-after-epochs", "1"]) == 0
    assert main(["--run", str(parts), "--resume"]) == 0  # everything else comes from RUN/config.json
    a, b = load_checkpoint(full), load_checkpoint(parts)
    assert a["epoch"] == b["epoch"] == 3
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 3 * 4
    assert _metrics(full) == _metrics(parts)
    assert (parts / "summary.json").exists()


def test_resume_refuses_other_settings(tiny_shards, tmp_path, capsys):
    shards = tiny_shards(num_samples=32, per_shard=16)
    run = tmp_path / "run"
    assert main(_args(shards, run, "--stop-after-epochs", "1")) == 0
    capsys.readouterr()
    assert main(["--run", str(run), "--resume", "--method", "pgd"]) == 2
    assert "cannot change method" in capsys.readouterr().err
    other = tiny_shards(num_samples=32, per_shard=16, seed=5)
    assert main(["--run", str(run), "--resume", "--shards", str(other)]) == 2
    assert "fingerprint differs" in capsys.readouterr().err


def test_fit_leaves_the_determinism_switch_as_found(tiny_shards, tmp_path):
    assert not torch.are_deterministic_algorithms_enabled()
    assert main(_args(tiny_shards(num_samples=32, per_shard=16), tmp_path / "run", "--epochs", "1")) == 0
    assert not torch.are_deterministic_algorithms_enabled()
