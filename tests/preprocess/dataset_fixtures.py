"""Write small datasets in the exact on-disk layouts of the originals, for the source tests.

Real pixels where a package ships them: the foolbox 3.3.4 wheel's data folder (20 real CIFAR-10,
CIFAR-100, MNIST, Fashion-MNIST and ImageNet samples each, label in the file name) is fetched once
with `pip download --no-deps` into ~/.cache/satpipe-test-data (SATPIPE_TEST_DATA overrides).
"""
from __future__ import annotations

import gzip
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import cv2
import numpy as np

FOOLBOX_VERSION = "3.3.4"
CACHE = Path(os.environ.get("SATPIPE_TEST_DATA", Path.home() / ".cache" / "satpipe-test-data"))


# ----------------------------------------------------------------------------- real sample images

def foolbox_data_dir() -> Path | str:
    """Folder with foolbox's data/*.png|jpg, or a string saying why it could not be had."""
    out = CACHE / f"foolbox-{FOOLBOX_VERSION}-data"
    if (out / ".complete").is_file():
        return out
    CACHE.mkdir(parents=True, exist_ok=True)
    wheels = sorted(CACHE.glob(f"foolbox-{FOOLBOX_VERSION}-*.whl"))
    if not wheels:
        try:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--retries", "1", "--timeout", "20",
                            f"foolbox=={FOOLBOX_VERSION}", "-d", str(CACHE)],
                           check=True, capture_output=True, timeout=180)
        except (subprocess.SubprocessError, OSError) as e:
            return f"cannot fetch the foolbox {FOOLBOX_VERSION} wheel for real CIFAR samples: {e}"
        wheels = sorted(CACHE.glob(f"foolbox-{FOOLBOX_VERSION}-*.whl"))
        if not wheels:
            return "pip download of foolbox gave no wheel"
    with zipfile.ZipFile(wheels[0]) as z:
        for name in z.namelist():
            if name.startswith("foolbox/data/") and not name.endswith("/"):
                (out / Path(name).name).parent.mkdir(parents=True, exist_ok=True)
                (out / Path(name).name).write_bytes(z.read(name))
    (out / ".complete").write_text("ok\n")
    return out


def foolbox_samples(data_dir: Path, prefix: str, grey: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(images N x H x W [x 3 RGB], labels) of foolbox's `<prefix>_<nn>_<label>.*` files, in order."""
    files = sorted(data_dir.glob(f"{prefix}_*"), key=lambda p: int(p.stem.split("_")[1]))
    imgs, labels = [], []
    for p in files:
        im = cv2.imread(str(p), cv2.IMREAD_GRAYSCALE if grey else cv2.IMREAD_COLOR)
        imgs.append(im if grey else im[..., ::-1])
        labels.append(int(p.stem.split("_")[2]))
    return np.stack(imgs), np.array(labels, dtype=np.int64)


# ----------------------------------------------------------------------------- MNIST IDX

def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> Path:
    """IDX file: 0 0 <type 0x08 = ubyte> <ndim>, big-endian uint32 dims, the bytes."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    data = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path = Path(str(path) + (".gz" if gz else ""))
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:  # same bytes every run
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def write_mnist_folder(root: Path, images: dict[str, np.ndarray], labels: dict[str, np.ndarray], gz=True) -> Path:
    """root/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz] as the MNIST site lays them out."""
    prefix = {"train": "train", "test": "t10k"}
    for split in images:
        write_idx(root / f"{prefix[split]}-images-idx3-ubyte", images[split], gz)
        write_idx(root / f"{prefix[split]}-labels-idx1-ubyte", labels[split], gz)
    return root


# ----------------------------------------------------------------------------- CIFAR pickles

def _cifar_rows(images: np.ndarray) -> np.ndarray:
    """N x 32 x 32 x 3 RGB -> N x 3072 planar rows (R plane, G plane, B plane), as the batches hold."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), -1))


def _dump(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)  # the originals are Python 2 cPickle: protocol 2, bytes keys


