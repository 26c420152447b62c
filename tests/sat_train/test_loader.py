"""The loader backends on real shard sets: sets, order, pixels, augmentation alignment, seeds."""
import cv2
import numpy as np
import pytest
import torch

from sat_train.loader import make_loader
from shards.format import decode_label
from shards.manifest import read_manifest
from shards.reading import iter_tar_samples

BACKENDS = ["dali", "torch", "device"]


def truth(root):
    """key -> (image uint8 HWC, saliency uint8 HW, label), decoded independently of the loader."""
    m = read_manifest(root)
    h, w, c = m.image["height"], m.image["width"], m.image["channels"]
    out = {}
    for tar in m.tar_paths():
        for smp in iter_tar_samples(tar):
            if "raw" in smp:
                img = np.frombuffer(smp["raw"], np.uint8).reshape(h, w, c)
            else:
                data = np.frombuffer(smp.get("png", smp.get("jpg")), np.uint8)
                img = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE)[..., None] if c == 1 else \
                    cv2.imdecode(data, cv2.IMREAD_COLOR)[..., ::-1]
            sal = cv2.imdecode(np.frombuffer(smp["sal.png"], np.uint8), cv2.IMREAD_GRAYSCALE)
            out[smp["__key__"]] = (img, sal, decode_label(smp["label.i64"]))
    return out


def run_epoch(loader, epoch=0):
    loader.set_epoch(epoch)
    xs, ss, ys, keys = [], [], [], []
    for x, s, y, k in loader:
        xs.append(x), ss.append(s), ys.append(y), keys.extend(k)
    return torch.cat(xs), torch.cat(ss), torch.cat(ys), keys


