"""Each bad input of the foundation issue: a recorded skip with its reason (and the build goes on),
or one line naming the file and the problem with a non-zero exit. Never a traceback."""
from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
import dataset_fixtures as fx  # noqa: E402
from coco_fixture import make_coco, write_json  # noqa: E402

from preprocess.build_cli import main as build_main  # noqa: E402
from shards.manifest import read_manifest  # noqa: E402
from shards.reading import iter_tar_samples  # noqa: E402


@pytest.fixture
def coco(tmp_path):
    root = tmp_path / "coco"
    doc = make_coco(root, num_images=4, objects=2)
    return root, doc


def run(root: Path, out: Path, capsys, *extra) -> tuple[int, str, str]:
    rc = build_main(["coco", "--annotations", str(root / "ann.json"), "--images", str(root / "images"),
                     "--size", "32", "--out", str(out), "--no-progress", *map(str, extra)])
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err
    return rc, cap.out, cap.err


def error_line(err: str) -> str:
    """The error line (the config dump printed before a build comes first on stderr)."""
    lines = [l for l in err.splitlines() if l.startswith("preprocess build-shards:")]
    assert len(lines) == 1, err
    return lines[0]


def counts(out: Path) -> dict:
    c = read_manifest(out).raw["counts"]
    assert c["read"] == c["written"] + sum(c["skipped"].values())
    return c


