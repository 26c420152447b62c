"""kernels.saliency: the paper's convention (salient +1, background -1), sigma as a fraction of the
output size, the hard map at sigma 0, the fused 8-bit encoding agreeing bit for bit with the shard
format's reference, and the border-colour foreground mask."""
import numpy as np
import pytest

from kernels.blur import gaussian_blur
from kernels.raster import rasterize_polygons
from kernels.saliency import foreground_mask, mask_to_saliency, mask_to_saliency_u8, sigma_px_for
from shards.format import saliency_to_uint8, uint8_to_saliency


def disc(size, radius):
    yy, xx = np.mgrid[:size, :size]
    return ((xx - size / 2 + 0.5) ** 2 + (yy - size / 2 + 0.5) ** 2 <= radius ** 2).astype(np.uint8)


def test_convention_and_range():
    m = disc(64, 16)
    s = mask_to_saliency(m, 0.05)
    assert s.dtype == np.float32 and s.shape == (64, 64)
    assert s.min() >= -1.0 and s.max() <= 1.0
    assert s[32, 32] > 0.9 and s[0, 0] < -0.99       # object centre salient, far background not
    assert np.all(s[m == 1].mean() > s[m == 0].mean())
    # the blur actually softens the edge: values strictly between the two levels exist
    assert np.any((s > -0.9) & (s < 0.9))


def test_sigma_is_a_fraction_of_the_larger_side():
    rng = np.random.default_rng(0)
    m = (rng.random((24, 40)) > 0.5).astype(np.uint8)
    assert sigma_px_for(m.shape, 0.1) == pytest.approx(4.0)
    want = 2.0 * gaussian_blur(m, 4.0) - 1.0
    np.testing.assert_allclose(mask_to_saliency(m, 0.1), np.clip(want, -1, 1), atol=1e-6)


def test_sigma_zero_is_the_hard_map():
    m = disc(32, 9)
    s = mask_to_saliency(m, 0.0)
    np.testing.assert_array_equal(s, np.where(m == 1, 1.0, -1.0).astype(np.float32))
    g = mask_to_saliency_u8(m, 0.0)
    np.testing.assert_array_equal(g, m * np.uint8(255))
    # bool masks are accepted as {0, 1}
    np.testing.assert_array_equal(mask_to_saliency_u8(m.astype(bool), 0.0), g)


def test_u8_encoding_agrees_with_shard_format_exactly():
    rng = np.random.default_rng(1)
    for i in range(120):
        size = int(rng.choice([16, 32, 64]))
        if i % 3 == 0:
            m = rng.random((size, size)).astype(np.float32)       # soft float masks too
        else:
            m = (rng.random((size, size)) > rng.random()).astype(np.uint8)
        frac = float(rng.choice([0.0, 0.01, 0.03, 0.05, 0.1, 0.25]))
        ref = saliency_to_uint8(mask_to_saliency(m, frac))
        np.testing.assert_array_equal(mask_to_saliency_u8(m, frac), ref)
    # and decodes back to within one quantization step
    s = mask_to_saliency(disc(32, 10), 0.05)
    assert np.abs(uint8_to_saliency(mask_to_saliency_u8(disc(32, 10), 0.05)) - s).max() <= 1 / 127.5 + 1e-6


def test_non_contiguous_masks_give_the_same_maps():
    big = disc(64, 20)
    for view in (big[::2, ::2], np.asfortranarray(big[:32, :40]), big[5:37, 3:43]):
        np.testing.assert_array_equal(mask_to_saliency_u8(view, 0.05), mask_to_saliency_u8(view.copy(order="C"), 0.05))
        img = np.stack([view * 200] * 3, -1)[:, ::-1]
        np.testing.assert_array_equal(foreground_mask(img, 10), view[:, ::-1])


def test_fused_per_object_path_reuses_buffers():
    poly = np.array([[4.0, 4.0], [28.0, 6.0], [26.0, 27.0], [6.0, 24.0]])
    m = np.empty((32, 32), np.uint8)
    g = np.empty((32, 32), np.uint8)
    assert rasterize_polygons(poly, [0, 4], [0], 32, 32, out=m) is m
    assert mask_to_saliency_u8(m, 0.05, out=g) is g
    np.testing.assert_array_equal(g, saliency_to_uint8(mask_to_saliency(m, 0.05)))
    assert g[16, 16] > 240 and g[0, 31] < 15


def test_foreground_on_black_background():
    img = np.zeros((28, 28), np.uint8)
    img[5:20, 8:18] = 180
    img[10, 10] = 5            # a dark spot inside the object: not above the threshold
    img[0, 0] = 255            # one bright border pixel does not move the median
    want = np.zeros((28, 28), np.uint8)
    want[5:20, 8:18] = 1
    want[10, 10] = 0
    want[0, 0] = 1
    got = foreground_mask(img, threshold=16)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, want)
    # strictly greater than the threshold
    flat = np.zeros((8, 8), np.uint8)
    flat[3:5, 3:5] = 16
    assert foreground_mask(flat, 16).sum() == 0 and foreground_mask(flat, 15).sum() == 4


def test_foreground_colour_on_white_uses_max_channel_difference():
    img = np.full((20, 20, 3), 255, np.uint8)
    img[3:9, 4:12] = [250, 100, 250]       # differs in one channel only
    img[12:15, 12:15] = [240, 240, 240]    # a faint grey patch, below the threshold
    got = foreground_mask(img, 20)
    assert got.sum() == 6 * 8 and got[3:9, 4:12].all()
    out = np.empty((20, 20), np.uint8)
    assert foreground_mask(img, 20, out=out) is out


def test_bad_arguments():
    with pytest.raises(ValueError, match="sigma_frac"):
        mask_to_saliency(np.zeros((4, 4), np.uint8), -0.1)
    with pytest.raises(ValueError, match="2-D"):
        mask_to_saliency_u8(np.zeros((4, 4, 2), np.uint8), 0.1)
    with pytest.raises(ValueError, match="non-empty"):
        mask_to_saliency(np.zeros((0, 4), np.uint8), 0.1)
    with pytest.raises(ValueError, match="out must be"):
        mask_to_saliency_u8(np.zeros((4, 4), np.uint8), 0.1, out=np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match=r"\[0, 1\].*max 255"):
        mask_to_saliency_u8(np.full((4, 4), 255, np.uint8), 0.1)   # a 0/255 mask by mistake
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mask_to_saliency(np.full((4, 4), np.nan, np.float32), 0.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mask_to_saliency(np.full((4, 4), -0.5, np.float32), 0.0)
    # float rounding just outside [0, 1] (as from cv2.resize of a {0, 1} mask) is accepted
    nearly = np.full((4, 4), 1.0000001, np.float32)
    np.testing.assert_array_equal(mask_to_saliency(nearly, 0.0), np.ones((4, 4), np.float32))
    with pytest.raises(ValueError, match="image must be"):
        foreground_mask(np.zeros((4,), np.uint8))
