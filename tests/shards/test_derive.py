"""shards/derive.py: derived shard sets are complete, faithful copies with new maps, resumable and atomic."""
import json

import numpy as np
import pytest

from shards.derive import Batch, Derivation, DeriveError, derive, encode_saliency, saliency_png_to_float
from shards.format import MANIFEST_NAME, SALIENCY_EXT
from shards.manifest import check_shard_files, read_manifest
from shards.reading import iter_tar_samples


def inverted(batch: Batch) -> list[dict]:
    """A deterministic derivation: each map negated (foreground <-> background)."""
    maps = np.stack([-saliency_png_to_float(s[SALIENCY_EXT]) for s in batch.samples])
    return [{SALIENCY_EXT: p} for p in encode_saliency(maps)]


DERIVATION = Derivation("invert", {"how": "negate"}, {"kind": "inverted"}, execution={"batch_size": 5})


def _samples(root):
    return [s for tar in read_manifest(root).tar_paths() for s in iter_tar_samples(tar)]


def _files(root):
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file()}


def test_derived_set_copies_everything_but_the_maps(tiny_shards, tmp_path):
    from preprocess.verify import verify

    src = tiny_shards(num_samples=40, per_shard=16)
    out = tmp_path / "out"
    manifest = derive(src, out, DERIVATION, inverted, batch_size=5, progress=False, log=lambda m: None)
    assert verify(out, progress=False) == []
    before, after = _samples(src), _samples(out)
    assert [s["__key__"] for s in before] == [s["__key__"] for s in after]  # same samples, same order
    for a, b in zip(before, after):
        assert {k: v for k, v in a.items() if k != SALIENCY_EXT} == {k: v for k, v in b.items() if k != SALIENCY_EXT}
        np.testing.assert_allclose(saliency_png_to_float(b[SALIENCY_EXT]), -saliency_png_to_float(a[SALIENCY_EXT]),
                                   atol=1 / 255 + 1e-6)
    m_in, m_out = read_manifest(src), read_manifest(out)
    assert [s["tar"] for s in m_in.shards] == [s["tar"] for s in m_out.shards]
    for field in ("classes", "image", "config", "split"):
        assert m_out.raw[field] == m_in.raw[field]
    c = m_out.raw["counts"]
    assert c["read"] == c["written"] + sum(c["skipped"].values()) == m_out.num_samples == 40
    assert m_out.fingerprint["input_digest"] == m_in.fingerprint["digest"]
    assert m_out.fingerprint != m_in.fingerprint  # fit --resume must tell the two sets apart
    d = m_out.raw["derived_from"]
    assert d["path"] == str(src.resolve()) and d["fingerprint"] == m_in.fingerprint
    assert d["derivation"] == {"name": "invert", "params": {"how": "negate"}} and d["digest"] == m_out.fingerprint["digest"]
    assert m_out.raw["saliency"]["kind"] == "inverted" and manifest == m_out.raw
    from preprocess.info import describe

    assert f"derived     invert of {src.resolve()} (how=negate)" in describe(out)
    # another derivation (or other params) of the same input gets another fingerprint
    other = derive(src, tmp_path / "o2", Derivation("invert", {"how": "other"}, {}), inverted, progress=False,
                   log=lambda m: None)
    assert other["fingerprint"]["digest"] != m_out.fingerprint["digest"]


def test_interrupted_run_resumes_to_identical_bytes_and_keeps_finished_shards(tiny_shards, tmp_path):
    src = tiny_shards(num_samples=48, per_shard=16)
    whole = tmp_path / "whole"
    derive(src, whole, DERIVATION, inverted, batch_size=5, progress=False, log=lambda m: None)

    calls = []

    def dies_in_shard_2(batch):
        calls.append((batch.shard, len(batch.samples)))
        if batch.shard == 2:
            raise KeyboardInterrupt
        return inverted(batch)

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        derive(src, out, DERIVATION, dies_in_shard_2, batch_size=5, progress=False, log=lambda m: None)
    assert not (out / MANIFEST_NAME).exists()  # nothing half-written looks complete
    assert not (out / "train-000002.tar").exists() and (out / "train-000001.tar").exists()
    calls.clear()
    derive(src, out, DERIVATION, _recording(inverted, calls), batch_size=5,
           progress=False, log=lambda m: None)
    assert {s for s, _ in calls} == {2}  # finished shards were kept, not redone
    assert _files(out) == _files(whole)

    # finished shards are checked, not trusted: a changed byte (same size) is found and the shard redone
    tar = out / "train-000000.tar"
    data = bytearray(tar.read_bytes())
    data[700] ^= 1
    tar.write_bytes(bytes(data))
    calls.clear()
    derive(src, out, DERIVATION, _recording(inverted, calls), batch_size=5, progress=False, log=lambda m: None)
    assert {s for s, _ in calls} == {0}
    assert _files(out) == _files(whole)