def test_missing_undecodable_and_truncated_images_are_skipped(coco, tmp_path, capsys):
    root, doc = coco
    images = root / "images"
    (images / doc["images"][0]["file_name"]).unlink()
    (images / doc["images"][1]["file_name"]).write_bytes(b"this is not a jpeg at all")
    jpg = images / doc["images"][2]["file_name"]
    jpg.write_bytes(jpg.read_bytes()[: len(jpg.read_bytes()) // 2])
    rc, out, _ = run(root, tmp_path / "o", capsys)
    assert rc == 0
    c = counts(tmp_path / "o")
    assert c["written"] == 2  # the one intact image, 2 objects
    assert c["skipped"] == {"crowd annotation": 1, "missing image": 2, "undecodable image": 2, "truncated image": 2}
    assert "missing image: 2" in out and "truncated image: 2" in out  # the summary line
    ex = read_manifest(tmp_path / "o").raw["skip_examples"]
    assert doc["images"][0]["file_name"] in ex["missing image"][0]


def test_grey_rgba_16bit_palette_are_converted(coco, tmp_path, capsys):
    root, doc = coco
    images = root / "images"
    rgb = [cv2.imread(str(images / im["file_name"]))[..., ::-1] for im in doc["images"]]
    names = ["grey.png", "rgba.png", "deep.png", "palette.png"]
    cv2.imwrite(str(images / names[0]), cv2.cvtColor(rgb[0], cv2.COLOR_RGB2GRAY))
    cv2.imwrite(str(images / names[1]), np.dstack([rgb[1][..., ::-1], np.full(rgb[1].shape[:2], 255, np.uint8)]))
    cv2.imwrite(str(images / names[2]), rgb[2][..., ::-1].astype(np.uint16) * 257)
    Image.fromarray(rgb[3]).quantize(64).save(images / names[3])
    assert Image.open(images / names[3]).mode == "P"
    for im, name in zip(doc["images"], names):
        im["file_name"] = name
    write_json(root / "ann.json", doc)
    rc, _, err = run(root, tmp_path / "o", capsys)
    assert rc == 0, err
    c = counts(tmp_path / "o")
    assert c["written"] == 8 and c["skipped"] == {"crowd annotation": 1}
    for tar in (tmp_path / "o").glob("*.tar"):
        for s in iter_tar_samples(tar):
            img = cv2.imdecode(np.frombuffer(s["jpg"], np.uint8), cv2.IMREAD_UNCHANGED)
            assert img.shape == (32, 32, 3) and img.max() > 60  # converted, the object still there (bg ~30)
            if s["__key__"].startswith("grey"):  # grey -> RGB with equal channels (up to JPEG chroma noise)
                assert np.abs(img.astype(int) - img.mean(axis=2, keepdims=True)).max() < 12
            if s["__key__"].startswith("deep"):  # 16-bit scaled down to 8, not clipped to white
                assert img.mean() < 200


def test_box_problems(coco, tmp_path, capsys):
    root, doc = coco
    anns = doc["annotations"]
    w, h = doc["images"][0]["width"], doc["images"][0]["height"]
    anns[0]["bbox"] = [-10.0, -5.0, 40.0, 30.0]  # partly outside (negative coords): clipped
    anns[0]["segmentation"] = [[-10, -5, 30, -5, 30, 25, -10, 25]]
    anns[1]["bbox"] = [w + 5.0, 10.0, 20.0, 20.0]  # wholly outside
    anns[1]["segmentation"] = []
    anns[2]["bbox"] = [10.0, 10.0, 0.0, 15.0]  # zero area
    anns[3]["bbox"] = [float("nan"), 10.0, 5.0, 5.0]
    anns[4]["bbox"] = [10.0, 10.0, -5.0, 5.0]  # negative size
    anns[5]["segmentation"] = [[1, 2, 3, 4]]  # a polygon of 2 points
    (root / "ann.json").write_text(json.dumps(doc))  # json.dumps writes NaN, as broken exporters do
    rc, out, err = run(root, tmp_path / "o", capsys)
    assert rc == 0, err
    c = counts(tmp_path / "o")
    assert c["skipped"] == {"box outside image": 1, "crowd annotation": 1, "zero-area or negative box": 2,
                            "NaN or infinite box": 1, "polygon with fewer than 3 points": 1}
    assert c["written"] == 3
    clipped = [json.loads(s["json"]) for t in (tmp_path / "o").glob("*.tar") for s in iter_tar_samples(t)
               if json.loads(s["json"])["annotation_id"] == str(anns[0]["id"])][0]
    x, y, bw, bh = clipped["boxes"][0]
    assert x >= 0 and y >= 0 and x + bw <= 32 and y + bh <= 32


def test_unknown_image_and_category_ids(coco, tmp_path, capsys):
    root, doc = coco
    doc["annotations"][0]["image_id"] = 999999
    doc["annotations"][1]["category_id"] = 424242
    write_json(root / "ann.json", doc)
    rc, _, _ = run(root, tmp_path / "o", capsys)
    assert rc == 0
    c = counts(tmp_path / "o")
    assert c["skipped"]["unknown image id"] == 1 and c["skipped"]["unknown category id"] == 1
    assert c["written"] == 6


def test_malformed_json_is_one_line_error(coco, tmp_path, capsys):
    root, _ = coco
    (root / "ann.json").write_text('{"images": [1, 2,')
    rc, _, err = run(root, tmp_path / "o", capsys)
    line = error_line(err)
    assert rc == 2 and "ann.json" in line and "malformed JSON" in line
    (root / "ann.json").write_text('{"images": []}')
    rc, _, err = run(root, tmp_path / "o", capsys)
    assert rc == 2 and "not a COCO annotation file" in error_line(err)
    assert not (tmp_path / "o").exists()


def test_empty_dataset_is_one_line_error(coco, tmp_path, capsys):
    root, doc = coco
    doc["annotations"] = []
    write_json(root / "ann.json", doc)
    rc, _, err = run(root, tmp_path / "o", capsys)
    assert rc == 2 and "empty dataset" in error_line(err) and "ann.json" in error_line(err)


def test_nothing_buildable_writes_no_manifest(coco, tmp_path, capsys):
    root, doc = coco
    for im in doc["images"]:
        (root / "images" / im["file_name"]).unlink()
    rc, _, err = run(root, tmp_path / "o", capsys)
    assert rc == 1 and "no sample could be built" in error_line(err)
    assert not (tmp_path / "o" / "manifest.json").exists() and not list((tmp_path / "o").glob("*.tar"))


def test_unwritable_output_is_one_line_error(coco, tmp_path, capsys):
    root, _ = coco
    blocker = tmp_path / "a_file"
    blocker.write_text("x")  # (tests may run as root: a file in the path blocks even root)
    rc, _, err = run(root, blocker / "out", capsys)
    line = error_line(err)
    assert rc == 2 and str(blocker / "out") in line and "output folder" in line


def test_missing_inputs_and_bad_options(coco, tmp_path, capsys):
    root, _ = coco
    rc = build_main(["coco", "--annotations", str(root / "nope.json"), "--out", str(tmp_path / "o")])
    assert rc == 2 and "nope.json: annotation file not found" in error_line(capsys.readouterr().err)
    rc = build_main(["coco", "--annotations", str(root / "ann.json"), "--size", "3"])
    assert rc == 2 and "--size" in error_line(capsys.readouterr().err)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"size": 32, "sizee": 64}))
    rc = build_main(["coco", "--config", str(cfg)])
    assert rc == 2 and "unknown config key(s) sizee" in error_line(capsys.readouterr().err)


