"""Which kernel taps of a Conv read the image and which read its zero padding.

An output position ``p`` of a Conv sums its kernel taps ``t`` over the input positions
``p * s - pad_begin + t * d`` (per spatial axis); a tap whose position falls outside the input
reads a zero of the padding. Near the borders of a small feature map many outputs see only part
of the kernel (a 3x3 conv with padding 1 on a 4x4 map: 12 of its 16 outputs), which matters to
everything that assumes every output sums the whole kernel:

- mean compensation (``passes.compensate``): the mean ``mu`` of a removed input channel ``c``
  reaches output ``p`` as ``m_p = mu * sum_{t valid at p} W[:, c, t]``. The constant bias that
  replaces it best (least squares over the positions) is the average
  ``mbar = mu * sum_t W[:, c, t] * cover[t]``, ``cover[t]`` the fraction of outputs at which tap
  ``t`` is valid; it equals the whole-kernel sum when no tap ever reads padding;
- the flow-divergence score (``calib.scores``): what removing ``c`` changes in the output,
  summed over positions, counts only valid taps.

A grouped Conv whose inputs are pruned per group (ResNeSt's radix rows, ``oprules.conv_gemm``)
enters both as the group-1 Conv it equals (``dense_weight``: zeros where an output does not read
an input).

The valid-tap mask of an output position is a product of one mask per spatial axis, and along
an axis only the few outputs near a border differ from the interior, so the positions fall into
a handful of *patterns* (at most ``(k + 1)^2`` for a k x k kernel, whatever the image size):
``TapPatterns.masks[q]`` (``[Q, T]``, ``T = prod(kernel)``, the weight's flattened kernel
order) holds for ``counts[q]`` output positions.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from idap_onnx.graph import attr


@dataclass(frozen=True)
class TapPatterns:
    """Output positions of one sample grouped by which kernel taps they read from the image.

    ``masks`` ``[Q, T]`` (float 0/1), ``counts`` ``[Q]``; ``counts.sum()`` = output positions.
    """

    masks: np.ndarray
    counts: np.ndarray

    @property
    def positions(self) -> int:
        return int(self.counts.sum())

    @property
    def valid(self) -> np.ndarray:
        """``[T]``: at how many output positions each tap reads the image."""
        return self.counts @ self.masks

    @property
    def cover(self) -> np.ndarray:
        """``[T]``: the fraction of output positions at which each tap reads the image."""
        return self.valid / self.positions

    @property
    def padded(self) -> bool:
        """True when some output position reads padding with some tap."""
        return bool((self.masks < 1).any())


def same_pads(
    auto_pad: str, spatial: Sequence[int], kernel: Sequence[int], strides, dilations
) -> list[int]:
    """ONNX ``auto_pad`` SAME_UPPER / SAME_LOWER pads ``[begins..., ends...]``: output
    ``ceil(size / s)``, the odd pad at the end (UPPER) or the beginning (LOWER)."""
    begins, ends = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations, strict=True):
        out = -(-size // s)
        total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
        small, big = total // 2, total - total // 2
        begins.append(small if auto_pad == "SAME_UPPER" else big)
        ends.append(big if auto_pad == "SAME_UPPER" else small)
    return begins + ends


def explicit_pads(
    auto_pad: str | bytes,
    pads: Sequence[int] | None,
    spatial: Sequence[int],
    kernel: Sequence[int],
    strides,
    dilations,
) -> list[int]:
    """The explicit ``[begins..., ends...]`` pads that a Conv or pool's ``auto_pad`` and
    ``pads`` attributes give on an input of ``spatial`` size (``same_pads`` for SAME_*, zeros
    for VALID, else ``pads`` or zeros)."""
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return same_pads(auto_pad, spatial, kernel, strides, dilations)
    if auto_pad == "VALID" or not pads:
        return [0] * (2 * len(kernel))
    return list(pads)


def conv_pads(
    node: onnx.NodeProto, spatial: Sequence[int], kernel: Sequence[int], strides, dilations
) -> list[int]:
    """The explicit ``[begins..., ends...]`` pads of a Conv on an input of ``spatial`` size."""
    return explicit_pads(attr(node, "auto_pad", "NOTSET"), attr(node, "pads", None), spatial,
                         kernel, strides, dilations)


def tap_patterns(
    node: onnx.NodeProto, input_shape: Sequence | None, weight_shape: Sequence[int]
) -> TapPatterns | None:
    """The tap patterns of Conv ``node`` on an input ``[N, C, *spatial]``; None when the
    spatial size is not static (or the node is no Conv)."""
    if node.op_type != "Conv" or input_shape is None or len(input_shape) != len(weight_shape):
        return None
    spatial = list(input_shape[2:])
    if not spatial or not all(isinstance(d, int) and d > 0 for d in spatial):
        return None
    nsp = len(spatial)
    kernel = list(attr(node, "kernel_shape", None) or weight_shape[2:])
    strides = list(attr(node, "strides", None) or [1] * nsp)
    dilations = list(attr(node, "dilations", None) or [1] * nsp)
    pads = conv_pads(node, spatial, kernel, strides, dilations)
    axes = []  # per axis: (distinct masks [q, k], counts [q])
    for i, size in enumerate(spatial):
        k, s, d, begin = kernel[i], strides[i], dilations[i], pads[i]
        out = (size + pads[i] + pads[i + nsp] - (d * (k - 1) + 1)) // s + 1
        if out <= 0:
            return None
        pos = np.arange(out)[:, None] * s - begin + np.arange(k)[None, :] * d
        masks, counts = np.unique((pos >= 0) & (pos < size), axis=0, return_counts=True)
        axes.append((masks, counts))
    rows, counts = [], []
    for combo in itertools.product(*(range(len(c)) for _, c in axes)):
        mask = axes[0][0][combo[0]]
        for (masks, _), q in zip(axes[1:], combo[1:], strict=True):
            mask = np.multiply.outer(mask, masks[q])
        rows.append(np.asarray(mask, dtype=np.float64).reshape(-1))
        counts.append(math.prod(int(c[q]) for (_, c), q in zip(axes, combo, strict=True)))
    return TapPatterns(np.stack(rows), np.asarray(counts, dtype=np.float64))


def mean_spread(w: np.ndarray, taps: TapPatterns) -> np.ndarray:
    """``R[c] = sum_p ||m_p(c) - mbar(c)||^2`` for a Conv weight ``w`` ``[O, C, k...]``:
    ``m_p(c) = sum_{t valid at p} W[:, c, t]`` is what a unit mean in input channel ``c``
    adds to output ``p``, ``mbar(c)`` its average over positions (the compensating bias). Zero
    when no tap reads padding; times ``mu_c^2`` it is the output energy that mean compensation
    of ``c`` misses, per sample."""
    o, c = w.shape[:2]
    cols = w.reshape(o, c, -1).astype(np.float64)
    m = cols @ taps.masks.T  # [O, C, Q]
    mbar = (m @ taps.counts) / taps.positions  # [O, C]
    return (((m - mbar[..., None]) ** 2) @ taps.counts).sum(axis=0)


def valid_energy(w: np.ndarray, taps: TapPatterns) -> np.ndarray:
    """``V[c] = sum_p sum_{t valid at p} ||W[:, c, t]||^2`` for ``w`` ``[O, C, k...]``: the
    output energy per sample that a unit-variance input channel ``c``, uncorrelated across
    positions, contributes. ``||W[:, c]||^2 * positions`` when no tap reads padding."""
    o, c = w.shape[:2]
    cols = w.reshape(o, c, -1).astype(np.float64)
    return (cols**2).sum(axis=0) @ taps.valid


def dense_weight(w: np.ndarray, groups: int) -> np.ndarray:
    """The ``[O, I, k...]`` weight of the group-1 Conv equal to a Conv with ``groups`` groups
    and weight ``w`` ``[O, I / groups, k...]``: output block g reads input block g only."""
    if groups == 1:
        return w
    per_out, per_in = w.shape[0] // groups, w.shape[1]
    dense = np.zeros((w.shape[0], per_in * groups, *w.shape[2:]), dtype=w.dtype)
    for g in range(groups):
        rows, cols = slice(g * per_out, (g + 1) * per_out), slice(g * per_in, (g + 1) * per_in)
        dense[rows, cols] = w[rows]
    return dense
