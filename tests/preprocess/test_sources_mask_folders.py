import logging
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
from preprocess.sources.mask_folders import MaskFolderSource  # noqa: E402
from preprocess.sources.masks import detect_kind, load_mask, map_mask, read_mask_values  # noqa: E402

H, W = 48, 64


def _trimap(x0, y0, x1, y1):
    """Oxford-IIIT trimap: 1 foreground, 2 background, 3 a 2-px unknown border around the object."""
    t = np.full((H, W), 2, np.uint8)
    t[y0 - 2:y1 + 2, x0 - 2:x1 + 2] = 3
    t[y0:y1, x0:x1] = 1
    return t


@pytest.fixture
def pets(tmp_path):
    """Oxford-IIIT Pet layout: images/, annotations/trimaps/, annotations/list.txt (1-based), splits."""
    root = tmp_path / "oxford-iiit-pet"
    rng = np.random.default_rng(0)
    breeds = ["Abyssinian", "beagle", "Bengal"]
    rows, stems = [], []
    for b, breed in enumerate(breeds):
        for i in range(1, 4):
            stem = f"{breed}_{i}"
            box = (10 + i, 8 + b, 40 + i, 30 + b)
            fx.write_jpeg(root / "images" / f"{stem}.jpg", fx.object_photo(rng, H, W, box))
            fx.write_grey_png(root / "annotations" / "trimaps" / f"{stem}.png", _trimap(*box))
            rows.append(f"{stem} {b + 1} {1 + (b == 1)} {i}")
            stems.append(stem)
    (root / "annotations" / "list.txt").write_text(
        "#Image CLASS-ID SPECIES BREED ID\n#ID: 1:37 Class ids\n" + "\n".join(rows) + "\n")
    (root / "annotations" / "trainval.txt").write_text("\n".join(r for k, r in enumerate(rows) if k % 3) + "\n")
    (root / "annotations" / "test.txt").write_text("\n".join(r for k, r in enumerate(rows) if k % 3 == 0) + "\n")
    (root / "classes.txt").write_text("\n".join(breeds) + "\n")
    return root


def _cfg(root, split="trainval", **opts):
    opts.setdefault("labels", "annotations/list.txt")
    opts.setdefault("label_base", 1)
    return BuildConfig(source="mask-folders", root=str(root), split=split, unit="image", size=64,
                       image_format="png", sigma_frac=0.0, source_options=opts)


def test_mask_value_mappings(tmp_path):
    tri = np.array([[1, 2, 3]], np.uint8)
    assert detect_kind(tri, False) == "trimap"
    assert map_mask(tri, "trimap").tolist() == [[1.0, -1.0, 0.0]]
    for values in ([[0, 255]], [[0, 1]]):
        v = np.array(values)
        assert detect_kind(v, False) == "binary" and map_mask(v, "binary").tolist() == [[-1.0, 1.0]]
    grey = np.array([[0, 128, 255]])
    assert detect_kind(grey, False) == "grey3" and map_mask(grey, "grey3").tolist() == [[-1.0, 0.0, 1.0]]
    pal = fx.write_palette_png(tmp_path / "p.png", np.array([[0, 3, 255, 15]]))
    values, is_palette = read_mask_values(pal)
    assert is_palette and values.tolist() == [[0, 3, 255, 15]]  # indices kept, not palette colours
    assert load_mask(pal)[0].tolist() == [[-1.0, 1.0, 0.0, 1.0]]
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="junk.png: not a readable mask"):
        load_mask(tmp_path / "junk.png")


def test_oxford_trimaps_split_and_labels(pets):
    src = MaskFolderSource(_cfg(pets, classes_file="classes.txt"))
    assert src.classes() == ["Abyssinian", "beagle", "Bengal"]
    items, skips = src.items()
    assert skips == [] and len(items) == 6 and "Abyssinian_1" not in {it.id for it in items}
    it = next(i for i in items if i.id == "beagle_2")
    s = next(src.load(it))
    assert s.label == 1
    m = s.shapes[0].mask
    assert set(np.unique(m).tolist()) == {0.0, 0.5, 1.0}  # bg, unknown border, fg
    assert m[20, 30] == 1.0 and m[0, 0] == 0.0 and m[9 - 2, 12] == 0.5
    assert s.shapes[0].box == (12.0, 9.0, 42.0, 31.0)  # the foreground's bounding box
    test_items, _ = MaskFolderSource(_cfg(pets, split="test")).items()
    assert sorted(i.id for i in test_items) == ["Abyssinian_1", "Bengal_1", "beagle_1"]