def write_cifar10(root: Path, train: tuple, test: tuple, classes: list[str] | None = None) -> Path:
    """root/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}; train split over 5 batches."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True, exist_ok=True)
    classes = classes or ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    images, labels = train
    for b, idx in enumerate(np.array_split(np.arange(len(images)), 5), 1):
        _dump(d / f"data_batch_{b}", {b"batch_label": f"training batch {b} of 5".encode(),
                                       b"labels": [int(x) for x in labels[idx]],
                                       b"data": _cifar_rows(images[idx]),
                                       b"filenames": [f"train_{i:05d}.png".encode() for i in idx]})
    images, labels = test
    _dump(d / "test_batch", {b"batch_label": b"testing batch 1 of 1", b"labels": [int(x) for x in labels],
                             b"data": _cifar_rows(images),
                             b"filenames": [f"test_{i:05d}.png".encode() for i in range(len(images))]})
    _dump(d / "batches.meta", {b"num_cases_per_batch": 10000, b"label_names": [c.encode() for c in classes],
                               b"num_vis": 3072})
    return root


def write_cifar100(root: Path, train: tuple, test: tuple) -> Path:
    """root/cifar-100-python/{train,test,meta} with fine and coarse labels (coarse = fine // 5 here)."""
    d = root / "cifar-100-python"
    d.mkdir(parents=True, exist_ok=True)
    for name, (images, labels) in (("train", train), ("test", test)):
        _dump(d / name, {b"filenames": [f"{name}_{i:05d}.png".encode() for i in range(len(images))],
                         b"batch_label": f"{name} batch".encode(),
                         b"fine_labels": [int(x) for x in labels], b"coarse_labels": [int(x) // 5 for x in labels],
                         b"data": _cifar_rows(images)})
    _dump(d / "meta", {b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
                       b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]})
    return root


# ----------------------------------------------------------------------------- photos and masks

def object_photo(rng, h: int, w: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """A textured RGB image with a bright object inside box (x0, y0, x1, y1 exclusive)."""
    img = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
    x0, y0, x1, y1 = box
    img[y0:y1, x0:x1] = rng.integers(170, 255, (y1 - y0, x1 - x0, 3), dtype=np.uint8)
    return img


def write_jpeg(path: Path, rgb: np.ndarray, quality: int = 95) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ext = path.suffix.lower() or ".jpg"
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if ext in (".jpg", ".jpeg") else []
    ok, buf = cv2.imencode(ext, np.ascontiguousarray(rgb[..., ::-1]), params)
    assert ok
    path.write_bytes(buf.tobytes())
    return path


def write_palette_png(path: Path, indices: np.ndarray) -> Path:
    """An indexed PNG with VOC's colour map (index 255 = void, cream)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(indices.astype(np.uint8), mode="P")
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):  # VOC's bit-interleaved colour map
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    im.putpalette(pal)
    im.save(path)
    return path


def write_grey_png(path: Path, values: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), values.astype(np.uint8))
    return path


def voc_xml(filename: str, w: int, h: int, objects: list[dict]) -> str:
    """Annotation XML as VOC writes it; objects: {name, box: (xmin, ymin, xmax, ymax) 1-based, difficult, truncated}."""
    return (f"<annotation>\n\t<folder>VOC2012</folder>\n\t<filename>{filename}</filename>\n"
            "\t<source>\n\t\t<database>The VOC2007 Database</database>\n\t</source>\n"
            f"\t<size>\n\t\t<width>{w}</width>\n\t\t<height>{h}</height>\n\t\t<depth>3</depth>\n\t</size>\n"
            "\t<segmented>1</segmented>\n" + _voc_objects(objects) + "</annotation>\n")


def _voc_objects(objects: list[dict]) -> str:
    """<object> elements as VOC and labelImg write them."""
    parts = []
    for o in objects:
        x0, y0, x1, y1 = o["box"]
        parts.append(f"\t<object>\n\t\t<name>{o['name']}</name>\n\t\t<pose>Unspecified</pose>\n"
                     f"\t\t<truncated>{int(o.get('truncated', 0))}</truncated>\n"
                     f"\t\t<difficult>{int(o.get('difficult', 0))}</difficult>\n"
                     f"\t\t<bndbox>\n\t\t\t<xmin>{x0}</xmin>\n\t\t\t<ymin>{y0}</ymin>\n"
                     f"\t\t\t<xmax>{x1}</xmax>\n\t\t\t<ymax>{y1}</ymax>\n\t\t</bndbox>\n\t</object>\n")
    return "".join(parts)


def labelimg_xml(image: Path, w: int, h: int, objects: list[dict], annotator_path: str) -> str:
    """Annotation XML as labelImg's pascal_voc_io writes it beside the image: <folder> is the image's
    folder name, <path> the absolute path on the annotator's machine, no <source> database of VOC's."""
    return (f"<annotation>\n\t<folder>{image.parent.name}</folder>\n\t<filename>{image.name}</filename>\n"
            f"\t<path>{annotator_path}</path>\n\t<source>\n\t\t<database>Unknown</database>\n\t</source>\n"
            f"\t<size>\n\t\t<width>{w}</width>\n\t\t<height>{h}</height>\n\t\t<depth>3</depth>\n\t</size>\n"
            "\t<segmented>0</segmented>\n" + _voc_objects(objects) + "</annotation>\n")


# ----------------------------------------------------------------------------- Tiny ImageNet

def write_tinyimagenet(root: Path, wnids: list[str], per_class: int = 3, val: int = 4, seed: int = 0) -> dict:
    """tiny-imagenet-200 layout with 64x64 JPEGs; returns {relative image path: (label, [x0, y0, x1, y1])}."""
    rng = np.random.default_rng(seed)
    truth = {}
    (root).mkdir(parents=True, exist_ok=True)
    (root / "wnids.txt").write_text("".join(f"{w}\n" for w in wnids))
    (root / "words.txt").write_text("".join(f"{w}\tname of {w}, synonym\n" for w in wnids) + "n99999999\tunused\n")
    for label, w in enumerate(wnids):
        lines = []
        for i in range(per_class):
            x0, y0 = (int(v) for v in rng.integers(0, 30, 2))
            x1, y1 = x0 + int(rng.integers(10, 33)), y0 + int(rng.integers(10, 33))
            name = f"{w}_{i}.JPEG"
            write_jpeg(root / "train" / w / "images" / name, object_photo(rng, 64, 64, (x0, y0, x1 + 1, y1 + 1)))
            lines.append(f"{name}\t{x0}\t{y0}\t{x1}\t{y1}\n")
            truth[f"train/{w}/images/{name}"] = (label, [x0, y0, x1, y1])
        (root / "train" / w / f"{w}_boxes.txt").write_text("".join(lines))
    lines = []
    for i in range(val):
        label = i % len(wnids)
        x0, y0, x1, y1 = 5, 6, 40, 50
        name = f"val_{i}.JPEG"
        write_jpeg(root / "val" / "images" / name, object_photo(rng, 64, 64, (x0, y0, x1 + 1, y1 + 1)))
        lines.append(f"{name}\t{wnids[label]}\t{x0}\t{y0}\t{x1}\t{y1}\n")
        truth[f"val/images/{name}"] = (label, [x0, y0, x1, y1])
    (root / "val" / "val_annotations.txt").write_text("".join(lines))
    write_jpeg(root / "test" / "images" / "test_0.JPEG", object_photo(rng, 64, 64, (0, 0, 10, 10)))
    return truth


# ----------------------------------------------------------------------------- end-to-end builds

def build_and_read(out: Path, *argv: str) -> tuple[dict, list[dict]]:
    """Run `preprocess build-shards ... --out OUT` in-process, then `preprocess verify OUT`;
    return (manifest, samples) with every sample's components decoded (image, sal, label, meta)."""
    import json

    from preprocess.cli import main
    from shards.format import decode_label
    from shards.manifest import read_manifest
    from shards.reading import iter_tar_samples

    rc = main(["build-shards", *argv, "--out", str(out), "--no-progress"])
    assert rc == 0, f"build-shards exited {rc}"
    assert main(["verify", str(out)]) == 0
    m = read_manifest(out)
    fmt, info = m.image["format"], m.image
    samples = []
    for tar in m.tar_paths():
        for s in iter_tar_samples(tar):
            if fmt == "raw":
                shape = (info["height"], info["width"]) + ((info["channels"],) if info["channels"] > 1 else ())
                img = np.frombuffer(s["raw"], np.uint8).reshape(shape)
            else:
                img = cv2.imdecode(np.frombuffer(s[fmt], np.uint8), cv2.IMREAD_UNCHANGED)
            sal = cv2.imdecode(np.frombuffer(s["sal.png"], np.uint8), cv2.IMREAD_GRAYSCALE)
            samples.append({"key": s["__key__"], "image": img, "sal": sal, "label": decode_label(s["label.i64"]),
                            "meta": json.loads(s["json"])})
    return m.raw, samples


# ----------------------------------------------------------------------------- what the build opens

_OPENED: list[str] | None = None  # set while a `files_opened()` block runs


def _audit(event: str, args) -> None:
    if _OPENED is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.path.realpath(os.fsdecode(args[0])))


_HOOKED = False


class files_opened:
    """`with files_opened() as opened:` -> the real paths of every file Python opened in the block
    (the interpreter's "open" audit events: builtins.open, Path.read_bytes, PIL, ElementTree...).
    Audit hooks cannot be removed, so one is installed once and records only inside a block."""

    def __enter__(self) -> list[str]:
        global _OPENED, _HOOKED
        if not _HOOKED:
            sys.addaudithook(_audit)
            _HOOKED = True
        _OPENED = []
        return _OPENED

    def __exit__(self, *exc) -> None:
        global _OPENED
        _OPENED = None