# ----------------------------------------------------------------------------- issue 16: hostile input

def test_empty_image_is_a_counted_skip(coco, tmp_path, capsys):
    """A zero-byte image used to abort the build (cv2: !buf.empty() in imdecode_)."""
    root, doc = coco
    (root / "images" / doc["images"][1]["file_name"]).write_bytes(b"")
    rc, _, err = run(root, tmp_path / "o", capsys)
    assert rc == 0, err
    c = counts(tmp_path / "o")
    assert c["skipped"] == {"crowd annotation": 1, "empty image": 2} and c["written"] == 6
    # the same decode serves every file-based source: class folders too
    cf = tmp_path / "cf"
    fx.write_jpeg(cf / "a" / "ok.jpg", np.full((20, 30, 3), 90, np.uint8))
    (cf / "b").mkdir()
    (cf / "b" / "empty.jpg").write_bytes(b"")
    rc = build_main(["class-folders", "--root", str(cf), "--size", "16", "--out", str(tmp_path / "cf-out"), "--no-progress"])
    assert rc == 0 and "Traceback" not in capsys.readouterr().err
    assert counts(tmp_path / "cf-out")["skipped"] == {"empty image": 1}


def test_coco_fields_of_the_wrong_type(tmp_path, capsys):
    """A broken image record or annotation is a counted skip with its own reason, never a
    traceback (a "width": "wide" used to raise ValueError) and never a silent box."""
    root = tmp_path / "coco"
    doc = make_coco(root, num_images=5, objects=3)
    ims, anns = doc["images"], doc["annotations"]  # anns[3i .. 3i+2] lie on ims[i]; ims[4] stays intact
    ims[0]["width"] = "wide"  # anns 0-2 (+ the crowd region, skipped as crowd first)
    anns[3]["segmentation"] = 42
    anns[4]["segmentation"] = [[10, 10, 40, 10, 40, 40, 10]]  # 7 numbers
    anns[5]["segmentation"] = [[10, 10, 40, 10, float("inf"), 40]]
    anns[6]["iscrowd"] = "0"
    anns[7]["bbox"] = "1234"
    anns[8]["area"] = "big"
    anns[9]["id"] = [9]
    anns[10]["image_id"] = [103]  # unhashable: used to raise TypeError
    anns[11]["category_id"] = {"id": 3}
    (root / "ann.json").write_text(json.dumps(doc))  # json writes Infinity, as a broken exporter would
    rc, _, err = run(root, tmp_path / "o", capsys)
    assert rc == 0, err
    c = counts(tmp_path / "o")
    assert c["skipped"] == {"crowd annotation": 1, "invalid image size": 3, "bad segmentation": 1,
                            "odd coordinate count": 1, "non-finite coordinates": 1, "invalid iscrowd": 1,
                            "invalid box": 1, "invalid area": 1, "invalid annotation id": 1,
                            "unknown image id": 1, "unknown category id": 1}
    assert c["written"] == 3


def test_broken_category_table_stops_with_one_line(coco, tmp_path, capsys):
    root, doc = coco
    for cats, words in (([{"id": 1, "name": "a"}, {"id": "1", "name": "b"}], "ids mix numbers and strings (1 and '1')"),
                        ([{"id": 3}, {"id": 3.5}], "categories[1]: id 3.5 is not an integer"),
                        ([{"id": 3}, {"id": 3}], "categories: duplicate ids")):
        doc["categories"] = cats
        write_json(root / "ann.json", doc)
        rc, _, err = run(root, tmp_path / "o", capsys)
        line = error_line(err)
        assert rc == 2 and "ann.json" in line and words in line, line