def test_trimap_unknown_is_stored_as_grey_128(pets):
    cfg = _cfg(pets)
    src = MaskFolderSource(cfg)
    raw = next(src.load(src.items()[0][0]))
    sample = make_sample(raw, "mask", cfg)
    sal = cv2.imdecode(np.frombuffer(sample["sal.png"], np.uint8), cv2.IMREAD_GRAYSCALE)
    # 64x48 image padded to 64x64 (8 rows each side): the unknown band maps to s = 0 -> 128
    assert set(np.unique(sal).tolist()) == {0, 128, 255}
    fg = raw.shapes[0].mask == 1.0
    assert (sal[8:56][fg] == 255).all()
    box = make_sample(raw, "box", cfg)
    sal_box = cv2.imdecode(np.frombuffer(box["sal.png"], np.uint8), cv2.IMREAD_GRAYSCALE)
    assert set(np.unique(sal_box).tolist()) == {0, 255}  # --saliency box: the mask's box, hard


def test_unmatched_files_size_mismatch_and_labels_out_of_range(pets, caplog):
    (pets / "annotations" / "trimaps" / "Bengal_2.png").unlink()                          # image without a mask
    fx.write_grey_png(pets / "annotations" / "trimaps" / "beagle_9.png", _trimap(5, 5, 9, 9))  # mask without image
    fx.write_jpeg(pets / "images" / "beagle_9x.jpg", np.zeros((H, W, 3), np.uint8))
    small = cv2.resize(_trimap(10, 10, 40, 30), (W // 2, H // 2), interpolation=cv2.INTER_NEAREST)
    fx.write_grey_png(pets / "annotations" / "trimaps" / "Bengal_3.png", small)             # half-size mask
    lst = pets / "annotations" / "list.txt"
    lst.write_text(lst.read_text().replace("beagle_2 2", "beagle_2 0").replace("Bengal_3 3", "Bengal_3 7"))
    src = MaskFolderSource(_cfg(pets, split_file="annotations/list.txt", classes_file="classes.txt"))
    items, skips = src.items()
    by_reason = {}
    for s in skips:
        by_reason.setdefault(s.reason, []).append(Path(s.detail).stem)
    assert by_reason == {"image without a mask": ["Bengal_2"], "label out of range": ["Bengal_3", "beagle_2"]}
    # beagle_9 is neither in list.txt nor matched; as a split-less build it would be recorded:
    all_items, all_skips = MaskFolderSource(_cfg(pets, split="all", classes_file="classes.txt")).items()
    assert {(s.reason, Path(s.detail).stem) for s in all_skips} >= {("mask without an image", "beagle_9"),
                                                                     ("image without a mask", "beagle_9x")}
    # a mask of another size is resized (nearest) with a warning, not dropped
    lst.write_text(lst.read_text().replace("Bengal_3 7", "Bengal_3 3"))
    src = MaskFolderSource(_cfg(pets, split="test"))
    it = next(i for i in src.items()[0] if i.id == "Bengal_1")
    it.data = (it.data[0].replace("Bengal_1", "Bengal_3"), it.data[1].replace("Bengal_1", "Bengal_3"), it.data[2])
    with caplog.at_level(logging.WARNING, logger="preprocess"):
        s = next(src.load(it))
    assert s.shapes[0].mask.shape == (H, W) and "resized" in s.meta["warning"]
    assert "Bengal_3.png: mask is 32x24, image is 64x48" in caplog.text


def test_flowers_style_class_folders_and_binary_masks(tmp_path):
    root = tmp_path / "flowers"
    rng = np.random.default_rng(3)
    for c in ("daffodil", "tulip"):
        for i in range(2):
            stem = f"{c}_{i:04d}"
            fx.write_jpeg(root / "jpg" / c / f"{stem}.jpg", fx.object_photo(rng, H, W, (5, 5, 30, 30)))
            m = np.zeros((H, W), np.uint8)
            m[5:30, 5:30] = 255
            fx.write_grey_png(root / "masks" / f"{stem}.png", m)
    fx.write_grey_png(root / "masks" / "tulip_0009.png", np.zeros((H, W), np.uint8))  # no image
    src = BuildConfig(source="mask-folders", root=str(root), split="train", unit="image")
    src = MaskFolderSource(src)
    assert src.classes() == ["daffodil", "tulip"]
    items, skips = src.items()
    assert [it.data[2] for it in items] == [0, 0, 1, 1]
    assert [s.reason for s in skips] == ["mask without an image"]
    s = next(src.load(items[3]))
    assert s.shapes[0].box == (5.0, 5.0, 30.0, 30.0)
    assert set(np.unique(s.shapes[0].mask).tolist()) == {0.0, 1.0}
    # split list files: the test split lacks daffodil, the label of tulip stays 1
    (root / "test.txt").write_text("tulip_0001\n")
    test = MaskFolderSource(BuildConfig(source="mask-folders", root=str(root), split="test", unit="image"))
    assert test.classes() == ["daffodil", "tulip"] and [it.data[2] for it in test.items()[0]] == [1]


def test_wrong_layouts(tmp_path, pets):
    with pytest.raises(SourceError, match="no images folder"):
        MaskFolderSource(_cfg(tmp_path))
    with pytest.raises(SourceError, match="nolist.txt: missing list file"):
        MaskFolderSource(_cfg(pets, labels="nolist.txt"))
    with pytest.raises(SourceError, match="not in class folders; pass --labels"):
        MaskFolderSource(_cfg(pets, labels=""))
    with pytest.raises(SourceError, match="--mask-kind must be one of"):
        MaskFolderSource(_cfg(pets, mask_kind="heat"))


def test_build_oxford_pets_trimaps(pets, tmp_path):
    manifest, samples = fx.build_and_read(
        tmp_path / "out", "mask-folders", "--root", str(pets), "--split", "trainval", "--unit", "image",
        "--labels", "annotations/list.txt", "--label-base", "1", "--classes-file", "classes.txt",
        "--size", "32", "--image-format", "png", "--saliency", "mask", "--sigma-frac", "0")
    assert manifest["classes"] == ["Abyssinian", "beagle", "Bengal"] and len(samples) == 6
    for s in samples:
        assert s["image"].shape == (32, 32, 3)
        assert {0, 255} <= set(np.unique(s["sal"]).tolist())
    assert sorted(s["label"] for s in samples) == [0, 0, 1, 1, 2, 2]


def test_empty_image_and_links_leading_out(pets, tmp_path):
    """A zero-byte image is a counted skip (it used to abort with a cv2 traceback); an image or a
    mask that is a symlink out of its folder is skipped unread unless --allow-outside-root."""
    (pets / "images" / "beagle_2.jpg").write_bytes(b"")
    outside = tmp_path / "outside"
    outside.mkdir()
    (pets / "images" / "Bengal_2.jpg").rename(outside / "Bengal_2.jpg")
    (pets / "images" / "Bengal_2.jpg").symlink_to(outside / "Bengal_2.jpg")
    (pets / "annotations" / "trimaps" / "Bengal_3.png").rename(outside / "Bengal_3.png")
    (pets / "annotations" / "trimaps" / "Bengal_3.png").symlink_to(outside / "Bengal_3.png")
    reasons = {}
    for allow in (False, True):
        cfg = _cfg(pets)
        cfg.allow_outside_root = allow
        src = MaskFolderSource(cfg)
        out = [r for it in src.items()[0] for r in src.load(it)]
        reasons[allow] = sorted(r.reason for r in out if isinstance(r, Skip))
    assert reasons[False] == ["empty image", "path outside root", "path outside root"]
    assert reasons[True] == ["empty image"]
