"""shards/storage.py: the one atomic-write implementation (bytes, JSON, a writer callback such as torch.save)."""
import json
import os

import pytest
import torch

from shards.storage import AtomicFile, atomic_write, atomic_write_bytes, atomic_write_json, is_url, tmp_name


def test_a_failing_writer_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "last.pt"
    atomic_write_bytes(path, b"old")

    def half_then_fail(f):
        f.write(b"half a checkpoint")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, half_then_fail)
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_torch_save_and_json_go_through_it(tmp_path):
    state = {"w": torch.arange(6.0).reshape(2, 3), "epoch": 3}
    atomic_write(tmp_path / "c.pt", lambda f: torch.save(state, f))
    back = torch.load(tmp_path / "c.pt", weights_only=True)
    assert back["epoch"] == 3 and torch.equal(back["w"], state["w"])
    atomic_write_json(tmp_path / "m.json", {"b": 1, "a": [1, 2]})
    assert (tmp_path / "m.json").read_text() == json.dumps({"a": [1, 2], "b": 1}, indent=2) + "\n"


def test_the_final_name_appears_only_on_commit(tmp_path):
    path = tmp_path / "x.tar"
    f = AtomicFile(path)
    f.file.write(b"abc")
    assert not path.exists() and f.tmp == tmp_name(path) and f.tmp.name == f".x.tar.tmp-{os.getpid()}"
    f.commit()
    assert path.read_bytes() == b"abc" and not f.tmp.exists()


def test_urls_and_paths():
    assert is_url("s3://bucket/prefix") and is_url("https://host/a") and is_url("gs://b/p")
    assert not is_url("shards/fmnist/train") and not is_url("/abs/path") and not is_url("file:///tmp/x")
    assert not is_url(tmp_name("a/b"))