def test_file_names_outside_the_image_folder_are_never_opened(tmp_path, capsys):
    root = tmp_path / "coco"
    doc = make_coco(root, num_images=5, objects=2)
    ims = doc["images"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for i, name in enumerate(("a.jpg", "b.jpg", "c.jpg")):
        (elsewhere / name).write_bytes((root / "images" / ims[i]["file_name"]).read_bytes())
    ims[0]["file_name"] = "../../elsewhere/a.jpg"
    ims[1]["file_name"] = str(elsewhere / "b.jpg")
    ims[2]["file_name"] = "/etc/passwd"
    (root / "images" / "link.jpg").symlink_to(elsewhere / "c.jpg")  # a symlink leading out
    ims[3]["file_name"] = "link.jpg"
    write_json(root / "ann.json", doc)
    with fx.files_opened() as opened:
        rc, _, err = run(root, tmp_path / "o", capsys)
    assert rc == 0, err
    c = counts(tmp_path / "o")
    assert c["skipped"] == {"crowd annotation": 1, "path outside root": 8} and c["written"] == 2
    assert opened and not [p for p in opened if p.startswith(str(elsewhere)) or p == "/etc/passwd"]
    # a layout that really keeps its images elsewhere: --allow-outside-root reads them
    ims[2]["file_name"] = "../../elsewhere/missing.jpg"
    write_json(root / "ann.json", doc)
    rc, _, err = run(root, tmp_path / "o2", capsys, "--allow-outside-root")
    assert rc == 0, err
    c = counts(tmp_path / "o2")
    assert c["skipped"] == {"crowd annotation": 1, "missing image": 2} and c["written"] == 8
    assert read_manifest(tmp_path / "o2").raw["config"]["allow_outside_root"] is True


def test_max_pixels_refuses_before_decoding(coco, tmp_path, capsys):
    root, doc = coco
    big = doc["images"][0]
    fx.write_jpeg(root / "images" / big["file_name"], np.full((150, 200, 3), 60, np.uint8))
    big["width"], big["height"] = 200, 150
    doc["annotations"][1]["segmentation"] = []  # was an RLE of the 160x120 image
    write_json(root / "ann.json", doc)
    rc, _, err = run(root, tmp_path / "o", capsys, "--max-pixels", 160 * 120)
    assert rc == 0, err
    c = counts(tmp_path / "o")
    assert c["skipped"] == {"crowd annotation": 1, "image too large": 2} and c["written"] == 6
    ex = read_manifest(tmp_path / "o").raw["skip_examples"]["image too large"][0]
    assert "200x150 pixels" in ex and big["file_name"] in ex
    rc = build_main(["coco", "--annotations", str(root / "ann.json"), "--max-pixels", "0"])
    assert rc == 2 and "--max-pixels" in error_line(capsys.readouterr().err)


def png_bomb(path: Path, side: int) -> Path:
    """A valid 1-bit grey PNG of side x side zeros: ~50 KB on disk for side 20000 (400 MP), which
    OpenCV decodes to side^2 x 3 bytes (1.2 GB), then copies once more for RGB."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    body = b"".join(comp.compress(row * 1000) for _ in range(side // 1000))
    body += comp.compress(row * (side % 1000)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


RSS_BOUND_MB = 600  # a build of a few small images peaks near 180 MB here; the bomb decoded took 2.9 GB


def test_decompression_bomb_is_skipped_and_memory_stays_bounded(tmp_path):
    """The build runs in a fresh process that reports its own peak RSS, so nothing else this test
    session did can raise or hide the figure. It reads VmHWM (the high-water mark of the process's
    own address space), not ru_maxrss: Linux carries ru_maxrss across exec, so a child started from
    a pytest process that has grown to 700 MB would report 700 MB before doing anything."""
    root = tmp_path / "cf"
    for c in ("a", "b"):
        fx.write_jpeg(root / c / "ok.jpg", np.full((40, 50, 3), 120, np.uint8))
    png_bomb(root / "a" / "bomb.png", 20000)
    assert (root / "a" / "bomb.png").stat().st_size < 100_000
    probe = ("import re, sys\nfrom preprocess.build_cli import main\nrc = main(sys.argv[1:])\n"
             "hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)\n"
             "print('MAXRSS_KB', hwm)\nsys.exit(rc)\n")
    out = tmp_path / "o"
    r = subprocess.run([sys.executable, "-c", probe, "class-folders", "--root", str(root), "--size", "32",
                        "--out", str(out), "--no-progress"], capture_output=True, text=True, timeout=600,
                       cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0, r.stderr[-2000:]
    rss_mb = int(r.stdout.split("MAXRSS_KB")[1].split()[0]) / 1024
    assert rss_mb < RSS_BOUND_MB, f"peak RSS {rss_mb:.0f} MB"
    c = counts(out)
    assert c["skipped"] == {"image too large": 1} and c["written"] == 2
