import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import dataset_fixtures as fx  # noqa: E402

from preprocess.config import BuildConfig  # noqa: E402
from preprocess.sources.base import SourceError  # noqa: E402
from preprocess.sources.cifar import (Cifar10Source, Cifar100Source, CifarFormatError, load_pickle,  # noqa: E402
                                      read_batch)


def _random(n, seed=0, classes=10):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, classes, n)


@pytest.fixture(scope="module")
def foolbox():
    data = fx.foolbox_data_dir()
    if isinstance(data, str):
        pytest.skip(data)
    return data


def _cfg(source, root, split="train", **opts):
    return BuildConfig(source=source, root=str(root), split=split, unit="image", source_options=opts)


def test_cifar10_real_images_round_trip(tmp_path, foolbox):
    imgs, labels = fx.foolbox_samples(foolbox, "cifar10")
    assert imgs.shape == (20, 32, 32, 3)
    fx.write_cifar10(tmp_path, (imgs[:15], labels[:15]), (imgs[15:], labels[15:]))
    src = Cifar10Source(_cfg("cifar10", tmp_path))  # root above cifar-10-batches-py is found
    assert src.classes()[0] == "airplane" and len(src.classes()) == 10
    items, skips = src.items()
    assert len(items) == 15 and skips == []
    got = {it.id: next(src.load(it)) for it in items}
    # the train split spans data_batch_1..5 in order: item n is image n
    for n, it in enumerate(items):
        s = got[it.id]
        np.testing.assert_array_equal(s.image, imgs[n])  # planar rows -> HWC RGB, exact
        assert s.label == labels[n] and s.image.flags.c_contiguous
    test = Cifar10Source(_cfg("cifar10", tmp_path / "cifar-10-batches-py", split="test"))
    items, _ = test.items()
    assert [next(test.load(it)).label for it in items] == labels[15:].tolist()
    np.testing.assert_array_equal(next(test.load(items[-1])).image, imgs[-1])


