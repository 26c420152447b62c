"""`preprocess verify` catches each kind of damage and names the file; `preprocess info` summarises."""
from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from coco_fixture import make_coco  # noqa: E402

from preprocess.build import build  # noqa: E402
from preprocess.config import BuildConfig  # noqa: E402
from preprocess.info import main as info_main  # noqa: E402
from preprocess.verify import main as verify_main  # noqa: E402
from shards.format import split_member_name  # noqa: E402
from shards.storage import sha256_file  # noqa: E402
from shards.writer import ShardWriter  # noqa: E402


@pytest.fixture
def shard_set(tmp_path):
    root = tmp_path / "coco"
    make_coco(root, num_images=4, objects=2)
    out = tmp_path / "out"
    build(BuildConfig(annotations=str(root / "ann.json"), images=str(root / "images"), size=32, shard_size=3,
                      out=str(out), progress=False), log=lambda *_: None)
    return out


def verify(out, capsys) -> tuple[int, str]:
    rc = verify_main([str(out), "--no-progress"])
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err
    return rc, cap.out + cap.err


def reseal(out: Path, name: str) -> None:
    """Make the manifest agree with a replaced tar + index (size, sha), so only the deep checks can tell."""
    m = json.loads((out / "manifest.json").read_text())
    for s in m["shards"]:
        if s["tar"] == name:
            s["bytes"], s["sha256"] = (out / name).stat().st_size, sha256_file(out / name)
            idx = out / s["index"]
            s["index_bytes"], s["index_sha256"] = idx.stat().st_size, sha256_file(idx)
    (out / "manifest.json").write_text(json.dumps(m))


def test_clean_set_verifies_and_info_prints(shard_set, capsys):
    rc, text = verify(shard_set, capsys)
    assert rc == 0 and "OK (8 samples in 4 shards verified)" in text
    assert info_main([str(shard_set)]) == 0
    text = capsys.readouterr().out
    assert "samples     8 in 4 shards" in text and "0:car" in text and "crowd annotation" in text
    assert "jpg 32x32x3" in text


def test_flipped_byte_and_truncation_and_missing(shard_set, capsys):
    tars = sorted(shard_set.glob("*.tar"))
    data = bytearray(tars[0].read_bytes())
    data[700] ^= 0xFF
    tars[0].write_bytes(bytes(data))
    tars[1].write_bytes(tars[1].read_bytes()[:2048])
    sorted(shard_set.glob("*.idx"))[2].unlink()
    rc, text = verify(shard_set, capsys)
    assert rc == 1
    assert f"{tars[0]}: sha256 differs" in text
    assert f"{tars[1]}: 2048 bytes" in text and "truncated" in text
    assert "train-000002.idx: missing" in text


def test_deep_checks_index_count_and_decoding(shard_set, capsys):
    tars = sorted(shard_set.glob("*.tar"))
    # a tar rewritten with one undecodable image and one sample fewer, resealed in the manifest
    samples = []
    with tarfile.open(tars[0]) as tf:
        members = [m for m in tf if m.isfile()]
        for m in members:
            key, ext = split_member_name(m.name)
            if not samples or samples[-1]["__key__"] != key:
                samples.append({"__key__": key})
            samples[-1][ext] = tf.extractfile(m).read()
    samples[0]["jpg"] = b"not an image"
    with ShardWriter(tars[0]) as w:
        for s in samples[:-1]:
            w.write(s)
    reseal(shard_set, tars[0].name)
    idx = tars[0].with_suffix(".idx")
    rc, text = verify(shard_set, capsys)
    assert rc == 1
    assert "1 samples, manifest says 2" in text
    assert "image does not decode" in text and samples[0]["__key__"] in text
    # index tampered: sizes agree with the manifest but the offsets do not match the tar
    lines = idx.read_text().splitlines()
    f = lines[1].split()
    f[1] = str(int(f[1]) + 512)
    lines[1] = " ".join(f)
    idx.write_text("\n".join(lines) + "\n")
    reseal(shard_set, tars[0].name)
    rc, text = verify(shard_set, capsys)
    assert rc == 1 and f"{idx}: does not match" in text


def test_not_a_shard_set(tmp_path, capsys):
    rc, text = verify(tmp_path, capsys)
    assert rc == 1 and "no manifest" in text
    assert info_main([str(tmp_path / "nowhere")]) == 1
    assert "not a folder" in capsys.readouterr().err
