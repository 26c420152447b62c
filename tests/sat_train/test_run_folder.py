"""The run folder's optional TensorBoard events (`sat-train fit --tensorboard`) and the per-epoch line:
a real tiny fit on the tiny shard sets of tests/conftest.py, events read back with TensorBoard's own reader."""
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sat_train.fit import fit, main
from sat_train.run_folder import TENSORBOARD_DIR, tensorboard_scalars

sys.path.insert(0, str(Path(__file__).parent))
from test_fit import read_metrics  # noqa: E402
from test_fit import tiny_cfg as fit_cfg  # noqa: E402


def tiny_cfg(shards, run, **kw):  # 2 batches per epoch; cosine, so lr differs per epoch
    return fit_cfg(shards, run, **{"schedule": "cosine", "limit_batches": 2, "pgd_steps": 2} | kw)


def read_events(run) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run / TENSORBOARD_DIR))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def expected(rows, method) -> dict[str, list[tuple[int, float]]]:
    out = {}
    for r in rows:
        for tag, value in tensorboard_scalars(r, method).items():
            out.setdefault(tag, []).append((r["epoch"] + 1, value))
    return out


def assert_same(events, want):
    assert set(events) == set(want)
    for tag, points in want.items():  # events hold float32
        assert [s for s, _ in events[tag]] == [s for s, _ in points], tag
        assert [v for _, v in events[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag


@pytest.mark.parametrize("method", ["sat+pgd", "standard"])
def test_tensorboard_events_hold_the_metrics_lines(method, tiny_shards, tmp_path):
    run = tmp_path / "run"
    fit(tiny_cfg(tiny_shards(num_samples=64, per_shard=32), run, method=method, tensorboard=True))
    rows = read_metrics(run)
    events = read_events(run)
    assert_same(events, expected(rows, method))
    for key in ("loss", "train_acc", "input_acc", "lr", "images_per_s", "epoch_time_s"):
        assert [v for _, v in events[key]] == pytest.approx([r[key] for r in rows], rel=1e-6)
    assert ("p" in events) == (method == "sat+pgd")  # p means nothing to methods without SAT's curriculum
    assert events["lr"][0][1] > events["lr"][1][1]  # the cosine schedule, per epoch


def test_a_resumed_run_continues_its_events_and_overwrite_clears_them(tiny_shards, tmp_path):
    shards = tiny_shards(num_samples=64, per_shard=32)
    run = tmp_path / "run"
    fit(tiny_cfg(shards, run, method="sat", epochs=3, tensorboard=True, stop_after_epochs=2))
    fit(tiny_cfg(shards, run, method="sat", epochs=3, tensorboard=True, resume=True))
    rows = read_metrics(run)
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert_same(read_events(run), expected(rows, "sat"))
    fit(tiny_cfg(shards, run, method="sat", epochs=1, overwrite=True))  # a new run without --tensorboard
    assert not (run / TENSORBOARD_DIR).exists()


def test_tensorboard_without_the_package_is_one_line(tiny_shards, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if it were not installed
    run = tmp_path / "run"
    args = ["--shards", str(tiny_shards(num_samples=32)), "--run", str(run), "--arch", "tiny-cnn", "--epochs", "1",
            "--loader-backend", "torch", "--num-workers", "0", "--no-progress", "--tensorboard"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sat-train fit: ")
    assert err[0].endswith("--tensorboard needs the tensorboard package: pip install 'satpipe[tensorboard]'")
    assert not (run / "metrics.jsonl").exists()


@pytest.mark.parametrize("method, shows_p", [("standard", False), ("fgsm-rs", False), ("sat+trades", True)])
def test_the_epoch_line_shows_p_only_for_methods_with_the_curriculum(method, shows_p, tiny_shards, tmp_path, capsys):
    run = tmp_path / "run"
    fit(tiny_cfg(tiny_shards(num_samples=32), run, method=method, sat_p=0.25, trades_steps=2))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 2 and all(("  p 0.250  " in line) == shows_p for line in lines), lines
    assert [r["p"] for r in read_metrics(run)] == [0.25, 0.25]  # metrics.jsonl keeps p for every method
