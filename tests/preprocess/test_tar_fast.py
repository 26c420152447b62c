"""FastShardWriter writes byte-identical tars and indexes to ShardWriter (webdataset TarWriter)."""
from __future__ import annotations

import numpy as np

from preprocess.tar_fast import FastShardWriter
from shards.format import MAX_KEY_LEN
from shards.reading import iter_tar_samples, read_dali_index
from shards.writer import ShardWriter


def _samples():
    rng = np.random.default_rng(0)
    sizes = [0, 1, 8, 511, 512, 513, 1024, 5000, 70000]
    out = []
    for i, n in enumerate(sizes):
        key = ("k" * (MAX_KEY_LEN - 6) if i % 3 == 0 else "s") + f"{i:05d}"
        sample = {"__key__": key, "jpg": rng.integers(0, 256, n, dtype=np.uint8).tobytes(),
                  "sal.png": bytes(n % 97), "label.i64": int(i).to_bytes(8, "little"), "cls": str(i).encode(),
                  "json": b'{"source_id": %d}' % i}
        if i == 4:  # an extra component with a longer extension
            sample["x" * 12] = b"extra"
        out.append(sample)
    return out


def test_identical_to_shardwriter(tmp_path):
    infos = []
    for cls, name in ((ShardWriter, "a"), (FastShardWriter, "b")):
        (tmp_path / name).mkdir()
        with cls(tmp_path / name / "train-000000.tar") as w:
            for s in _samples():
                w.write(s)
        infos.append(w.info)
    a, b = tmp_path / "a", tmp_path / "b"
    assert (b / "train-000000.tar").read_bytes() == (a / "train-000000.tar").read_bytes()
    assert (b / "train-000000.idx").read_bytes() == (a / "train-000000.idx").read_bytes()
    assert infos[0] == infos[1]
    back = list(iter_tar_samples(b / "train-000000.tar"))
    assert [s["jpg"] for s in back] == [s["jpg"] for s in _samples()]
    assert len(read_dali_index(b / "train-000000.idx")) == len(back)