def test_cifar100_fine_and_coarse(tmp_path, foolbox):
    imgs, labels = fx.foolbox_samples(foolbox, "cifar100")
    fx.write_cifar100(tmp_path, (imgs, labels), (imgs[:4], labels[:4]))
    fine = Cifar100Source(_cfg("cifar100", tmp_path))
    assert len(fine.classes()) == 100
    items, _ = fine.items()
    assert [it.data[2] for it in items] == labels.tolist()
    np.testing.assert_array_equal(next(fine.load(items[7])).image, imgs[7])
    coarse = Cifar100Source(_cfg("cifar100", tmp_path, split="test", label_type="coarse"))
    assert len(coarse.classes()) == 20
    assert [it.data[2] for it in coarse.items()[0]] == (labels[:4] // 5).tolist()
    with pytest.raises(SourceError, match="fine' or 'coarse"):
        Cifar100Source(_cfg("cifar100", tmp_path, label_type="medium"))
    with pytest.raises(SourceError, match="cifar100 only"):
        Cifar10Source(_cfg("cifar10", tmp_path, label_type="coarse"))


def test_labels_out_of_range_and_limit(tmp_path):
    imgs, labels = _random(30, seed=2)
    labels[4], labels[20] = 10, -1
    fx.write_cifar10(tmp_path, (imgs, labels), (imgs[:3], labels[:3]))
    src = Cifar10Source(_cfg("cifar10", tmp_path))
    items, skips = src.items()
    assert len(items) == 28
    assert sorted(s.id for s in skips) == ["train_00004", "train_00020"]
    assert all(s.reason == "label out of range" and "data_batch_" in s.detail for s in skips)
    limited = Cifar10Source(_cfg("cifar10", tmp_path, limit=5))
    items, skips = limited.items()
    assert [it.id for it in items] == ["train_00000", "train_00001", "train_00002", "train_00003"]
    assert len(skips) == 1
    # --val-size: the last N train records (across batches) become val, disjoint from train
    val = Cifar10Source(_cfg("cifar10", tmp_path, split="val", val_size=7))
    train = Cifar10Source(_cfg("cifar10", tmp_path, val_size=7))
    val_rows = [it.data[:2] for it in val.items()[0]]
    train_rows = [it.data[:2] for it in train.items()[0]]
    assert len(val_rows) == 7 and len(train_rows) == 21  # records 4 and 20 (bad labels) are in train
    assert not set(val_rows) & set(train_rows) and val_rows[-1] == (4, 5)  # data_batch_5, last row
    # pickled to workers without the batches
    next(limited.load(items[0]))
    assert len(pickle.dumps(limited)) < 4096


def test_wrong_layout_and_bad_files(tmp_path):
    with pytest.raises(SourceError, match="no batches.meta"):
        Cifar10Source(_cfg("cifar10", tmp_path))
    imgs, labels = _random(10)
    fx.write_cifar10(tmp_path, (imgs, labels), (imgs, labels))
    root = tmp_path / "cifar-10-batches-py"
    (root / "data_batch_3").unlink()
    with pytest.raises(SourceError, match="missing batch file.*data_batch_3"):
        Cifar10Source(_cfg("cifar10", tmp_path))
    with pytest.raises(SourceError, match="no val batches; hold out train records with --val-size"):
        Cifar10Source(_cfg("cifar10", tmp_path, split="val"))
    # truncated pickle
    tb = root / "test_batch"
    tb.write_bytes(tb.read_bytes()[:500])
    with pytest.raises(CifarFormatError, match="test_batch: not a readable CIFAR pickle"):
        read_batch(tb)
    # wrong shape of data
    with open(tb, "wb") as f:
        pickle.dump({b"data": np.zeros((4, 100), np.uint8), b"labels": [0, 1, 2, 3]}, f, protocol=2)
    with pytest.raises(CifarFormatError, match="expected N x 3072"):
        read_batch(tb)
    # a pickle that would run code is refused, not executed
    evil = tmp_path / "evil"
    evil.write_bytes(pickle.dumps({b"data": __import__("os").system}, protocol=2))
    with pytest.raises(CifarFormatError, match="refusing to load"):
        load_pickle(evil)
    # Python 3 pickles (str keys) are accepted like the bytes-keyed originals
    with open(tb, "wb") as f:
        pickle.dump({"data": np.zeros((2, 3072), np.uint8), "labels": [1, 2]}, f)
    assert read_batch(tb)[1].tolist() == [1, 2]


def test_build_cifar10_real_images_raw(tmp_path, foolbox):
    imgs, labels = fx.foolbox_samples(foolbox, "cifar10")
    fx.write_cifar10(tmp_path / "c10", (imgs, labels), (imgs[:2], labels[:2]))
    manifest, samples = fx.build_and_read(tmp_path / "out", "cifar10", "--root", str(tmp_path / "c10"),
                                          "--unit", "image", "--size", "32", "--image-format", "raw",
                                          "--saliency", "none", "--shard-size", "8")
    assert manifest["image"] == {"format": "raw", "height": 32, "width": 32, "channels": 3}
    assert manifest["classes"][3] == "cat" and len(samples) == 20
    for s in samples:  # exact pixels survive pickle -> shard
        n = int(s["key"].split("_")[1])
        np.testing.assert_array_equal(s["image"], imgs[n])
        assert s["label"] == labels[n] and (s["sal"] == 128).all()


def test_build_cifar100_skips_recorded_in_manifest(tmp_path, foolbox):
    imgs, labels = fx.foolbox_samples(foolbox, "cifar100")
    labels = labels.copy()
    labels[2] = 100  # out of range for 100 classes
    fx.write_cifar100(tmp_path / "c100", (imgs, labels), (imgs, labels))
    manifest, samples = fx.build_and_read(tmp_path / "out", "cifar100", "--root", str(tmp_path / "c100"),
                                          "--split", "test", "--unit", "image", "--size", "32",
                                          "--image-format", "png", "--saliency", "foreground")
    assert len(samples) == 19 and manifest["counts"]["skipped"] == {"label out of range": 1}
    assert samples[0]["image"].shape == (32, 32, 3)


def test_wrong_types_in_a_batch(tmp_path, capsys):
    """Labels that are not integers stop with one line naming the batch (np.asarray raised
    ValueError before); file names of the wrong type are only metadata: records are named by position."""
    from preprocess.cli import main

    imgs, labels = _random(10)
    fx.write_cifar10(tmp_path, (imgs, labels), (imgs[:5], labels[:5]))
    d = tmp_path / "cifar-10-batches-py"
    with open(d / "test_batch", "wb") as f:
        pickle.dump({b"data": fx._cifar_rows(imgs[:5]), b"labels": [1, 2, "3", 4, 5], b"filenames": 7}, f, protocol=2)
    rc = main(["build-shards", "cifar10", "--root", str(tmp_path), "--split", "test", "--out", str(tmp_path / "o"),
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and "test_batch: 'labels' is not a list of integer labels" in err
    with open(d / "test_batch", "wb") as f:
        pickle.dump({b"data": fx._cifar_rows(imgs[:5]), b"labels": [1, 2, 3, 4, 5], b"filenames": 7}, f, protocol=2)
    images, got, names = read_batch(d / "test_batch")
    assert got.tolist() == [1, 2, 3, 4, 5] and names == [f"test_batch_{i}" for i in range(5)]
