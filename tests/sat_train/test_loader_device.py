"""The device-resident backend: the DALI backend's batches to the bit, its budget, resume, CUDA."""
import numpy as np
import pytest
import torch

from sat_train.checkpoint import load_checkpoint
from sat_train.config import ConfigError, from_dict
from sat_train.fit import main
from sat_train.loader import LoaderError, make_loader
from sat_train.loader.augment import crop_flip, crop_flip_gather, to_model_inputs
from sat_train.loader.plan import epoch_plan
from shards.manifest import read_manifest
from shards.reading import read_dali_index


def batches(loader, epoch):
    loader.set_epoch(epoch)
    return list(loader)


def assert_same(got, want):
    """Two epochs of (x, s, y, keys) batches are identical: keys, and tensors bit for bit."""
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a[3] == b[3] and all(torch.equal(u.cpu(), v.cpu()) for u, v in zip(a[:3], b[:3]))


@pytest.mark.parametrize("padding,flip", [(4, True), (0, True), (6, False)])
def test_same_batches_as_dali_including_the_augmentation_draws(tiny_shards, padding, flip):
    root = tiny_shards(num_samples=70, per_shard=16)
    kw = dict(train=True, device="cpu", with_keys=True, seed=7, crop_padding=padding, flip=flip)
    dev, dali = make_loader(root, 8, backend="device", **kw), make_loader(root, 8, backend="dali", **kw)
    assert dev.backend == "device" and len(dev) == len(dali) == 8
    for epoch in (0, 3):
        got = batches(dev, epoch)
        assert len(got) == 8 and all(x.dtype == torch.float32 and x.is_contiguous() for x, *_ in got)
        assert_same(got, batches(dali, epoch))
    # the CUDA path (one torch gather per batch) run on CPU tensors gives the CPU path's tensors
    order = dev._order(epoch_plan(dev.layout, dev.seed, 3))
    draws = dev._draws(3, len(order))
    for a, b in zip(dev._cpu_batches(order, *draws), dev._device_batches(order, *draws)):
        b = to_model_inputs(*b, torch.device("cpu"))
        assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_torch_gather_follows_the_numpy_definition():
    rng = np.random.default_rng(0)
    store = rng.integers(0, 256, (20, 4, 9, 7), dtype=np.uint8)  # (N, C, H, W): odd sizes, non-square
    idx = rng.integers(0, 20, 32)
    dy, dx = rng.integers(-3, 4, 32), rng.integers(-3, 4, 32)
    mirror = rng.integers(0, 2, 32).astype(bool)
    want = crop_flip(store[idx].transpose(0, 2, 3, 1), dy, dx, mirror, 3).transpose(0, 3, 1, 2)
    got = crop_flip_gather(torch.from_numpy(store), *(torch.from_numpy(a) for a in (idx, dy, dx, mirror)))
    assert np.array_equal(got.numpy(), want)


def test_a_set_over_the_budget_is_refused_before_decoding(tiny_shards):
    root = tiny_shards(num_samples=40, per_shard=16)
    # break one image's bytes (size unchanged): decoding it fails, so a budget message proves no decode ran
    manifest = read_manifest(root)
    ext, offset, size, _ = next(c for c in read_dali_index(manifest.index_paths()[0])[0] if c[0] == "png")
    with open(manifest.tar_paths()[0], "r+b") as f:
        f.seek(offset)
        f.write(b"\0" * size)
    with pytest.raises(LoaderError, match="does not decode"):
        make_loader(root, 8, train=True, backend="device", device="cpu", verify="size")
    with pytest.raises(LoaderError) as err:
        make_loader(root, 8, train=True, backend="device", device="cpu", verify="size", memory_fraction=1e-9)
    msg = str(err.value)
    assert "too large for the device loader" in msg and "40 samples of 16x16x3" in msg and "available host RAM" in msg
    assert "\n" not in msg and "--loader-backend" in msg
    with pytest.raises(LoaderError, match="memory_fraction"):
        make_loader(root, 8, train=True, backend="device", device="cpu", memory_fraction=1.5)
    with pytest.raises(ConfigError, match="loader_memory_fraction"):
        from_dict({"shards": str(root), "loader_memory_fraction": 0.0})


def test_abandoned_pass_and_a_fresh_loader_give_the_same_epoch(tiny_shards):
    root = tiny_shards(num_samples=70, per_shard=16)
    a = make_loader(root, 8, train=True, backend="device", device="cpu", with_keys=True, num_workers=0)
    batches(a, 0)
    a.set_epoch(1)
    for i, _ in enumerate(a):  # a pass given up half way (an exception, a limit_batches run)
        if i == 2:
            break
    fresh = make_loader(root, 8, train=True, backend="device", device="cpu", with_keys=True, num_workers=0)
    assert_same(batches(a, 2), batches(fresh, 2))


def _fit_args(shards, run, *extra):
    return ["--shards", str(shards), "--run", str(run), "--arch", "tiny-cnn", "--epochs", "2", "--batch-size", "16",
            "--loader-backend", "device", "--num-workers", "0", "--no-progress", "--method", "sat", "--lr", "0.05",
            *extra]


def test_resumed_run_ends_bit_identical_to_an_uninterrupted_one(tiny_shards, tmp_path, capsys):
    shards = tiny_shards(num_samples=48, per_shard=16)
    full, parts = tmp_path / "full", tmp_path / "parts"
    assert main(_fit_args(shards, full)) == 0
    assert main(_fit_args(shards, parts, "--stop-after-epochs", "1")) == 0
    assert main(["--run", str(parts), "--resume", "--stop-after-epochs", "0"]) == 0
    assert "loader device" in capsys.readouterr().err
    a, b = load_checkpoint(full), load_checkpoint(parts)
    assert a["epoch"] == b["epoch"] == 2
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


@pytest.mark.gpu
def test_on_cuda_the_same_batches_as_on_cpu_and_auto_picks_it(tiny_shards, capsys):
    root = tiny_shards(num_samples=70, per_shard=16)
    kw = dict(train=True, with_keys=True, seed=5)
    auto = make_loader(root, 8, backend="auto", device="cuda", **kw)
    assert auto.backend == "device" and "backend auto -> device" in capsys.readouterr().err
    assert auto.pixels.is_cuda and auto.labels.is_cuda
    ref = make_loader(root, 8, backend="device", device="cpu", **kw)
    for epoch in (0, 1):
        got = batches(auto, epoch)
        assert got[0][0].is_cuda and got[0][1].is_cuda and got[0][2].is_cuda
        assert_same(got, batches(ref, epoch))
    with pytest.raises(LoaderError, match="free on cuda"):
        make_loader(root, 8, backend="device", device="cuda", memory_fraction=1e-12, **kw)
    big = make_loader(root, 8, backend="auto", device="cuda", memory_fraction=1e-12, **kw)
    assert big.backend != "device" and "does not fit" in capsys.readouterr().err
