import numpy as np
from PIL import Image

from preprocess.preview import DPI, PANEL_INCHES, main


def _png(path):
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def test_preview_grid_size_and_content(tiny_shards, tmp_path, capsys):
    root = tiny_shards(num_samples=24, per_shard=10, size=16, channels=3, image_format="png")
    out = tmp_path / "sub" / "grid.png"
    assert main([str(root), "--out", str(out), "--n", "9"]) == 0
    img = _png(out)
    # 9 samples -> 3 per row x 3 panels = 9 columns, 3 rows
    assert img.shape[1] == round(9 * PANEL_INCHES * DPI)
    assert img.shape[0] == round(3 * (PANEL_INCHES + 0.25) * DPI)
    assert "9 samples" in capsys.readouterr().out
    # non-trivial: many colours, and the heat map's saturated ends (red = salient, blue = background)
    flat = img.reshape(-1, 3).astype(int)
    assert len(np.unique(flat, axis=0)) > 200
    red = (flat[:, 0] > 150) & (flat[:, 2] < 80)
    blue = (flat[:, 2] > 150) & (flat[:, 0] < 90)
    assert red.sum() > 500 and blue.sum() > 500
    assert not list(out.parent.glob(".grid.png.tmp*"))  # written via a temp name


def test_preview_raw_grey_and_fewer_samples_than_asked(tiny_shards, tmp_path):
    root = tiny_shards(num_samples=5, per_shard=3, size=12, channels=1, image_format="raw")
    out = tmp_path / "g.png"
    assert main([str(root), "--out", str(out), "--n", "16", "--cols", "5"]) == 0
    img = _png(out)
    assert img.shape[:2] == (round((PANEL_INCHES + 0.25) * DPI), round(15 * PANEL_INCHES * DPI))
    assert img.std() > 20


def test_preview_bad_input_is_one_line(tiny_shards, tmp_path, capsys):
    out = tmp_path / "x.png"
    assert main([str(tmp_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no manifest" in err and err.count("\n") == 1 and not out.exists()
    root = tiny_shards(num_samples=8, per_shard=4)
    tar = sorted(root.glob("*.tar"))[1]
    tar.write_bytes(tar.read_bytes()[:1500])
    assert main([str(root), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{tar}: 1500 bytes" in err and not out.exists()
    assert main([str(root), "--out", str(out), "--n", "0"]) == 2
