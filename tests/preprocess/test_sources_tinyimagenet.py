import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import dataset_fixtures as fx  # noqa: E402

from preprocess.config import BuildConfig  # noqa: E402
from preprocess.pipeline import make_sample  # noqa: E402
from preprocess.sources.base import Skip, SourceError  # noqa: E402
from preprocess.sources.tinyimagenet import TinyImageNetSource  # noqa: E402

WNIDS = ["n01443537", "n01629819", "n01641577"]


def _cfg(root, split="train", unit="image", **kw):
    return BuildConfig(source="tinyimagenet", root=str(root), split=split, unit=unit, size=64,
                       image_format="png", sigma_frac=0.0, **kw)


@pytest.fixture
def tiny(tmp_path):
    truth = fx.write_tinyimagenet(tmp_path / "tiny-imagenet-200", WNIDS, per_class=3, val=4)
    return tmp_path / "tiny-imagenet-200", truth


def test_train_and_val_records_with_boxes(tiny):
    root, truth = tiny
    for split, n in (("train", 9), ("val", 4)):
        src = TinyImageNetSource(_cfg(root, split))
        assert src.classes() == [f"name of {w}" for w in WNIDS]
        items, skips = src.items()
        assert skips == [] and len(items) == n
        for it in items:
            label, (x0, y0, x1, y1) = truth[it.id]
            s = next(src.load(it))
            assert s.label == label and s.image.shape == (64, 64, 3)
            # inclusive corners -> half-open box: the whole 64 px image is (0, 0, 64, 64)
            assert s.shapes[0].box == (x0, y0, x1 + 1.0, y1 + 1.0)


def test_box_becomes_saliency_at_output_size(tiny):
    root, truth = tiny
    cfg = _cfg(root, "val", saliency="box")
    src = TinyImageNetSource(cfg)
    item = src.items()[0][0]
    sample = make_sample(next(src.load(item)), "box", cfg)
    sal = cv2.imdecode(np.frombuffer(sample["sal.png"], np.uint8), cv2.IMREAD_GRAYSCALE)
    _, (x0, y0, x1, y1) = truth[item.id]
    assert (sal[y0:y1 + 1, x0:x1 + 1] == 255).all()  # hard map (sigma 0): box salient
    inside = np.zeros_like(sal, bool)
    inside[y0:y1 + 1, x0:x1 + 1] = True
    assert (sal[~inside] == 0).all()


def test_object_unit_crops_around_the_box(tiny):
    root, truth = tiny
    cfg = _cfg(root, "train", unit="object", context=0.0)
    src = TinyImageNetSource(cfg)
    items, _ = src.items()
    s = next(src.load(items[0]))
    x0, y0, x1, y1 = s.shapes[0].box
    assert s.window[2] == pytest.approx(max(x1 - x0, y1 - y0))
    assert s.key.endswith("_0")


def test_wrong_layouts(tiny):
    root, _ = tiny
    with pytest.raises(SourceError, match="test images carry no labels"):
        TinyImageNetSource(_cfg(root, "test"))
    (root / "train" / WNIDS[1] / f"{WNIDS[1]}_boxes.txt").unlink()
    with pytest.raises(SourceError, match=f"{WNIDS[1]}_boxes.txt: missing boxes file"):
        TinyImageNetSource(_cfg(root, "train"))
    (root / "wnids.txt").unlink()
    with pytest.raises(SourceError, match="wnids.txt: missing"):
        TinyImageNetSource(_cfg(root, "val"))
    with pytest.raises(SourceError, match="no such folder"):
        TinyImageNetSource(_cfg(root / "nope", "val"))


def test_bad_lines_and_unmatched_files_are_recorded(tiny):
    root, _ = tiny
    ann = root / "val" / "val_annotations.txt"
    ann.write_text(ann.read_text()
                   + "val_9.JPEG\tn00000000\t1\t1\t5\t5\n"      # label not in wnids
                   + "val_8.JPEG\tn01443537\t1\t1\n"             # malformed
                   + "val_7.JPEG\tn01443537\t1\t1\t9\t9\n")      # image missing
    fx.write_jpeg(root / "val" / "images" / "val_6.JPEG", np.zeros((64, 64, 3), np.uint8))  # no annotation
    (root / "val" / "images" / "val_1.JPEG").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    src = TinyImageNetSource(_cfg(root, "val"))
    items, skips = src.items()
    reasons = {s.reason for s in skips}
    assert reasons == {"label not in wnids.txt", "malformed annotation line", "annotation for a missing image",
                       "image without annotation"}
    assert len(items) == 4
    broken = [r for it in items for r in src.load(it) if isinstance(r, Skip)]
    assert [b.reason for b in broken] == ["truncated image"] or [b.reason for b in broken] == ["undecodable image"]
    # a training image listed nowhere in its boxes file is recorded too
    fx.write_jpeg(root / "train" / WNIDS[0] / "images" / "extra.JPEG", np.zeros((64, 64, 3), np.uint8))
    items, skips = TinyImageNetSource(_cfg(root, "train")).items()
    assert [s.reason for s in skips] == ["image without a box"] and len(items) == 9


def test_build_tinyimagenet_val_box_saliency(tiny, tmp_path):
    root, truth = tiny
    manifest, samples = fx.build_and_read(tmp_path / "out", "tinyimagenet", "--root", str(root), "--split", "val",
                                          "--unit", "image", "--size", "32", "--image-format", "png",
                                          "--saliency", "box", "--sigma-frac", "0")
    assert manifest["classes"] == [f"name of {w}" for w in WNIDS] and len(samples) == 4
    for s in samples:
        label, (x0, y0, x1, y1) = truth[s["meta"]["source_id"]]
        assert s["label"] == label
        # 64 -> 32 px: the box (5..40, 6..50 inclusive) halves
        assert s["sal"][y0 // 2 + 1:(y1 + 1) // 2 - 1, x0 // 2 + 1:(x1 + 1) // 2 - 1].min() == 255
        assert s["sal"][30:, 25:].max() == 0


def test_hostile_annotations(tiny, tmp_path):
    """A val file name that climbs out of val/images is skipped unread; a wnid that is a path stops
    the build; a zero-byte image is a counted skip (it used to abort with a cv2 traceback)."""
    root, _ = tiny
    elsewhere = tmp_path / "elsewhere.JPEG"
    fx.write_jpeg(elsewhere, np.full((64, 64, 3), 200, np.uint8))
    ann = root / "val" / "val_annotations.txt"
    ann.write_text(ann.read_text() + f"../../../elsewhere.JPEG\t{WNIDS[0]}\t1\t1\t9\t9\n"
                   + f"{elsewhere}\t{WNIDS[0]}\t1\t1\t9\t9\n")
    (root / "val" / "images" / "val_1.JPEG").write_bytes(b"")
    src = TinyImageNetSource(_cfg(root, "val"))
    items, skips = src.items()
    assert [s.reason for s in skips] == ["path outside root"] * 2 and len(items) == 4
    loaded = [r for it in items for r in src.load(it)]
    assert [r.reason for r in loaded if isinstance(r, Skip)] == ["empty image"]
    assert not any(str(elsewhere) in str(it.data) for it in items)
    (root / "wnids.txt").write_text(f"{WNIDS[0]}\n../../etc\n")
    with pytest.raises(SourceError, match="wnids.txt: wnid 2 \\('../../etc'\\) is not a plain folder name"):
        TinyImageNetSource(_cfg(root, "train"))