def as_uint8(x, s):
    """Back to the stored levels: x*255, (s+1)*127.5 (exact for the loader's conversions)."""
    xi = torch.round(x * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    si = torch.round((s + 1) * 127.5).to(torch.uint8)[:, 0].numpy()
    return xi, si


@pytest.fixture
def png_set(tiny_shards):
    return tiny_shards(num_samples=70, per_shard=16)


def test_backends_yield_same_keys_labels_and_order_per_epoch(png_set):
    ref = truth(png_set)
    loaders = {b: make_loader(png_set, 8, train=True, backend=b, device="cpu", with_keys=True) for b in BACKENDS}
    orders = {}
    for b, loader in loaders.items():
        assert loader.backend == b and len(loader) == 8 and loader.num_samples == 64
        for epoch in (0, 1):
            x, s, y, keys = run_epoch(loader, epoch)
            assert x.dtype == s.dtype == torch.float32 and y.dtype == torch.int64
            assert x.shape == (64, 3, 16, 16) and s.shape == (64, 1, 16, 16)
            assert 0 <= x.min() and x.max() <= 1 and -1 <= s.min() and s.max() <= 1
            assert len(set(keys)) == 64 and set(keys) <= set(ref)  # once each; 6 dropped by drop_last
            assert y.tolist() == [ref[k][2] for k in keys]  # each label belongs to its sample
            orders[b, epoch] = keys
    # every backend follows the same plan, so they even agree on the order
    for epoch in (0, 1):
        assert orders["dali", epoch] == orders["torch", epoch] == orders["device", epoch]
    assert orders["dali", 0] != orders["dali", 1]  # reshuffled per epoch


@pytest.mark.parametrize("fmt,channels", [("png", 3), ("raw", 3), ("png", 1)])
def test_eval_pixels_exact_in_order_for_every_backend(tiny_shards, fmt, channels):
    root = tiny_shards(num_samples=37, per_shard=16, image_format=fmt, channels=channels)
    ref = truth(root)
    outs = {}
    for b in BACKENDS:
        loader = make_loader(root, 8, train=False, backend=b, device="cpu", with_keys=True)
        assert len(loader) == 5 and loader.num_samples == 37
        x, s, y, keys = run_epoch(loader)
        assert keys == sorted(ref)  # eval: manifest order, every sample once, partial batch kept
        xi, si = as_uint8(x, s)
        assert np.array_equal(xi, np.stack([ref[k][0] for k in keys]))
        assert np.array_equal(si, np.stack([ref[k][1] for k in keys]))
        outs[b] = (x, s, y)
    for a, b, c in zip(outs["dali"], outs["torch"], outs["device"]):
        assert torch.equal(a, b) and torch.equal(a, c)  # DALI CPU, torch and device agree bit for bit


def find_draws(aug, orig, p=4):
    """All (dy, dx, mirror) that turn orig into aug under augment.py's definition."""
    h, w = orig.shape[:2]
    padded = np.pad(orig, ((p, p), (p, p)) + ((0, 0),) * (orig.ndim - 2))
    hits = []
    for dy in range(-p, p + 1):
        for dx in range(-p, p + 1):
            crop = padded[p + dy:p + dy + h, p + dx:p + dx + w]
            for mirror in (False, True):
                if np.array_equal(crop[:, ::-1] if mirror else crop, aug):
                    hits.append((dy, dx, mirror))
    return hits


@pytest.mark.parametrize("backend", BACKENDS)
def test_augmentation_keeps_image_and_saliency_aligned(png_set, backend):
    ref = truth(png_set)
    loader = make_loader(png_set, 8, train=True, backend=backend, device="cpu", with_keys=True, seed=3)
    x, s, _, keys = run_epoch(loader, epoch=2)
    xi, si = as_uint8(x, s)
    # agreement of "red >= 128" with "salient", as in the fixture: 1.0 unaugmented, so 1.0 after
    # augmentation too (padding is black and not salient); a one-pixel shift would break it
    agree = ((xi[..., 0] >= 128) == (si > 127)).mean()
    base = np.mean([((ref[k][0][..., 0] >= 128) == (ref[k][1] > 127)).mean() for k in keys])
    assert base == 1.0 and agree == base
    shifted = ((xi[..., 0] >= 128) == (np.roll(si, 1, axis=2) > 127)).mean()
    assert shifted < 0.99
    # every sample is one draw of the defined crop/flip, and its saliency took the very same draw
    draws = []
    for i, k in enumerate(keys):
        img_draws = find_draws(xi[i], ref[k][0])
        sal_draws = set(find_draws(si[i], ref[k][1]))
        same = [d for d in img_draws if d in sal_draws]
        assert same, f"{k}: image and saliency not transformed alike"
        draws.append(same[0])
    assert any(m for _, _, m in draws) and not all(m for _, _, m in draws)  # flips happen, not always
    assert len({(dy, dx) for dy, dx, _ in draws}) > 5  # crops at many offsets, including padded ones


@pytest.mark.parametrize("backend", BACKENDS)
def test_seeds_shuffle_differently_and_reproduce(png_set, backend):
    def epoch(seed):
        return run_epoch(make_loader(png_set, 8, train=True, backend=backend, device="cpu", with_keys=True,
                                     seed=seed, num_workers=1), epoch=0)

    a, again, other = epoch(0), epoch(0), epoch(1)
    assert a[3] == again[3] and torch.equal(a[0], again[0]) and torch.equal(a[1], again[1])  # order and crops
    assert a[3] != other[3]


def test_flags_override_train_defaults(png_set):
    loader = make_loader(png_set, 16, train=True, augment=False, drop_last=False, backend="torch", device="cpu",
                         num_workers=0, with_keys=True)
    x, s, y, keys = run_epoch(loader)
    assert len(loader) == 5 and len(keys) == 70  # 4 full batches + one of 6
    ref = truth(png_set)
    xi, _ = as_uint8(x, s)
    assert np.array_equal(xi, np.stack([ref[k][0] for k in keys]))  # unaugmented, still shuffled
    assert keys != sorted(keys)


def test_auto_backend_says_which(png_set, capsys):
    loader = make_loader(png_set, 8, train=False, device="cpu")
    assert loader.backend == "dali"  # nvidia.dali is installed here
    assert "backend auto -> dali" in capsys.readouterr().err
    x, s, y = next(iter(loader))
    assert x.shape == (8, 3, 16, 16)


def test_dali_keeps_one_pipeline_and_an_epochs_draws_depend_only_on_the_epoch(png_set):
    """Rebuilding DALI's pipeline per epoch cost ~2 s on a GPU; one pipeline now serves every epoch,
    and its augmentation draws come from (seed, epoch, rank), so a resumed run sees the same epoch."""
    a = make_loader(png_set, 8, train=True, backend="dali", device="cpu", with_keys=True)
    run_epoch(a, 0)
    pipe = a._pipe
    run_epoch(a, 1)
    later = run_epoch(a, 2)
    assert a._pipe is pipe
    fresh = run_epoch(make_loader(png_set, 8, train=True, backend="dali", device="cpu", with_keys=True), 2)
    assert later[3] == fresh[3]
    for got, want in zip(later[:3], fresh[:3]):
        assert torch.equal(got, want)


def test_dali_pass_abandoned_half_way_leaves_the_next_epoch_whole(tiny_shards):
    root = tiny_shards(num_samples=70, per_shard=16)  # eval: 9 batches, the last one of 6
    loader = make_loader(root, 8, train=False, backend="dali", device="cpu", with_keys=True)
    for i, _ in enumerate(loader):
        if i == 2:
            break
    got = run_epoch(loader, 1)
    want = run_epoch(make_loader(root, 8, train=False, backend="torch", device="cpu", num_workers=0, with_keys=True), 1)
    assert len(got[3]) == 70 and got[3] == want[3]
    for a, b in zip(got[:3], want[:3]):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("decode", ["gpu", "cpu"])
@pytest.mark.parametrize("fmt", ["png", "raw"])
def test_gpu_decode_matches_cpu(tiny_shards, fmt, decode):
    root = tiny_shards(num_samples=40, image_format=fmt)
    gpu = run_epoch(make_loader(root, 8, train=False, backend="dali", device="cuda", decode=decode, with_keys=True))
    cpu = run_epoch(make_loader(root, 8, train=False, backend="torch", device="cpu", with_keys=True))
    assert gpu[0].is_cuda and gpu[3] == cpu[3]
    for a, b in zip(gpu[:3], cpu[:3]):
        assert torch.equal(a.cpu(), b)
    # augmented: the draws come from (seed, epoch, rank), so the GPU pipeline equals DALI's CPU pipeline
    aug = run_epoch(make_loader(root, 8, train=True, backend="dali", device="cuda", decode=decode, with_keys=True), 3)
    ref = run_epoch(make_loader(root, 8, train=True, backend="dali", device="cpu", with_keys=True), 3)
    assert aug[3] == ref[3]
    for a, b in zip(aug[:3], ref[:3]):
        assert torch.equal(a.cpu(), b)
    xi, si = as_uint8(aug[0].cpu(), aug[1].cpu())
    assert ((xi[..., 0] >= 128) == (si > 127)).mean() == 1.0


def test_dali_source_keeps_few_tars_open(tiny_shards, monkeypatch):
    from sat_train.loader import dali_backend
    monkeypatch.setattr(dali_backend, "MAX_OPEN_TARS", 2)
    root = tiny_shards(num_samples=80, per_shard=8)  # 10 shards
    loader = make_loader(root, 8, train=True, backend="dali", device="cpu", with_keys=True)
    got = run_epoch(loader, 0)
    assert len(got[3]) == 80 and len(loader._source.files) <= 2
