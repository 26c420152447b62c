"""Shared geometry: conversions to RGB/grey, reduced decoding, one crop for image and shapes;
plus the console entry point's --help."""
from __future__ import annotations

import subprocess
import sys

import cv2
import numpy as np
import pytest

from preprocess.geometry import Crop, ImageError, clip_box, decode_image, reduction_for, square_window, to_channels


def test_to_channels_conversions():
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert to_channels(grey, 3).shape == (3, 4, 3) and (to_channels(grey, 3)[..., 1] == grey).all()
    rgba = np.dstack([np.full((3, 4, 3), 7, np.uint8), np.zeros((3, 4), np.uint8)])
    assert (to_channels(rgba, 3) == 7).all()
    deep = np.full((2, 2), 65535, np.uint16)
    assert (to_channels(deep, 1) == 255).all()
    assert (to_channels(np.ones((2, 2, 1), np.float32) * 0.5, 1) == 128).all()
    assert to_channels(np.zeros((2, 2), bool), 3).dtype == np.uint8
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[..., 0] = 255
    assert to_channels(rgb, 1)[0, 0] == 76  # ITU-R 601 luma of pure red
    with pytest.raises(ValueError):
        to_channels(np.zeros((2, 2, 5)), 3)


def test_decode_reduced_and_errors(tmp_path):
    img = np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)
    p = tmp_path / "a.jpg"
    cv2.imwrite(str(p), img)
    full, s1 = decode_image(p)
    quarter, s4 = decode_image(p, reduce=4)
    assert full.shape == (64, 80, 3) and s1 == 1.0
    assert quarter.shape == (16, 20, 3) and s4 == 0.25
    with pytest.raises(ImageError, match="missing image"):
        decode_image(tmp_path / "nope.jpg")
    (tmp_path / "cut.jpg").write_bytes(p.read_bytes()[:-600])
    with pytest.raises(ImageError, match="truncated image"):
        decode_image(tmp_path / "cut.jpg")
    assert reduction_for(300, 64) == 4 and reduction_for(100, 64) == 1 and reduction_for(1000, 32) == 8


def test_crop_maps_image_and_coordinates_alike():
    # a bright square at source [40, 60) x [20, 40); the crop must put it where to_output says
    img = np.zeros((100, 120), np.uint8)
    img[20:40, 40:60] = 255
    for scale in (1.0, 0.5):
        src = cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale != 1 else img
        crop = Crop.make(square_window((40, 20, 60, 40), 0.5), scale, 20)
        out = crop.apply(src)
        (x0, y0), (x1, y1) = crop.to_output(np.array([[40, 20], [60, 40]]))
        assert out.shape == (20, 20)
        assert (out[int(np.ceil(y0)):int(y1), int(np.ceil(x0)):int(x1)] > 200).all()
        assert out[:int(y0) - 1].max() < 30 and out[:, int(x1) + 1:].max() < 30
    # a window past the border is zero padded
    crop = Crop.make((-10, -10, 30), 1.0, 30)
    out = crop.apply(np.full((50, 50, 3), 9, np.uint8))
    assert out.shape == (30, 30, 3) and (out[:10] == 0).all() and (out[10:, 10:] == 9).all()
    whole = Crop.whole(60, 100, 1.0, 50)
    assert whole.apply(np.full((60, 100), 5, np.uint8))[0].max() == 0  # the short side is padded


def test_clip_box():
    assert clip_box((-5, -5, 10, 10), 20, 20) == (0.0, 0.0, 10.0, 10.0)
    assert clip_box((25, 0, 30, 10), 20, 20) is None
    assert clip_box((float("nan"), 0, 3, 3), 20, 20) is None


def test_console_help():
    r = subprocess.run([sys.executable, "-m", "preprocess", "build-shards", "coco", "--help"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "--shard-size" in r.stdout and "--num-nodes" in r.stdout
    r = subprocess.run([sys.executable, "-m", "preprocess"], capture_output=True, text=True)
    assert r.returncode == 0 and "build-shards" in r.stdout and "verify" in r.stdout


def test_header_size_without_decoding():
    """PNG and JPEG sizes come from their headers (a JPEG's EXIF thumbnail is not mistaken for
    the image); other formats through PIL's lazy open; garbage gives None."""
    import io

    from PIL import Image

    from preprocess.geometry import image_size

    rgb = np.zeros((123, 457, 3), np.uint8)
    for ext in (".jpg", ".png"):
        assert image_size(cv2.imencode(ext, rgb)[1].tobytes()) == (457, 123)
    im = Image.fromarray(rgb)
    exif = im.getexif()
    exif[0x010F] = "camera"
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif.tobytes(), progressive=True)
    assert image_size(buf.getvalue()) == (457, 123)
    for fmt in ("WEBP", "BMP", "TIFF"):
        buf = io.BytesIO()
        im.save(buf, fmt)
        assert image_size(buf.getvalue()) == (457, 123)
    assert image_size(b"\xff\xd8\xff\xe0garbage") is None and image_size(b"hello") is None


def test_large_jpegs_decode_reduced_when_the_crop_allows(tmp_path):
    from preprocess.geometry import REDUCE_ABOVE_PIXELS, read_image, reduce_if_large

    big = tmp_path / "big.jpg"
    cv2.imwrite(str(big), np.full((4000, 4100, 3), 80, np.uint8))
    assert 4000 * 4100 > REDUCE_ABOVE_PIXELS
    d = read_image(big, 3, reduce_if_large(64))  # the whole image -> 64 px: libjpeg's 1/8 is still >= 64
    assert d.pixels.shape == (500, 513, 3) and d.scale == 0.125 and (d.width, d.height) == (4100, 4000)
    assert read_image(big, 3, reduce_if_large(64, min_crop_side=300)).scale == 0.25  # 300 / 4 >= 64
    small = tmp_path / "small.jpg"
    cv2.imwrite(str(small), np.full((60, 80, 3), 80, np.uint8))
    assert read_image(small, 3, reduce_if_large(8)).scale == 1.0  # small images keep their bytes


def test_resolves_inside_follows_links(tmp_path):
    from preprocess.geometry import resolves_inside

    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (root / "in.jpg").write_bytes(b"x")
    (root / "out.jpg").symlink_to(outside / "x.jpg")
    (root / "linkdir").symlink_to(outside)
    (root / "alias.jpg").symlink_to(root / "in.jpg")
    assert resolves_inside(root / "in.jpg", root) and resolves_inside(root / "alias.jpg", root)
    assert resolves_inside(root / "sub" / ".." / "in.jpg", root)
    assert not resolves_inside(root / "out.jpg", root) and not resolves_inside(root / "linkdir" / "a.jpg", root)
    assert not resolves_inside(root / ".." / "outside" / "a.jpg", root) and not resolves_inside("/etc/passwd", root)
    assert not resolves_inside(tmp_path / "root2" / "a.jpg", root)  # a sibling sharing the prefix
