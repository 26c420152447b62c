"""Property-based tests (hypothesis) of `preprocess build-shards` on hostile input, issue 16.

Each test writes a small dataset in a temporary folder from generated structures (COCO JSON, VOC
XML, Tiny-ImageNet box files, IDX headers, CIFAR batches): random shapes, wrong types, huge /
negative / NaN numbers, unicode and path-like names. It runs the real command in-process and checks:

- the build writes shards whose manifest counts add up (read = written + skipped by reason, and
  the shards hold `written` samples), or it exits non-zero with one error line; never a traceback
  (any exception escaping `main` fails the test) and never a hang (a per-example alarm);
- no file outside the dataset folder is opened: a sentinel image sits next to the folder, named
  by some of the generated paths, and Python's "open" audit events must never show it (nor
  /etc/passwd).

Examples are derandomized (the same ones every run, so CI is stable) and few, to keep the file
under ~40 s on 2 cores. To explore: SATPIPE_FUZZ_RANDOM=1 SATPIPE_FUZZ_EXAMPLES=500 pytest this file.
"""
from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import pickle
import signal
import struct
import sys
import tempfile
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))
import dataset_fixtures as fx  # noqa: E402

from preprocess.build_cli import main as build_main  # noqa: E402
from shards.manifest import read_manifest  # noqa: E402

FUZZ = settings(max_examples=int(os.environ.get("SATPIPE_FUZZ_EXAMPLES", "25")), deadline=None, database=None,
                derandomize=not os.environ.get("SATPIPE_FUZZ_RANDOM"),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
HANG_S = 120  # far above any example here (each takes well under a second): only a hang trips it

# ----------------------------------------------------------------------------- the property


@contextlib.contextmanager
def _alarm(seconds: int):
    def hang(*_):
        raise TimeoutError(f"build still running after {seconds} s: a hang")
    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def check_build(tmp: Path, argv: list[str], outside: Path) -> None:
    out = tmp / "out"
    err, std = io.StringIO(), io.StringIO()
    with _alarm(HANG_S), fx.files_opened() as opened, contextlib.redirect_stderr(err), contextlib.redirect_stdout(std):
        rc = build_main([*argv, "--out", str(out), "--no-progress", "--shard-size", "4"])
    err = err.getvalue()
    assert "Traceback" not in err, err
    leaked = [p for p in opened if p.startswith(str(outside)) or p == "/etc/passwd"]
    assert not leaked, f"opened outside the dataset folder: {leaked}"
    if rc != 0:
        lines = [line for line in err.splitlines() if line.startswith("preprocess build-shards:")]
        assert len(lines) == 1, err
        # (--hypothesis-show-statistics: how the examples ended)
        event(f"exit {rc}: {lines[0].replace(str(tmp), '')[25:85]}")
        return
    m = read_manifest(out)
    c = m.raw["counts"]
    assert c["read"] == c["written"] + sum(c["skipped"].values()), c
    assert sum(s["samples"] for s in m.shards) == c["written"] > 0, c
    event("built shards")
    for reason in c["skipped"]:
        event(f"skip: {reason}")


def _workspace():
    """(temporary folder, the dataset root inside it, a sentinel image outside the root)."""
    tmp = tempfile.TemporaryDirectory(prefix="fuzz-")
    base = Path(tmp.name)
    outside = base / "outside"
    fx.write_jpeg(outside / "sentinel.jpg", np.full((32, 32, 3), 250, np.uint8))
    return tmp, base, base / "data", outside


# ----------------------------------------------------------------------------- shared strategies
# Each dataset starts valid and gets 0-4 hostile mutations (a field replaced or removed, a record
# added), so most examples build shards with a few counted skips instead of all failing at the top.

NUMBERS = st.one_of(st.integers(-5, 200), st.floats(allow_nan=True, allow_infinity=True),
                    st.integers(min_value=2**63, max_value=2**70), st.sampled_from([0, 1, 1e300, -1.0]))
JUNK = st.one_of(st.none(), st.booleans(), st.text(max_size=6), st.lists(st.integers(0, 5), max_size=3),
                 st.dictionaries(st.text(max_size=3), st.integers(0, 3), max_size=2))
HOSTILE = st.one_of(NUMBERS, JUNK)
XML_TEXT = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=8)
MUTATIONS = st.integers(0, 4)
DROP = object()  # a mutation that removes the field


def rarely(draw, n: int) -> bool:
    """True about once in n draws (a middle value: hypothesis favours the ends of a range)."""
    return draw(st.integers(1, n)) == n // 2 + 1


