"""shards/reading.py: one decoder per stored field, tar iteration with filters, one-pass hash + labels."""
import hashlib

import numpy as np
import pytest

from shards.format import LABEL_EXT, SALIENCY_EXT, ShardFormatError, decode_label, split_member_name
from shards.manifest import read_manifest
from shards.reading import (DECODERS, decode_sample, gather_label_components, iter_members, iter_tar_samples,
                            read_dali_index, scan_tar)
from shards.storage import sha256_file


def test_member_names_split_like_webdataset():
    assert split_member_name("k1.sal.png") == ("k1", "sal.png")
    assert split_member_name("dir/sub/k_2.label.i64") == ("k_2", "label.i64")
    assert split_member_name("noext") == ("noext", "")


@pytest.mark.parametrize("fmt,channels", [("png", 3), ("png", 1), ("jpg", 3), ("raw", 3), ("raw", 1)])
def test_decode_sample_gives_the_written_pixels(tiny_shards, fmt, channels):
    """conftest writes saliency = (image channel 0 >= 128) and RGB images: decoding must give exactly that
    (jpg: up to compression), in RGB order, with the manifest's shape."""
    m = read_manifest(tiny_shards(num_samples=8, per_shard=8, image_format=fmt, channels=channels))
    for sample in iter_tar_samples(m.tar_paths()[0]):
        d = decode_sample(sample, m.image)
        assert d.image.shape == (16, 16, channels) and d.image.dtype == np.uint8
        assert d.saliency.shape == (16, 16) and set(np.unique(d.saliency)) <= {0, 255}
        assert d.label == decode_label(sample[LABEL_EXT]) and 0 <= d.label < m.num_classes
        if fmt != "jpg":  # lossless: the map is exactly the threshold of the decoded first channel
            assert np.array_equal(d.saliency, np.where(d.image[..., 0] >= 128, 255, 0))


def test_decoders_name_the_sample_and_the_problem(tiny_shards):
    m = read_manifest(tiny_shards(num_samples=4, per_shard=4))
    sample = next(iter_tar_samples(m.tar_paths()[0]))
    key = sample["__key__"]
    with pytest.raises(ShardFormatError, match=f"sample '{key}': png image does not decode"):
        DECODERS["png"](b"not a png", m.image, key)
    small = dict(m.image, height=8, width=8)  # the stored 16x16 map against a manifest saying 8x8
    with pytest.raises(ShardFormatError, match=f"sample '{key}': sal.png is 16x16 uint8"):
        DECODERS[SALIENCY_EXT](sample[SALIENCY_EXT], small, key)
    with pytest.raises(ShardFormatError, match=f"sample '{key}' has no .png image"):
        decode_sample({"__key__": key}, m.image)


def test_filtered_iteration_reads_only_what_is_asked(tiny_shards):
    m = read_manifest(tiny_shards(num_samples=10, per_shard=10))
    tar = m.tar_paths()[0]
    every = list(iter_tar_samples(tar))
    keys = {every[3]["__key__"], every[7]["__key__"]}
    picked = list(iter_tar_samples(tar, exts=(LABEL_EXT,), keys=keys))
    assert [s["__key__"] for s in picked] == [every[3]["__key__"], every[7]["__key__"]]
    assert all(set(s) == {"__key__", LABEL_EXT} and s[LABEL_EXT] == every[i][LABEL_EXT]
               for s, i in zip(picked, (3, 7)))
    members = list(iter_members(tar, select=lambda key, ext: False))
    assert len(members) == 10 * 5 and all(m.data is None for m in members)


def test_scan_tar_equals_sha256_and_the_mmap_gather(tiny_shards):
    m = read_manifest(tiny_shards(num_samples=30, per_shard=30))
    tar, idx = m.tar_paths()[0], m.index_paths()[0]
    offsets = [off for sample in read_dali_index(idx) for ext, off, _, _ in sample if ext == LABEL_EXT]
    reversed_offsets = offsets[::-1]  # any order; read in chunks so small that labels span two reads
    digest, labels = scan_tar(tar, reversed_offsets, chunk=13)
    assert digest == sha256_file(tar) == hashlib.sha256(tar.read_bytes()).hexdigest()
    assert labels.tolist() == gather_label_components(tar, reversed_offsets).tolist()
    assert labels.tolist()[::-1] == gather_label_components(tar, offsets).tolist()


def test_unsafe_members_are_named_not_yielded(tmp_path):
    import io
    import tarfile

    tar = tmp_path / "evil.tar"
    with tarfile.open(tar, "w") as tf:
        info = tarfile.TarInfo("k.png")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"abc"))
        link = tarfile.TarInfo("k.sal.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/hostname"
        tf.addfile(link)
        up = tarfile.TarInfo("../k.json")
        up.size = 2
        tf.addfile(up, io.BytesIO(b"{}"))
    problems: list[str] = []
    got = [(m.key, m.ext, m.data) for m in iter_members(tar, problems=problems)]
    assert got == [("k", "png", b"abc")]
    assert len(problems) == 2 and "is a link" in problems[0] and "leaves the extraction folder" in problems[1]
