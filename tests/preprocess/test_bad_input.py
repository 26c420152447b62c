"""Each bad input of the foundation issue: a recorded skip with its reason (and the build goes on),
or one line naming the file and the problem with a non-zero exit. Never a traceback."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from coco_fixture import make_coco, write_json  # noqa: E402

from preprocess.build_cli import main as build_main  # noqa: E402
from shards.format import iter_tar_samples, read_manifest  # noqa: E402


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
    assert rc == 2 and "unknown config keys: sizee" in error_line(capsys.readouterr().err)
