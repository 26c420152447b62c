"""`preprocess shuffle-saliency`: the shuffled control's maps are a permutation of the source maps."""
import json
from collections import Counter

import numpy as np
import pytest

from preprocess.cli import main as preprocess_main
from preprocess.shuffle_saliency import derangement
from shards.format import MANIFEST_NAME, SALIENCY_EXT
from shards.manifest import read_manifest
from shards.reading import iter_tar_samples


def _by_key(root):
    m = read_manifest(root)
    return {s["__key__"]: (n, s) for n, tar in enumerate(m.tar_paths()) for s in iter_tar_samples(tar)}


def _shuffle(src, out, seed, *extra):
    return preprocess_main(["shuffle-saliency", str(src), "--out", str(out), "--seed", str(seed), "--no-progress",
                            *map(str, extra)])


def test_shuffled_maps_are_a_derangement_of_the_source_maps(tiny_shards, tmp_path):
    from preprocess.verify import verify

    src = tiny_shards(num_samples=40, per_shard=16)
    out = tmp_path / "shuffled"
    assert _shuffle(src, out, 7, "--batch-size", "6") == 0
    assert verify(out, progress=False) == []
    before, after = _by_key(src), _by_key(out)
    assert list(before) == list(after)  # same keys in the same order
    # the same multiset of maps, byte for byte
    assert Counter(s[SALIENCY_EXT] for _, s in before.values()) == Counter(s[SALIENCY_EXT] for _, s in after.values())
    sources = {}
    for key, (shard, s) in after.items():
        meta = json.loads(s["json"])
        src_key = meta.pop("saliency_from")
        assert src_key != key  # each image carries another image's map
        assert s[SALIENCY_EXT] == before[src_key][1][SALIENCY_EXT]
        assert meta == json.loads(before[key][1]["json"])  # the rest of the metadata is kept
        for ext in ("png", "label.i64", "cls"):  # image and label bytes untouched
            assert s[ext] == before[key][1][ext]
        sources[key] = src_key
    assert sorted(sources.values()) == sorted(sources)  # a bijection: every map used exactly once
    assert any(before[v][0] != after[k][0] for k, v in sources.items())  # maps cross shards
    m_in, m_out = read_manifest(src), read_manifest(out)
    assert m_out.raw["saliency"]["kind"] == "shuffled" and m_out.raw["saliency"]["seed"] == 7
    assert m_out.raw["derived_from"]["derivation"] == {
        "name": "shuffle-saliency", "params": {"seed": 7, "permutation": "uniform derangement over the whole set"}}
    assert m_out.raw["derived_from"]["fingerprint"] == m_in.fingerprint != m_out.fingerprint

    again, other = tmp_path / "again", tmp_path / "other"
    assert _shuffle(src, again, 7) == 0 and _shuffle(src, other, 8) == 0
    assert [p.read_bytes() for p in read_manifest(again).tar_paths()] == [p.read_bytes() for p in m_out.tar_paths()]
    assert read_manifest(other).fingerprint != m_out.fingerprint
    assert [s["json"] for _, s in _by_key(other).values()] != [s["json"] for _, s in after.values()]


def test_derangement_has_no_fixed_points_and_is_seeded():
    for n in (2, 3, 5, 50, 1000):
        for seed in range(5):
            p = derangement(n, seed)
            assert sorted(p) == list(range(n)) and not np.any(p == np.arange(n))
            assert np.array_equal(p, derangement(n, seed))
    assert derangement(2, 0).tolist() == [1, 0]
    # every derangement of 3 elements ([1, 2, 0] and [2, 0, 1]) is reachable: not just a fixed cycle
    assert {tuple(derangement(3, s)) for s in range(40)} == {(1, 2, 0), (2, 0, 1)}


def test_a_single_sample_set_is_refused(tiny_shards, tmp_path, capsys):
    src = tiny_shards(num_samples=1, per_shard=1)
    out = tmp_path / "out"
    assert _shuffle(src, out, 0) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(src) in err and "1 sample" in err
    assert not (out / MANIFEST_NAME).exists()


def test_damaged_input_is_refused(tiny_shards, tmp_path, capsys):
    src = tiny_shards(num_samples=20, per_shard=10)
    (src / "train-000001.idx").write_text("v1.2 1\n")
    assert _shuffle(src, tmp_path / "out", 0) == 2
    assert "train-000001.idx" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [("--batch-size", 1), ("--batch-size", 64), ("--workers", 2)])
def test_batch_size_and_workers_do_not_change_the_output(tiny_shards, tmp_path, flags):
    src = tiny_shards(num_samples=24, per_shard=10)
    assert _shuffle(src, tmp_path / "a", 3, *flags) == 0
    assert _shuffle(src, tmp_path / "b", 3, "--batch-size", 5) == 0
    assert [p.read_bytes() for p in read_manifest(tmp_path / "a").tar_paths()] == \
        [p.read_bytes() for p in read_manifest(tmp_path / "b").tar_paths()]