def path_like(good: list[str], outside: Path):
    """Names a file name field may hold: real files, ones that leave the folder, odd ones."""
    return st.one_of(st.sampled_from(good), st.sampled_from([
        "../outside/sentinel.jpg", "../../outside/sentinel.jpg", "../../../outside/sentinel.jpg",
        str(outside / "sentinel.jpg"), "/etc/passwd", "sub/../" + good[0], "missing.jpg", "", ".", "..",
        "ünïcödé.jpg", "a\x00b.jpg", "\udcff.jpg"]), st.text(max_size=10))


def mutate(draw, records: list[dict], values: dict) -> None:
    """Replace (or drop) a few fields of a few records, each value from values[field] (HOSTILE else)."""
    for _ in range(draw(MUTATIONS)):
        rec = draw(st.sampled_from(records))
        key = draw(st.sampled_from(sorted(rec)))
        value = draw(st.one_of(values.get(key, HOSTILE), st.just(DROP)))
        if value is DROP:
            del rec[key]
        else:
            rec[key] = value


def _images(folder: Path, names=("a.jpg", "b.png")) -> list[str]:
    """Two real images (40x30), an empty file and a file that is not an image."""
    rng = np.random.default_rng(0)
    for n in names:
        fx.write_jpeg(folder / n, fx.object_photo(rng, 30, 40, (5, 5, 25, 20)))
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "junk.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return [*names, "empty.jpg", "junk.jpg"]


# ----------------------------------------------------------------------------- COCO JSON

@st.composite
def coco_docs(draw, good: list[str], outside: Path):
    images = [{"id": 1, "file_name": good[0], "width": 40, "height": 30},
              {"id": 2, "file_name": good[1], "width": 40, "height": 30}]
    cats = [{"id": 1, "name": "x"}, {"id": 2, "name": "y"}]
    ring = [5.0, 5.0, 25.0, 5.0, 25.0, 20.0, 5.0, 20.0]
    anns = [{"id": k, "image_id": 1 + k % 2, "category_id": 1 + k // 2, "bbox": [5.0, 5.0, 20.0, 15.0],
             "segmentation": [list(ring)] if k != 3 else {"size": [30, 40], "counts": [0, 1200]},
             "area": 300.0, "iscrowd": 0} for k in range(4)]
    coord = st.one_of(st.floats(-10, 50), NUMBERS)
    values = {
        "file_name": path_like(good, outside),
        "id": st.one_of(st.integers(1, 3), st.sampled_from(["1", "2"]), HOSTILE),
        "image_id": st.one_of(st.integers(1, 3), st.sampled_from(["1"]), HOSTILE),
        "category_id": st.one_of(st.integers(1, 3), HOSTILE),
        "bbox": st.one_of(st.lists(coord, min_size=4, max_size=4), st.lists(coord, max_size=5), HOSTILE),
        "segmentation": st.one_of(st.lists(st.lists(coord, max_size=9), max_size=2), st.fixed_dictionaries(
            {"size": st.one_of(st.just([30, 40]), HOSTILE), "counts": st.one_of(st.text(max_size=8), HOSTILE)}), HOSTILE),
        "iscrowd": st.one_of(st.sampled_from([0, 1]), HOSTILE)}
    mutate(draw, images + cats + anns, values)
    doc = {"images": images, "annotations": anns, "categories": cats}
    if rarely(draw, 10):  # now and then a broken top level
        doc[draw(st.sampled_from(list(doc)))] = draw(HOSTILE)
    return doc


@FUZZ
@given(data=st.data())
def test_fuzz_coco(data):
    tmp, base, root, outside = _workspace()
    with tmp:
        good = _images(root / "images")
        doc = data.draw(coco_docs(good, outside))
        (root / "ann.json").write_text(json.dumps(doc))
        unit = data.draw(st.sampled_from(["object", "image"]))
        check_build(base, ["coco", "--annotations", str(root / "ann.json"), "--images", str(root / "images"),
                           "--size", "16", "--unit", unit], outside)


# ----------------------------------------------------------------------------- Pascal VOC XML

