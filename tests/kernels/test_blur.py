"""kernels.blur against OpenCV: kernel weights = cv2.getGaussianKernel with cv2's ksize rule for float
images, blurred images = cv2.GaussianBlur(img, (0, 0), sigma, borderType=BORDER_REFLECT_101),
borders included, within 1 grey level on a 0..255 scale (seen: < 0.001)."""
import cv2
import numpy as np
import pytest

from kernels.blur import gaussian_blur, gaussian_kernel, reflect101_index

SIGMAS = (0.1, 0.1875, 0.3, 0.5, 0.8, 1.0, 1.6, 2.5, 3.2, 6.4, 16.0, 40.0)


@pytest.mark.parametrize("sigma", SIGMAS)
def test_kernel_is_opencvs(sigma):
    k = gaussian_kernel(sigma)
    ksize = int(round(sigma * 4 * 2 + 1)) | 1  # cv2's rule for CV_32F (Python round = cvRound: half to even)
    ref = cv2.getGaussianKernel(ksize, sigma, cv2.CV_32F).ravel()
    assert k.dtype == np.float32 and k.shape == ref.shape
    np.testing.assert_allclose(k, ref, rtol=0, atol=1e-7)
    assert abs(float(k.astype(np.float64).sum()) - 1.0) < 1e-5


def test_reflect101_matches_cv2_border_interpolate():
    for n in (1, 2, 3, 7):
        for radius in (0, 1, 4, 20):
            idx = reflect101_index(n, radius)
            want = [cv2.borderInterpolate(p, n, cv2.BORDER_REFLECT_101) for p in range(-radius, n + radius)]
            assert idx.tolist() == want


@pytest.mark.parametrize("sigma", SIGMAS)
def test_blur_matches_cv2_gaussian_blur(sigma):
    rng = np.random.default_rng(int(sigma * 1000))
    images = [
        (rng.random((32, 32)) > 0.6).astype(np.float32),      # a binary mask, the real use
        rng.random((64, 48), dtype=np.float32),               # non-square, arbitrary values
        (rng.random((7, 5)) * 255).astype(np.float32),        # kernel much wider than the image
        rng.random((1, 9), dtype=np.float32),                 # a single row
    ]
    for img in images:
        ref = cv2.GaussianBlur(img, (0, 0), sigma, borderType=cv2.BORDER_REFLECT_101)
        got = gaussian_blur(img, sigma)
        assert got.dtype == np.float32 and got.shape == img.shape
        scale = 255.0 / max(float(img.max()), 1e-6)  # compare on a 0..255 grey scale
        diff = np.abs(got - ref) * scale
        r = len(gaussian_kernel(sigma)) // 2
        assert diff[r:-r or None, r:-r or None].max(initial=0) <= 1.0  # interior: the acceptance bound
        assert diff.max() <= 1.0   # borders agree too (reflect-101)
        assert diff.max() <= 1e-3  # in fact to float rounding


def test_uint8_input_blurs_like_its_float_copy():
    rng = np.random.default_rng(1)
    m = (rng.random((40, 40)) > 0.5).astype(np.uint8)
    np.testing.assert_array_equal(gaussian_blur(m, 2.0), gaussian_blur(m.astype(np.float32), 2.0))


def test_sigma_zero_is_a_copy_and_constants_stay_constant():
    img = np.arange(12, dtype=np.float32).reshape(3, 4)
    got = gaussian_blur(img, 0.0)
    np.testing.assert_array_equal(got, img)
    got[0, 0] = 99
    assert img[0, 0] == 0  # a copy, not a view
    flat = np.full((20, 30), 0.75, np.float32)
    np.testing.assert_allclose(gaussian_blur(flat, 3.0), flat, atol=1e-5)
    out = np.empty((20, 30), np.float32)
    assert gaussian_blur(flat, 1.0, out=out) is out


def test_bad_arguments():
    with pytest.raises(ValueError, match="sigma"):
        gaussian_blur(np.zeros((4, 4), np.float32), -1.0)
    with pytest.raises(ValueError, match="sigma"):
        gaussian_blur(np.zeros((4, 4), np.float32), float("nan"))
    with pytest.raises(ValueError, match="2-D"):
        gaussian_blur(np.zeros((4, 4, 3), np.float32), 1.0)
    with pytest.raises(ValueError, match="out must be"):
        gaussian_blur(np.zeros((4, 4), np.float32), 1.0, out=np.zeros((4, 4), np.float64))
