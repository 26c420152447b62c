"""Damaged or incomplete shard sets are refused with a message naming the file, before DALI sees them."""
import hashlib
import json
import subprocess
import sys
import textwrap

import pytest

from sat_train.loader import LoaderError, make_loader
from shards.manifest import read_manifest
from shards.reading import read_dali_index

BACKENDS = ["dali", "torch"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_truncated_shard_is_named(tiny_shards, backend):
    root = tiny_shards(num_samples=48, per_shard=16)
    tar = read_manifest(root).tar_paths()[1]
    tar.write_bytes(tar.read_bytes()[:5000])
    with pytest.raises(LoaderError, match=rf"{tar}: 5000 bytes, manifest says \d+ \(truncated"):
        make_loader(root, 8, train=True, backend=backend, device="cpu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_shard_and_index_are_named(tiny_shards, backend):
    root = tiny_shards(num_samples=48, per_shard=16)
    m = read_manifest(root)
    m.tar_paths()[2].unlink()
    with pytest.raises(LoaderError, match=rf"{m.tar_paths()[2]}: missing"):
        make_loader(root, 8, train=False, backend=backend, device="cpu")
    root2 = tiny_shards(num_samples=32, per_shard=16)
    idx = read_manifest(root2).index_paths()[0]
    idx.unlink()
    with pytest.raises(LoaderError, match=rf"{idx}: missing"):
        make_loader(root2, 8, train=False, backend=backend, device="cpu")


def test_sha256_verification_catches_same_size_corruption(tiny_shards):
    root = tiny_shards(num_samples=32, per_shard=16)
    tar = read_manifest(root).tar_paths()[0]
    data = bytearray(tar.read_bytes())
    data[2000] ^= 0xFF  # same size: only a checksum sees it
    tar.write_bytes(bytes(data))
    make_loader(root, 8, train=False, backend="torch", device="cpu", verify="size")  # cheap check passes
    with pytest.raises(LoaderError, match=rf"{tar}: sha256 differs"):
        make_loader(root, 8, train=False, backend="torch", device="cpu", verify="sha256")


def test_bad_arguments_and_folders_give_clear_errors(tiny_shards, tmp_path):
    root = tiny_shards(num_samples=16, per_shard=16)
    with pytest.raises(LoaderError, match="no manifest"):
        make_loader(tmp_path, 8, train=True)
    with pytest.raises(LoaderError, match="verify must be one of"):
        make_loader(root, 8, train=True, verify="md5")
    with pytest.raises(LoaderError, match="backend must be one of"):
        make_loader(root, 8, train=True, backend="ffcv")
    with pytest.raises(LoaderError, match="16 samples are too few .* batch size 32 and drop_last"):
        make_loader(root, 32, train=True, backend="torch")


def test_index_missing_a_component_is_refused(tiny_shards):
    root = tiny_shards(num_samples=16, per_shard=16)
    m = read_manifest(root)
    idx = m.index_paths()[0]
    lines = idx.read_text().splitlines()
    fields = lines[3].split()
    kept = [fields[i:i + 4] for i in range(0, len(fields), 4) if fields[i] != "sal.png"]
    new_line = " ".join(" ".join(f) for f in kept)
    text = "\n".join(lines[:3] + [new_line] + lines[4:]) + "\n"
    idx.write_text(text)  # and keep the manifest consistent, so only the component check can catch it
    raw = json.loads((root / "manifest.json").read_text())
    raw["shards"][0]["index_bytes"] = len(text.encode())
    raw["shards"][0]["index_sha256"] = hashlib.sha256(text.encode()).hexdigest()
    (root / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(LoaderError, match=r"train-000000.tar: sample 's000002' lacks sal.png"):
        make_loader(root, 8, train=True, backend="dali", device="cpu")


def test_dali_on_truncated_shard_exits_cleanly_not_a_segfault(tiny_shards):
    """The crash DALI would have (segfault on a truncated, indexed tar) must not happen: run it for real."""
    root = tiny_shards(num_samples=64, per_shard=32)
    tar = read_manifest(root).tar_paths()[0]
    tar.write_bytes(tar.read_bytes()[:20000])
    script = textwrap.dedent(f"""
        import sys
        from sat_train.loader import LoaderError, make_loader
        try:
            loader = make_loader({str(root)!r}, 32, train=True, backend="dali", device="cpu")
            for batch in loader:
                pass
        except LoaderError as e:
            print(f"error: {{e}}", file=sys.stderr)
            sys.exit(2)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(tar) in lines[0] and "truncated" in lines[0]


@pytest.mark.parametrize("backend,message", [
    ("torch", r"train-000000.tar: sample 's000003' lacks png"),
    # DALI's own message names no sample ('#4' is an nvImageCodec status): the loader finds it
    ("dali", r"train-000000.tar: sample 's000003': png does not decode \(DALI: Error in CPU operator "
             r"`nvidia.dali.fn.decoders.image`"),
])
def test_same_size_damage_found_while_reading(tiny_shards, backend, message):
    """Damage that keeps the size passes the cheap check (opt-in verify="size"); reading must still end in
    a clear error naming the tar and the sample."""
    root = tiny_shards(num_samples=32, per_shard=16)
    m = read_manifest(root)
    tar = m.tar_paths()[0]
    _, offset, size, _ = next(e for e in read_dali_index(m.index_paths()[0])[3] if e[0] == "png")
    data = bytearray(tar.read_bytes())
    data[offset:offset + size] = bytes(size)  # image bytes zeroed ...
    data[offset - 512:offset - 412] = bytes(100)  # ... and its tar header's name wiped
    tar.write_bytes(bytes(data))
    loader = make_loader(root, 8, train=False, backend=backend, device="cpu", verify="size")
    with pytest.raises(LoaderError, match=message):
        for _ in loader:
            pass


def test_dali_shard_truncated_after_opening_is_named(tiny_shards):
    """The size check ran at make_loader; a tar cut short later is caught by the read itself."""
    root = tiny_shards(num_samples=32, per_shard=16)
    loader = make_loader(root, 8, train=False, backend="dali", device="cpu")
    tar = read_manifest(root).tar_paths()[1]
    tar.write_bytes(tar.read_bytes()[:3000])
    with pytest.raises(LoaderError, match=rf"{tar}: ends before sample 's0000\d\d' \(truncated"):
        for _ in loader:
            pass


@pytest.mark.parametrize("backend", BACKENDS)
def test_unknown_decode_placement_is_refused(tiny_shards, backend):
    root = tiny_shards(num_samples=16, per_shard=16)
    with pytest.raises(LoaderError, match="decode must be one of"):
        make_loader(root, 8, train=True, backend=backend, device="cpu", decode="nvjpeg")