@st.composite
def voc_xml(draw, good: list[str], outside: Path) -> bytes:
    if rarely(draw, 15):
        return draw(st.binary(max_size=40))  # not XML at all
    head = {"filename": good[0], "width": "40", "height": "30"}
    objs = [{"name": "dog", "difficult": "0", "xmin": "5", "ymin": "5", "xmax": "25", "ymax": "20"},
            {"name": "cat", "difficult": "0", "xmin": "1", "ymin": "2", "xmax": "40", "ymax": "30"}]
    field = st.one_of(st.sampled_from(["1", "30", "40", "nan", "inf", "-5", "1e400", "99999999999999999999"]), XML_TEXT)
    mutate(draw, [head] + objs, {"filename": path_like(good, outside), "name": st.one_of(
        st.sampled_from(["dog", "cat", "person"]), XML_TEXT)} | {k: field for k in ("width", "height", "difficult",
                                                                               "xmin", "ymin", "xmax", "ymax")})

    def tag(rec, name):
        return f"<{name}>{escape(str(rec[name]))}</{name}>" if name in rec else ""
    xml = (f"<annotation>{tag(head, 'filename')}<path>{escape(str(outside / 'sentinel.jpg'))}</path>"
           f"<size>{tag(head, 'width')}{tag(head, 'height')}</size>"
           + "".join(f"<object>{tag(o, 'name')}{tag(o, 'difficult')}<bndbox>"
                     + "".join(tag(o, t) for t in ("xmin", "ymin", "xmax", "ymax")) + "</bndbox></object>"
                     for o in objs[:0 if rarely(draw, 10) else draw(st.integers(1, 2))]) + "</annotation>")
    return xml.encode("utf-8", "surrogateescape")  # "\udcff" becomes a byte that is not UTF-8


@FUZZ
@given(data=st.data())
def test_fuzz_voc(data):
    tmp, base, root, outside = _workspace()
    with tmp:
        good = _images(root / "JPEGImages", ("a.jpg", "b.jpg"))
        ids = ["a", "b"] + data.draw(st.lists(st.sampled_from(["c", "../../outside/sentinel", "sub/x"]), max_size=2,
                                              unique=True))
        (root / "Annotations" / "sub").mkdir(parents=True)
        for i in ids:
            if ".." not in i:
                (root / "Annotations" / f"{i}.xml").write_bytes(data.draw(voc_xml(good, outside)))
        split = data.draw(st.sampled_from(["train", "all"]))
        if split == "train":
            (root / "ImageSets" / "Main").mkdir(parents=True)
            (root / "ImageSets" / "Main" / "train.txt").write_text("".join(f"{i}\n" for i in ids))
        check_build(base, ["voc", "--root", str(root), "--split", split, "--size", "16",
                           "--saliency", "box", "--unit", data.draw(st.sampled_from(["object", "image"]))], outside)


# ----------------------------------------------------------------------------- Tiny ImageNet box files

@FUZZ
@given(data=st.data())
def test_fuzz_tinyimagenet(data):
    tmp, base, root, outside = _workspace()
    with tmp:
        wnids = ["n01", "n02"]
        if rarely(data.draw, 5):
            wnids.append(data.draw(st.sampled_from(["../outside", "a/b", "ü", "..", "n01"])))
        root.mkdir(parents=True)
        (root / "wnids.txt").write_text("".join(f"{w}\n" for w in wnids))
        names = ["img_0.JPEG", "img_1.JPEG"]
        num = st.one_of(st.integers(-3, 70).map(str), st.sampled_from(["nan", "inf", "1e400", "x", ""]))
        value = st.one_of(num, path_like(names, outside).map(lambda t: t.replace("\x00", "")))

        def lines(rows: list[list[str]]) -> bytes:
            for _ in range(data.draw(MUTATIONS)):  # a field replaced, dropped or added
                row = data.draw(st.sampled_from(rows))
                k = data.draw(st.integers(0, len(row)))
                edit = data.draw(st.sampled_from(["set", "drop", "add"]))
                if edit == "add" or k == len(row):
                    row.insert(k, data.draw(value))
                elif edit == "drop":
                    del row[k]
                else:
                    row[k] = data.draw(value)
            text = "".join("\t".join(r).replace("\n", " ") + "\n" for r in rows)
            return text.encode("utf-8", "surrogateescape")

        for w in wnids:
            if "/" not in w and w != ".." and not (root / "train" / w).is_dir():
                _images(root / "train" / w / "images", names)
                (root / "train" / w / f"{w}_boxes.txt").write_bytes(lines([[n, "2", "3", "40", "50"] for n in names]))
        _images(root / "val" / "images", names)
        (root / "val" / "val_annotations.txt").write_bytes(lines([[n, wnids[k], "2", "3", "40", "50"]
                                                                   for k, n in enumerate(names)]))
        check_build(base, ["tinyimagenet", "--root", str(root), "--split", data.draw(st.sampled_from(["train", "val"])),
                           "--size", "16", "--unit", data.draw(st.sampled_from(["object", "image"]))], outside)


