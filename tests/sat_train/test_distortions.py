"""sat_train.distortions against scipy.ndimage (the reference code's own filter) and the paper's formulas."""
import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from sat_train.distortions import LEVELS, check_level, distort, gaussian_blur, to_grey


def _batch(c=3, n=3, size=20, seed=0):
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(seed))


def test_paper_levels():
    # Mangla et al.'s reference code (io_utils.test_dict)
    assert LEVELS["contrast"] == (0.1, 0.3, 0.5, 0.7, 0.9, 1.0)
    assert LEVELS["low-pass"] == (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
    assert LEVELS["high-pass"] == (2.82, 2.0, 1.414, 1.0, 0.7, 0.5)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.82, 8.0, 32.0])
def test_gaussian_blur_matches_scipy_constant_mode(sigma):
    grey = _batch(c=1)
    cval = torch.tensor([0.4423, 0.0, 1.0])
    ours = gaussian_blur(grey, sigma, cval)
    for i in range(len(grey)):
        ref = gaussian_filter(grey[i, 0].double().numpy(), sigma, mode="constant", cval=float(cval[i]))
        np.testing.assert_allclose(ours[i, 0].numpy(), ref, atol=2e-6)


def test_low_and_high_pass_follow_the_reference_formulas():
    x = _batch()
    g = to_grey(x)[:, 0].double().numpy()
    np.testing.assert_allclose(g[0], 0.2125 * x[0, 0] + 0.7154 * x[0, 1] + 0.0721 * x[0, 2], atol=1e-6)
    for grey in (0.4423, None):
        low, high = distort(x, "low-pass", 2.0, grey), distort(x, "high-pass", 1.0, grey)
        assert low.shape == x.shape and high.shape == x.shape
        assert torch.equal(low[:, 0], low[:, 2]) and torch.equal(high[:, 1], high[:, 2])  # grey in every channel
        for i in range(len(x)):
            bg = grey if grey is not None else g[i].mean()
            ref_low = np.clip(gaussian_filter(g[i], 2.0, mode="constant", cval=bg), 0, 1)
            detail = g[i] - gaussian_filter(g[i], 1.0, mode="constant", cval=bg)
            ref_high = np.clip(detail + (bg - detail.mean()), 0, 1)
            np.testing.assert_allclose(low[i, 0].numpy(), ref_low, atol=2e-6)
            np.testing.assert_allclose(high[i, 0].numpy(), ref_high, atol=2e-6)


def test_contrast_and_limits():
    x = _batch(c=1)
    torch.testing.assert_close(distort(x, "contrast", 1.0), x)
    torch.testing.assert_close(distort(x, "contrast", 0.3), 0.35 + 0.3 * x)
    assert torch.allclose(distort(x, "contrast", 0.0), torch.full_like(x, 0.5))
    # stronger blur removes more detail: the per-image spread shrinks monotonically with sigma
    spreads = [distort(x, "low-pass", s).std(dim=(1, 2, 3)).mean().item() for s in LEVELS["low-pass"]]
    assert all(a > b for a, b in zip(spreads, spreads[1:]))
    for kind in LEVELS:
        for level in LEVELS[kind]:
            out = distort(_batch(), kind, level)
            assert out.min() >= 0 and out.max() <= 1


def test_bad_levels_are_rejected():
    with pytest.raises(ValueError, match="contrast"):
        check_level("contrast", 1.5)
    with pytest.raises(ValueError, match="sigma"):
        check_level("low-pass", 0)
    with pytest.raises(ValueError, match="unknown distortion"):
        distort(_batch(), "blur", 1.0)
