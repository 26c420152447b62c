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


def _cli(shards, run, *extra):
    return ["--shards", str(shards), "--run", str(run), "--arch", "tiny-cnn", "--batch-size", "16",
            "--loader-backend", "torch", "--num-workers", "0", "--no-progress", "--method", "standard", *extra]


def test_a_diverging_run_stops_with_one_line_and_keeps_the_last_good_checkpoint(tiny_shards, tmp_path, capsys):
    """lr x 1e30 from the middle of training (piecewise, gamma 1e30): epoch 1 is fine, epoch 2 diverges.
    The run must stop with one line naming the epoch and step, exit 2, and keep epoch 1's checkpoint."""
    shards = tiny_shards(num_samples=32, per_shard=16)
    run = tmp_path / "run"
    rc = main(_cli(shards, run, "--epochs", "2", "--lr", "0.05", "--schedule", "piecewise", "--milestones", "0.5",
                   "--gamma", "1e30"))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("sat-train fit: training diverged in epoch 2: "), err
    assert f"{run}/checkpoints/last.pt keeps epoch 1, the last good one" in err[-1]
    assert [ln for ln in err if ln.startswith("epoch ")] == [next(ln for ln in err if ln.startswith("epoch 1/2"))]
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())
    assert [r["epoch"] for r in read_metrics(run)] == [0] and not (run / "summary.json").exists()


def test_divergence_in_the_first_epoch_leaves_a_folder_a_plain_rerun_starts(tiny_shards, tmp_path, capsys):
    shards = tiny_shards(num_samples=32, per_shard=16)
    run = tmp_path / "run"
    assert main(_cli(shards, run, "--epochs", "1", "--lr", "1e30")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "training diverged in epoch 1: loss became" in err[-1] and "no checkpoint was written" in err[-1], err
    assert not (run / "checkpoints" / "last.pt").exists() and (run / "config.json").exists()
    assert main(["--run", str(run), "--resume"]) == 2  # --resume starts it too (and diverges again: same lr)
    err = capsys.readouterr().err
    assert "holds no checkpoint yet (stopped in its first epoch): starting it from epoch 1" in err
    assert "training diverged in epoch 1" in err
    # as a kill between the first metrics line and the first checkpoint leaves it, with a checkpoint's temp file
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 0, "loss": 1.0}) + "\n")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / ".last.pt.tmp-99999").write_bytes(b"half a checkpoint")
    assert main(_cli(shards, run, "--epochs", "1", "--lr", "0.05")) == 0  # not a run yet: no --overwrite needed
    assert read_metrics(run)[0]["loss"] != 1.0 and not list((run / "checkpoints").glob(".*tmp*"))
    err = capsys.readouterr().err
    assert "epoch 1/1  loss " in err and "img/s" in err and " left" in err  # the epoch line, without a bar
    assert "\r" not in err  # no progress bar when stderr is not a terminal


def test_non_finite_loss_verdict_is_shared_by_every_rank(tmp_path):
    """Under DDP one rank's nan must stop every rank at the same step (a rank that stopped alone would
    leave the others waiting in a collective): 2 gloo processes, the nan on rank 1 only."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import sys, torch, torch.distributed as dist
        from sat_train import distributed as D
        from sat_train.fit import _NonFinite, _check_finite
        rank = int(sys.argv[1])
        dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=2)
        info = D.DistInfo(rank=rank, world_size=2, backend="gloo")
        losses = torch.ones(20)
        _check_finite(losses, 9, info)  # all finite: no rank stops
        if rank == 1:
            losses[13] = float("nan")
        try:
            _check_finite(losses, 19, info)
            print("went on")
        except _NonFinite as e:
            print(f"stopped at {e.step}")
        dist.destroy_process_group()
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(r), str(tmp_path / "store")], text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [o.strip() for o, _ in outs] == ["stopped at 13", "stopped at 13"], outs