def _recording(fn, calls):
    def wrapped(batch):
        calls.append((batch.shard, len(batch.samples)))
        return fn(batch)
    return wrapped


def test_damaged_input_is_refused_naming_the_file(tiny_shards, tmp_path):
    src = tiny_shards(num_samples=32, per_shard=16)
    tar = src / "train-000001.tar"
    data = bytearray(tar.read_bytes())
    data[1000] ^= 0xFF  # same size: only the sha256 check can see it
    tar.write_bytes(bytes(data))
    with pytest.raises(DeriveError, match=r"train-000001\.tar: sha256 differs"):
        derive(src, tmp_path / "out", DERIVATION, inverted, progress=False, log=lambda m: None)
    tar.write_bytes(bytes(data[:3000]))
    with pytest.raises(DeriveError, match=r"train-000001\.tar: 3000 bytes"):
        derive(src, tmp_path / "out", DERIVATION, inverted, progress=False, log=lambda m: None)
    assert not (tmp_path / "out" / MANIFEST_NAME).exists()
    with pytest.raises(DeriveError, match="nothing: not a folder"):
        derive(tmp_path / "nothing", tmp_path / "out", DERIVATION, inverted, progress=False, log=lambda m: None)


def test_output_folder_rules(tiny_shards, tmp_path):
    src = tiny_shards(num_samples=16, per_shard=8)
    quiet = dict(progress=False, log=lambda m: None)
    with pytest.raises(DeriveError, match="must differ from the input"):
        derive(src, src, DERIVATION, inverted, **quiet)
    out = tmp_path / "out"
    derive(src, out, DERIVATION, inverted, **quiet)
    other = Derivation("invert", {"how": "twice"}, {})
    with pytest.raises(DeriveError, match="holds a different derivation.*--overwrite"):
        derive(src, out, other, inverted, **quiet)
    derive(src, out, other, inverted, overwrite=True, **quiet)
    assert read_manifest(out).raw["derived_from"]["derivation"]["params"] == {"how": "twice"}
    built = tiny_shards(num_samples=16, per_shard=8)  # a plain (non-derived) shard set as OUT
    with pytest.raises(DeriveError, match="not this derivation"):
        derive(src, built, DERIVATION, inverted, **quiet)


def test_a_derivation_may_only_replace_maps_and_json(tiny_shards, tmp_path):
    src = tiny_shards(num_samples=8, per_shard=8)
    steals_labels = lambda b: [{SALIENCY_EXT: s[SALIENCY_EXT], "label.i64": s["label.i64"]}  # noqa: E731
                               for s in b.samples]
    with pytest.raises(DeriveError, match="must return sal.png"):
        derive(src, tmp_path / "out", DERIVATION, steals_labels, progress=False, log=lambda m: None)
    assert check_shard_files(read_manifest(src)) == []
    assert not list((tmp_path / "out").glob("*.tar"))  # the aborted shard left no final name behind
    meta = json.dumps({"x": 1}).encode()
    adds_meta = lambda b: [{SALIENCY_EXT: s[SALIENCY_EXT], "json": meta} for s in b.samples]  # noqa: E731
    derive(src, tmp_path / "meta", DERIVATION, adds_meta, progress=False, log=lambda m: None)
    assert all(json.loads(s["json"]) == {"x": 1} for s in _samples(tmp_path / "meta"))