# ----------------------------------------------------------------------------- IDX headers

@st.composite
def idx_file(draw, dims: tuple[int, ...], labels: bool, hostile: bool) -> bytes:
    """A valid IDX file (type ubyte); when hostile, 0-4 mutations of its type code, rank, dims or payload."""
    count = dims[0] * (dims[1] * dims[2] if len(dims) == 3 else 1)
    magic, rank, dims = [0, 0, 0x08], len(dims), list(dims)
    payload = bytes(k % 10 for k in range(count)) if labels else bytes(range(256)) * (count // 256) + bytes(count % 256)
    for _ in range(draw(MUTATIONS) if hostile else 0):
        what = draw(st.sampled_from(["magic", "rank", "dim", "payload"]))
        if what == "magic":
            magic[draw(st.integers(0, 2))] = draw(st.sampled_from([0x08, 0x09, 0x0B, 0x0D, 0x0E, 0x01, 0xFF]))
        elif what == "rank":
            rank = draw(st.integers(0, 255))
        elif what == "dim" and dims:
            dims[draw(st.integers(0, len(dims) - 1))] = draw(st.one_of(st.integers(0, 8), st.integers(0, 2**32 - 1)))
        else:
            payload = payload[:draw(st.integers(0, len(payload)))] + draw(st.binary(max_size=20))
    return bytes(magic) + bytes([rank]) + struct.pack(f">{len(dims)}I", *dims) + payload


@FUZZ
@given(data=st.data())
def test_fuzz_idx_headers(data):
    tmp, base, root, outside = _workspace()
    with tmp:
        root.mkdir()
        n, h, w = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 6)), data.draw(st.integers(1, 6))
        gz, hostile = data.draw(st.booleans()), data.draw(st.sampled_from(["images", "labels"]))
        for name, blob in (("train-images-idx3-ubyte", data.draw(idx_file((n, h, w), False, hostile == "images"))),
                           ("train-labels-idx1-ubyte", data.draw(idx_file((n,), True, hostile == "labels")))):
            if gz:
                (root / (name + ".gz")).write_bytes(gzip.compress(blob, mtime=0))
            else:
                (root / name).write_bytes(blob)
        check_build(base, ["mnist", "--root", str(root), "--size", "16"], outside)


# ----------------------------------------------------------------------------- CIFAR batches

@st.composite
def cifar_batch(draw, hostile: bool) -> dict:
    n = draw(st.integers(1, 3))
    batch = {b"data": np.zeros((n, 3072), np.uint8), b"labels": list(range(n)),
             b"filenames": [f"f{k}.png".encode() for k in range(n)]}
    values = {b"data": st.one_of(st.builds(lambda shape, dt: np.zeros(shape, dt),
                                           st.lists(st.integers(0, 4), max_size=3).map(tuple),
                                           st.sampled_from([np.uint8, np.int64, np.float32])), HOSTILE),
              b"labels": st.one_of(st.lists(st.integers(-2, 12), max_size=4), st.lists(NUMBERS, max_size=4), HOSTILE),
              b"filenames": st.one_of(st.lists(st.binary(max_size=4), max_size=4), HOSTILE)}
    if hostile:
        mutate(draw, [batch], values)
    return batch


@FUZZ
@given(data=st.data())
def test_fuzz_cifar_batches(data):
    tmp, base, root, outside = _workspace()
    with tmp:
        d = root / "cifar-10-batches-py"
        d.mkdir(parents=True)
        meta = {b"label_names": [c.encode() for c in "abcdefghij"]}
        if rarely(data.draw, 5):
            meta[b"label_names"] = data.draw(st.one_of(st.lists(st.binary(max_size=3), max_size=3), HOSTILE))
        with open(d / "batches.meta", "wb") as f:
            pickle.dump(meta, f, protocol=2)
        hostile = data.draw(st.integers(1, 5))  # one batch file is mutated; a broken file stops the build
        for i in range(1, 6):
            with open(d / f"data_batch_{i}", "wb") as f:
                if i == hostile and rarely(data.draw, 10):
                    f.write(data.draw(st.binary(max_size=40)))  # not a pickle at all
                else:
                    pickle.dump(data.draw(cifar_batch(i == hostile)), f, protocol=2)
        check_build(base, ["cifar10", "--root", str(root), "--size", "16"], outside)
