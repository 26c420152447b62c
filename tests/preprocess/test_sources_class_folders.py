import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import dataset_fixtures as fx  # noqa: E402

from preprocess.config import BuildConfig  # noqa: E402
from preprocess.sources.base import Skip, SourceError  # noqa: E402
from preprocess.sources.class_folders import ClassFolderSource  # noqa: E402


def _cfg(root, split="train", **opts):
    return BuildConfig(source="class-folders", root=str(root), split=split, unit="image", source_options=opts)


@pytest.fixture
def folders(tmp_path):
    """root/{train,val}/<class>/...: real ImageNet photos (foolbox) where available, else synthetic."""
    data = fx.foolbox_data_dir()
    rng = np.random.default_rng(0)
    photos = [] if isinstance(data, str) else sorted(Path(data).glob("imagenet_*.jpg"))[:6]
    root = tmp_path / "data"
    layout = {"train": {"cat": 2, "dog": 2, "fox": 1}, "val": {"cat": 1, "fox": 1}}  # val has no dog
    k = 0
    for split, classes in layout.items():
        for c, n in classes.items():
            for i in range(n):
                target = root / split / c / f"img{i}.jpg"
                if k < len(photos):
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(photos[k].read_bytes())
                else:
                    fx.write_jpeg(target, fx.object_photo(rng, 40, 50, (5, 5, 20, 20)))
                k += 1
    return root


def test_classes_shared_across_splits(folders):
    train, val = ClassFolderSource(_cfg(folders)), ClassFolderSource(_cfg(folders, "val"))
    assert train.classes() == val.classes() == ["cat", "dog", "fox"]  # val lacks dog: indices still agree
    items, skips = val.items()
    assert [it.data for it in items] == [("cat/img0.jpg", 0), ("fox/img0.jpg", 2)] and skips == []
    s = next(val.load(items[1]))
    assert s.label == 2 and s.image.ndim == 3 and s.image.shape[2] == 3 and s.key == "fox/img0.jpg"
    grey = ClassFolderSource(_cfg(folders, grey=True))
    assert grey.channels == 1 and next(grey.load(grey.items()[0][0])).image.ndim == 2


def test_bad_files_recorded(folders):
    (folders / "train" / "notes.txt").write_text("hello")
    (folders / "train" / "dog" / "readme.md").write_text("x")
    (folders / "train" / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(20))
    src = ClassFolderSource(_cfg(folders))
    items, skips = src.items()
    assert {s.reason for s in skips} == {"file outside a class folder", "not an image file name"}
    broken = next(it for it in items if it.id.endswith("broken.png"))
    out = list(src.load(broken))
    assert isinstance(out[0], Skip) and out[0].reason in ("truncated image", "undecodable image")
    fp1 = src.fingerprint()
    (folders / "train" / "dog" / "img1.jpg").write_bytes(b"replaced")
    assert src.fingerprint()["image_list_sha256"] != fp1["image_list_sha256"]


def test_wrong_layouts(folders, tmp_path):
    with pytest.raises(SourceError, match="no test/ folder \\(split folders here: train, val\\)"):
        ClassFolderSource(_cfg(folders, "test"))
    flat = tmp_path / "flat"
    flat.mkdir()
    with pytest.raises(SourceError, match="no class sub-folders"):
        ClassFolderSource(_cfg(flat))
    (flat / "a").mkdir()
    with pytest.raises(SourceError, match="no image files"):
        ClassFolderSource(_cfg(flat)).items()
    # no split folders: the root is the split asked for
    fx.write_jpeg(flat / "a" / "x.png", np.zeros((8, 8, 3), np.uint8))
    assert [it.data for it in ClassFolderSource(_cfg(flat, "test")).items()[0]] == [("a/x.png", 0)]


def test_build_class_folders_val(folders, tmp_path):
    manifest, samples = fx.build_and_read(tmp_path / "out", "class-folders", "--root", str(folders), "--split", "val",
                                          "--unit", "image", "--size", "24", "--image-format", "jpg",
                                          "--saliency", "foreground")
    assert manifest["classes"] == ["cat", "dog", "fox"]
    assert sorted((s["meta"]["source_id"], s["label"]) for s in samples) == [("cat/img0.jpg", 0), ("fox/img0.jpg", 2)]
    assert samples[0]["image"].shape == (24, 24, 3)


def test_symlink_out_of_the_root_is_skipped_unless_allowed(folders, tmp_path):
    pool = tmp_path / "pool"
    fx.write_jpeg(pool / "shared.jpg", np.full((30, 30, 3), 99, np.uint8))
    (folders / "train" / "cat" / "linked.jpg").symlink_to(pool / "shared.jpg")
    src = ClassFolderSource(_cfg(folders))
    linked = next(it for it in src.items()[0] if it.id.endswith("linked.jpg"))
    out = list(src.load(linked))
    assert isinstance(out[0], Skip) and out[0].reason == "path outside root" and "--allow-outside-root" in out[0].detail
    allowed = ClassFolderSource(BuildConfig(source="class-folders", root=str(folders), split="train", unit="image",
                                            allow_outside_root=True))
    assert next(allowed.load(linked)).image[0, 0].tolist() == [99, 99, 99]
