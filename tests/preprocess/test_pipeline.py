"""preprocess.pipeline saliency kinds: `foreground-box` is the filled bounding box of the foreground."""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import dataset_fixtures as fx  # noqa: E402


def _garments(n, seed=0):
    """Dark images with one bright L-shaped object each (its box holds dark pixels too)."""
    rng = np.random.default_rng(seed)
    imgs = np.zeros((n, 28, 28), np.uint8)
    for img in imgs:
        y, x = rng.integers(2, 12, size=2)
        h, w = rng.integers(8, 14, size=2)
        img[y:y + h, x:x + 3] = 200  # vertical bar
        img[y + h - 3:y + h, x:x + w] = 220  # horizontal bar
    return imgs, rng.integers(0, 10, n).astype(np.uint8)


def test_foreground_box_is_the_filled_bounding_box_of_the_foreground(tmp_path):
    imgs, labels = _garments(12)
    fx.write_mnist_folder(tmp_path / "mnist", {"train": imgs}, {"train": labels})
    common = ("mnist", "--root", str(tmp_path / "mnist"), "--unit", "image", "--sigma-frac", "0")
    _, fg = fx.build_and_read(tmp_path / "fg", *common, "--saliency", "foreground")
    manifest, box = fx.build_and_read(tmp_path / "box", *common, "--saliency", "foreground-box")
    assert manifest["config"]["saliency"] == "foreground-box"
    fg_by_key = {s["key"]: s["sal"] for s in fg}
    for s in box:
        salient = fg_by_key[s["key"]] > 128
        rows, cols = np.flatnonzero(salient.any(1)), np.flatnonzero(salient.any(0))
        want = np.zeros((28, 28), bool)
        want[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] = True
        np.testing.assert_array_equal(s["sal"] > 128, want)
        assert (s["sal"] > 128).sum() > salient.sum()  # coarser: the L's box holds background pixels too
        assert set(np.unique(s["sal"])) <= {0, 255}  # hard map (sigma 0): salient +1, background -1
