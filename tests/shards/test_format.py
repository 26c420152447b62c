import numpy as np
import pytest

from shards.format import (ShardFormatError, decode_label, encode_label, saliency_to_uint8, sanitize_key,
                           uint8_to_saliency)
from shards.manifest import check_shard_files, read_manifest
from shards.reading import iter_tar_samples, read_dali_index


def test_tiny_shard_set_roundtrip(tiny_shards):
    root = tiny_shards(num_samples=40, per_shard=16)
    m = read_manifest(root)
    assert [s["samples"] for s in m.shards] == [16, 16, 8]
    assert check_shard_files(m, full=True) == []
    for tar, idx in zip(m.tar_paths(), m.index_paths()):
        samples = list(iter_tar_samples(tar))
        index = read_dali_index(idx)
        assert len(samples) == len(index)
        raw = tar.read_bytes()
        for sample, entry in zip(samples, index):
            for ext, offset, size, name in entry:  # the index points exactly at each member's bytes
                assert name == f"{sample['__key__']}.{ext}"
                assert raw[offset:offset + size] == sample[ext]


def test_truncated_and_missing_shards_are_named(tiny_shards):
    root = tiny_shards(num_samples=32, per_shard=16)
    m = read_manifest(root)
    tar0, tar1 = m.tar_paths()
    tar0.write_bytes(tar0.read_bytes()[:1000])
    tar1.unlink()
    problems = check_shard_files(m)
    assert any(str(tar0) in p and "truncated" in p for p in problems)
    assert any(str(tar1) in p and "missing" in p for p in problems)


def test_manifest_errors_name_the_file(tmp_path):
    with pytest.raises(ShardFormatError, match="no manifest"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ShardFormatError, match="manifest.json: not valid JSON"):
        read_manifest(tmp_path)


def test_keys_labels_and_saliency_levels():
    assert sanitize_key("a.b/c d") == "a_b_c_d"
    long = sanitize_key("x" * 300)
    assert len(long) <= 80 and long != sanitize_key("x" * 299)
    assert decode_label(encode_label(-3)) == -3 and decode_label(encode_label(999)) == 999
    s = np.array([-1.0, 0.0, 1.0, 0.5], dtype=np.float32)
    g = saliency_to_uint8(s)
    assert g.tolist() == [0, 128, 255, 191]
    assert np.abs(uint8_to_saliency(g) - s).max() <= 1 / 127.5
