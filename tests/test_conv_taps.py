"""Which kernel taps read the image: the grouped patterns equal a position-by-position count."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from idap_onnx.conv_taps import mean_spread, tap_patterns, valid_energy


def _conv(k: int, s: int = 1, d: int = 1, pads=None, auto_pad: str | None = None):
    attrs = {"kernel_shape": [k, k], "strides": [s, s], "dilations": [d, d]}
    if auto_pad:
        attrs["auto_pad"] = auto_pad
    else:
        attrs["pads"] = pads if pads is not None else [0, 0, 0, 0]
    return helper.make_node("Conv", ["x", "w"], ["y"], **attrs)


def _by_position(h, w, k, s, d, top, left, oh, ow) -> np.ndarray:
    """``[positions, k*k]``: 1 where output (i, j)'s tap (a, b) reads the image."""
    rows = []
    for i in range(oh):
        for j in range(ow):
            y = i * s - top + np.arange(k)[:, None] * d
            x = j * s - left + np.arange(k)[None, :] * d
            rows.append(((y >= 0) & (y < h) & (x >= 0) & (x < w)).reshape(-1))
    return np.asarray(rows, dtype=np.float64)


CASES = [
    # (h, w, k, s, d, pads or auto_pad, top, left, out h, out w)
    (4, 4, 3, 1, 1, [1, 1, 1, 1], 1, 1, 4, 4),  # the digits CNN's residual block
    (8, 8, 3, 2, 1, [1, 1, 1, 1], 1, 1, 4, 4),  # its strided stem conv
    (7, 9, 5, 2, 1, [2, 1, 2, 1], 2, 1, 4, 4),  # uneven pads
    (10, 6, 3, 1, 2, [2, 2, 2, 2], 2, 2, 10, 6),  # dilation
    (7, 7, 3, 2, 1, "SAME_UPPER", 1, 1, 4, 4),
    (6, 6, 4, 1, 1, "SAME_LOWER", 2, 2, 6, 6),  # odd total pad: the extra one at the start
    (6, 6, 4, 1, 1, "SAME_UPPER", 1, 1, 6, 6),
]


@pytest.mark.parametrize(("h", "w", "k", "s", "d", "pads", "top", "left", "oh", "ow"), CASES)
def test_patterns_equal_the_count_position_by_position(h, w, k, s, d, pads, top, left, oh, ow):
    node = _conv(k, s, d, auto_pad=pads) if isinstance(pads, str) else _conv(k, s, d, pads)
    weight = np.random.default_rng(0).standard_normal((5, 3, k, k))
    taps = tap_patterns(node, [1, 3, h, w], weight.shape)
    masks = _by_position(h, w, k, s, d, top, left, oh, ow)
    assert taps.positions == oh * ow
    assert taps.padded
    np.testing.assert_array_equal(taps.valid, masks.sum(axis=0))
    m = np.einsum("oct,pt->pco", weight.reshape(5, 3, -1), masks)  # m_p(c), per output o
    spread = ((m - m.mean(axis=0)) ** 2).sum(axis=(0, 2))
    np.testing.assert_allclose(mean_spread(weight, taps), spread, rtol=1e-12)
    energy = np.einsum("oct,pt->c", weight.reshape(5, 3, -1) ** 2, masks)
    np.testing.assert_allclose(valid_energy(weight, taps), energy, rtol=1e-12)


def test_without_padding_every_output_reads_the_whole_kernel():
    weight = np.random.default_rng(1).standard_normal((4, 2, 3, 3))
    taps = tap_patterns(_conv(3, auto_pad="VALID"), [1, 2, 9, 9], weight.shape)
    assert not taps.padded
    assert taps.positions == 49
    np.testing.assert_array_equal(taps.cover, np.ones(9))
    np.testing.assert_allclose(mean_spread(weight, taps), 0.0, atol=1e-12)
    norms = (weight**2).sum(axis=(0, 2, 3))
    np.testing.assert_allclose(valid_energy(weight, taps), norms * 49)


def test_a_symbolic_image_size_gives_no_patterns():
    node = _conv(3, pads=[1, 1, 1, 1])
    assert tap_patterns(node, ["n", 3, "h", 8], (4, 3, 3, 3)) is None
    assert tap_patterns(node, None, (4, 3, 3, 3)) is None
    gemm = helper.make_node("Gemm", ["x", "w"], ["y"])
    assert tap_patterns(gemm, [1, 3, 8, 8], (4, 3, 3, 3)) is None


def test_large_images_keep_few_patterns():
    """The patterns do not grow with the image: (k + 1)^2 at most for a k x k kernel."""
    taps = tap_patterns(_conv(3, pads=[1, 1, 1, 1]), [1, 3, 224, 224], (8, 3, 3, 3))
    assert len(taps.counts) == 9
    assert taps.positions == 224 * 224
