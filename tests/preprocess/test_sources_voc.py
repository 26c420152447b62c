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
from preprocess.sources.voc import VOC_CLASSES, VocSource, parse_voc_xml  # noqa: E402

H, W = 60, 80
DOG, PERSON, CAT = VOC_CLASSES.index("dog"), VOC_CLASSES.index("person"), VOC_CLASSES.index("cat")


@pytest.fixture
def voc(tmp_path):
    """VOCdevkit/VOC2012 with: a segmented image (dog + difficult person), a box-only image (cat,
    truncated), an image whose XML is malformed, one with an unknown class, one listed without XML."""
    root = tmp_path / "VOCdevkit" / "VOC2012"
    rng = np.random.default_rng(0)
    # 2007_000001: dog box (11..40, 6..35) 1-based inclusive, person (difficult) (51..70, 21..50)
    img = fx.object_photo(rng, H, W, (10, 5, 40, 35))
    fx.write_jpeg(root / "JPEGImages" / "2007_000001.jpg", img)
    objects = [{"name": "dog", "box": (11, 6, 40, 35)},
               {"name": "person", "box": (51, 21, 70, 50), "difficult": 1}]
    (root / "Annotations").mkdir(parents=True)
    (root / "Annotations" / "2007_000001.xml").write_text(fx.voc_xml("2007_000001.jpg", W, H, objects))
    inst = np.zeros((H, W), np.uint8)
    inst[5:35, 10:40] = 255  # void border ...
    inst[7:33, 12:38] = 1    # ... around instance 1 (the dog)
    inst[20:50, 50:70] = 2   # instance 2 (the person), no border
    cls = np.where(inst == 1, DOG + 1, np.where(inst == 2, PERSON + 1, inst)).astype(np.uint8)
    fx.write_palette_png(root / "SegmentationObject" / "2007_000001.png", inst)
    fx.write_palette_png(root / "SegmentationClass" / "2007_000001.png", cls)
    # 2007_000002: box only
    fx.write_jpeg(root / "JPEGImages" / "2007_000002.jpg", fx.object_photo(rng, H, W, (0, 0, 30, 30)))
    (root / "Annotations" / "2007_000002.xml").write_text(
        fx.voc_xml("2007_000002.jpg", W, H, [{"name": "cat", "box": (1, 1, 30, 30), "truncated": 1}]))
    # 2007_000003: malformed XML; 2007_000004: unknown class; 2007_000005: no XML at all
    fx.write_jpeg(root / "JPEGImages" / "2007_000003.jpg", img)
    (root / "Annotations" / "2007_000003.xml").write_text("<annotation><size><width>80</wid")
    fx.write_jpeg(root / "JPEGImages" / "2007_000004.jpg", img)
    (root / "Annotations" / "2007_000004.xml").write_text(
        fx.voc_xml("2007_000004.jpg", W, H, [{"name": "unicorn", "box": (1, 1, 9, 9)}]))
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "train.txt").write_text(
        "".join(f"2007_00000{i}\n" for i in range(1, 6)))
    (root / "ImageSets" / "Main" / "dog_train.txt").write_text("2007_000001  1\n")  # per-class lists exist too
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_000001\n")
    return root


def _cfg(root, unit="object", context=0.25, **opts):
    return BuildConfig(source="voc", root=str(root), split="train", unit=unit, size=32, image_format="png",
                       sigma_frac=0.0, context=context, source_options=opts)


def test_parse_xml_fields(voc):
    ann = parse_voc_xml(voc / "Annotations" / "2007_000001.xml")
    assert (ann.width, ann.height, ann.filename) == (W, H, "2007_000001.jpg")
    dog, person = ann.objects
    assert dog.name == "dog" and dog.box == [10.0, 5.0, 30.0, 30.0] and not dog.difficult
    assert person.difficult and person.instance == 2
    assert parse_voc_xml(voc / "Annotations" / "2007_000002.xml").objects[0].truncated


def test_object_unit_skips_and_instance_masks(voc):
    src = VocSource(_cfg(voc.parent))  # VOCdevkit/ with a single VOC2012 inside is found
    assert src.classes() == VOC_CLASSES
    items, skips = src.items()
    assert {(s.id, s.reason) for s in skips} == {
        ("2007_000001#2", "difficult object"), ("2007_000003", "malformed annotation"),
        ("2007_000004#1", "unknown class name"), ("2007_000005", "missing annotation")}
    assert [it.id for it in items] == ["2007_000001", "2007_000002"]
    dog = next(src.load(items[0]))
    assert dog.label == DOG and dog.key == "2007_000001_1" and dog.meta["difficult"] is False
    m = dog.shapes[0].mask
    assert m[20, 20] == 1.0 and m[5, 10] == 0.5 and m[40, 60] == 0.0  # fg / void border / other object
    cat = next(src.load(items[1]))
    assert cat.label == CAT and cat.shapes[0].mask is None and cat.meta["truncated"] is True
    # rendered: mask inside, void border = grey 128, the box-only cat gets its box
    cfg = _cfg(voc)
    sal = cv2.imdecode(np.frombuffer(make_sample(dog, "mask", cfg)["sal.png"], np.uint8), cv2.IMREAD_GRAYSCALE)
    # the 30 px box plus 25 % context each side (45 px) -> 32 px: border ring ~ 5..27 px
    assert sal[16, 16] == 255 and sal[0, 0] == 0 and (sal == 128).sum() >= 40
    sal = cv2.imdecode(np.frombuffer(make_sample(cat, "mask", cfg)["sal.png"], np.uint8), cv2.IMREAD_GRAYSCALE)
    assert set(np.unique(sal).tolist()) <= {0, 255} and sal[16, 16] == 255


def test_image_unit_label_and_union(voc):
    src = VocSource(_cfg(voc, unit="image", keep_difficult=False))
    items, _ = src.items()
    s = next(src.load(items[0]))
    assert s.label == DOG and len(s.shapes) == 2  # the difficult person is still salient
    assert s.shapes[1].mask[30, 60] == 1.0
    seg = VocSource(_cfg(voc, unit="image", segmentation_split=True))
    assert [it.id for it in seg.items()[0]] == ["2007_000001"]
    nomask = VocSource(_cfg(voc, use_masks=False))
    assert next(nomask.load(nomask.items()[0][0])).shapes[0].mask is None


def test_class_png_used_without_instance_png_and_size_mismatch(voc, caplog):
    (voc / "SegmentationObject" / "2007_000001.png").unlink()
    cls = (voc / "SegmentationClass" / "2007_000001.png")
    from PIL import Image
    with Image.open(cls) as im:
        im.resize((W // 2, H // 2), Image.NEAREST).save(cls)
    src = VocSource(_cfg(voc))
    with caplog.at_level("WARNING", logger="preprocess"):
        dog = next(src.load(src.items()[0][0]))
    assert "mask is 40x30, image is 80x60" in caplog.text
    m = dog.shapes[0].mask
    assert m.shape == (H, W) and m[20, 20] == 1.0 and m[40, 60] == 0.0  # the person's class is outside


def test_wrong_layout_and_bad_images(voc, tmp_path):
    with pytest.raises(SourceError, match="no Annotations/ folder"):
        VocSource(_cfg(tmp_path))
    with pytest.raises(SourceError, match="val.txt: missing \\(splits here: train\\)"):
        VocSource(BuildConfig(source="voc", root=str(voc), split="val", unit="object"))
    (voc / "JPEGImages" / "2007_000002.jpg").unlink()
    src = VocSource(_cfg(voc))
    out = list(src.load(src.items()[0][1]))
    assert len(out) == 1 and isinstance(out[0], Skip) and out[0].reason == "missing image"
    fx.write_jpeg(voc / "JPEGImages" / "2007_000002.jpg", np.zeros((10, 10, 3), np.uint8))
    out = list(src.load(src.items()[0][1]))
    assert out[0].reason == "image size differs from annotation"


def test_build_voc_objects_records_skips(voc, tmp_path):
    manifest, samples = fx.build_and_read(tmp_path / "out", "voc", "--root", str(voc), "--unit", "object",
                                          "--size", "32", "--image-format", "png", "--saliency", "mask")
    assert manifest["classes"] == VOC_CLASSES
    assert sorted(s["label"] for s in samples) == sorted([DOG, CAT])
    assert manifest["counts"]["skipped"] == {"difficult object": 1, "malformed annotation": 1,
                                             "unknown class name": 1, "missing annotation": 1}


# ----------------------------------------------------------------------------- layouts annotation tools export

def _export_without_imagesets(root: Path, n: int = 6) -> Path:
    """Annotations/ + JPEGImages/ and nothing else, as "Pascal VOC" exports of annotation tools are."""
    rng = np.random.default_rng(1)
    (root / "Annotations").mkdir(parents=True)
    for i in range(n):
        name = f"frame_{i:03d}"
        fx.write_jpeg(root / "JPEGImages" / f"{name}.jpg", fx.object_photo(rng, H, W, (10, 5, 40, 35)))
        objects = [{"name": "dog" if i % 2 else "cat", "box": (11, 6, 40, 35)}]
        (root / "Annotations" / f"{name}.xml").write_text(fx.voc_xml(f"{name}.jpg", W, H, objects))
    return root


def test_export_without_imagesets_builds_with_split_all_or_a_val_fraction(tmp_path):
    root = _export_without_imagesets(tmp_path / "export")
    with pytest.raises(SourceError) as e:
        VocSource(_cfg(root))
    msg = str(e.value)  # what was found and what to pass
    assert "found 6 .xml files in Annotations/" in msg and "--split all" in msg and "--val-fraction" in msg
    manifest, samples = fx.build_and_read(tmp_path / "all", "voc", "--root", str(root), "--split", "all",
                                          "--size", "32", "--image-format", "png")
    assert manifest["counts"]["written"] == 6 and manifest["classes"] == VOC_CLASSES
    assert sorted(s["label"] for s in samples) == sorted([CAT, DOG] * 3)
    ids = {}
    for split in ("train", "val"):
        src = VocSource(BuildConfig(source="voc", root=str(root), split=split, unit="object",
                                    source_options={"val_fraction": 0.5}))
        ids[split] = {it.id for it in src.items()[0]}
    assert ids["train"] | ids["val"] == {f"frame_{i:03d}" for i in range(6)} and not ids["train"] & ids["val"]
    assert ids["val"] == {"frame_002"}  # where the hash of the ids puts them, whatever else is in the folder


def test_labelimg_xml_beside_its_image(tmp_path):
    """labelImg saves <name>.xml next to <name>.jpg, with <path> on the annotator's machine: that
    path must never be opened (here it exists, holding another picture)."""
    root = tmp_path / "shop-photos"
    annotator = tmp_path / "home" / "annotator" / "Pictures"
    rng = np.random.default_rng(2)
    layout = {"shelf_1.jpg": [("widget", (5, 5, 30, 30)), ("gadget", (40, 20, 70, 50))],
              "shelf_2.jpg": [("gadget", (11, 6, 40, 35))], "aisle/shelf_3.JPG": [("widget", (2, 2, 60, 50))]}
    for name, objs in layout.items():
        image = root / name
        fx.write_jpeg(image.with_suffix(".jpg"), fx.object_photo(rng, H, W, (10, 5, 40, 35)))
        image.with_suffix(".jpg").rename(image)
        fx.write_jpeg(annotator / image.name, np.full((H, W, 3), 255, np.uint8))
        xml = fx.labelimg_xml(image, W, H, [{"name": n, "box": b} for n, b in objs], str(annotator / image.name))
        image.with_suffix(".xml").write_text(xml)
    (root / "notes.txt").write_text("not an annotation")
    with pytest.raises(SourceError, match="found 3 .xml files beside their images \\(labelImg layout\\).*--split all"):
        VocSource(_cfg(root))
    with fx.files_opened() as opened:
        manifest, samples = fx.build_and_read(tmp_path / "out", "voc", "--root", str(root), "--split", "all",
                                              "--size", "32", "--image-format", "png", "--saliency", "box")
    assert not [p for p in opened if p.startswith(str(annotator))]
    assert manifest["classes"] == ["gadget", "widget"]  # the export's own classes, not VOC's
    assert manifest["counts"]["written"] == 4 and manifest["counts"]["skipped"] == {}
    assert sorted((s["meta"]["source_id"], s["label"]) for s in samples) == [
        ("aisle/shelf_3", 1), ("shelf_1", 0), ("shelf_1", 1), ("shelf_2", 0)]
    (root / "classes.txt").write_text("widget\n")  # a class list of one's own: gadgets become unknown
    src = VocSource(BuildConfig(source="voc", root=str(root), split="all", unit="object",
                                source_options={"classes_file": "classes.txt"}))
    assert src.classes() == ["widget"] and [s.reason for s in src.items()[1]] == ["unknown class name"] * 2


def test_filename_leaving_the_image_folder_is_skipped(voc, tmp_path):
    xml = voc / "Annotations" / "2007_000002.xml"
    xml.write_text(xml.read_text().replace("<filename>2007_000002.jpg", "<filename>../../../../etc/passwd"))
    (voc / "ImageSets" / "Main" / "train.txt").write_text("2007_000001\n2007_000002\n../../x\n")
    src = VocSource(_cfg(voc))
    items, skips = src.items()
    assert [it.id for it in items] == ["2007_000001"]
    assert {(s.id, s.reason) for s in skips} >= {("2007_000002", "path outside root"), ("../../x", "path outside root")}


def test_large_photo_is_decoded_reduced_and_keeps_its_geometry(tmp_path):
    """A phone photo above 16 MP in a labelImg folder: decoded at 1/8 (the crop still >= the
    output size), the size check uses the header, the window stays in source pixels."""
    root = tmp_path / "photos"
    img = np.full((4000, 4100, 3), 40, np.uint8)
    img[1000:3000, 1000:3000] = 220
    fx.write_jpeg(root / "big.jpg", img, quality=80)
    (root / "big.xml").write_text(fx.labelimg_xml(root / "big.jpg", 4100, 4000,
                                                  [{"name": "cat", "box": (1001, 1001, 3000, 3000)}], "/x/big.jpg"))
    src = VocSource(BuildConfig(source="voc", root=str(root), split="all", unit="object", size=32))
    s = next(src.load(src.items()[0][0]))
    assert s.scale == 0.125 and s.image.shape == (500, 513, 3)
    assert s.window[2] == pytest.approx(2000 * 1.5) and s.shapes[0].box == (1000.0, 1000.0, 3000.0, 3000.0)
    assert s.image[250, 250].min() > 200 and s.image[50, 50].max() < 60
