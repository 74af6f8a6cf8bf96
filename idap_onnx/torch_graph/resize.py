"""ONNX ``Resize`` / ``Upsample`` as separable per-axis gathers (differentiable).

Each resized axis maps output coordinates to input coordinates with the node's
``coordinate_transformation_mode`` (computed in float32 like ONNX Runtime's CPU kernel), then:

* ``nearest``: one ``index_select`` with the ``nearest_mode`` rounding, clamped to the axis;
* ``linear``: two taps (clamped coordinate, ``floor`` and ``floor + 1``) blended by distance;
* ``cubic``: four taps with Keys' coefficients (``cubic_coeff_a``), ``exclude_outside``
  renormalising the in-range weights.

Interpolating axis by axis equals ONNX Runtime's bilinear/trilinear/bicubic kernels. Covered:
every coordinate mode (``half_pixel``, ``half_pixel_symmetric``, ``pytorch_half_pixel``,
``align_corners``, ``asymmetric``, ``tf_half_pixel_for_nn``, ``tf_crop_and_resize`` with
``extrapolation_value``), ``axes`` and ``keep_aspect_ratio_policy`` (opset 18). Not covered:
``antialias=1`` (declined by the op's check). Opset < 11 ``Upsample``/``Resize`` use the
legacy "simple" nearest rounding (``ceil`` when downsampling, ``floor`` otherwise).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

Tensor = torch.Tensor


def _coords(
    coord: str, out_len: int, in_len: int, scale: float, roi: tuple[float, float]
) -> np.ndarray:
    x = np.arange(out_len, dtype=np.float32)
    s = np.float32(scale)
    half = np.float32(0.5)
    if coord == "half_pixel":
        return (x + half) / s - half
    if coord == "half_pixel_symmetric":
        adjustment = np.float32(out_len) / (s * np.float32(in_len))
        center = np.float32(in_len) / np.float32(2)
        offset = center * (np.float32(1) - adjustment)
        return offset + (x + half) / s - half
    if coord == "pytorch_half_pixel":
        return (x + half) / s - half if out_len > 1 else np.zeros_like(x)
    if coord == "align_corners":
        if out_len == 1:
            return np.zeros_like(x)
        return x * np.float32(in_len - 1) / np.float32(out_len - 1)
    if coord == "asymmetric":
        return x / s
    if coord == "tf_half_pixel_for_nn":
        return (x + half) / s
    if coord == "tf_crop_and_resize":
        start, end = np.float32(roi[0]), np.float32(roi[1])
        if out_len > 1:
            return start * np.float32(in_len - 1) + (
                x * (end - start) * np.float32(in_len - 1)
            ) / np.float32(out_len - 1)
        return np.full_like(x, half * (start + end) * np.float32(in_len - 1))
    raise NotImplementedError(f"Resize coordinate_transformation_mode '{coord}'")


def _nearest(xo: np.ndarray, mode: str, downsampling: bool) -> np.ndarray:
    if mode == "round_prefer_floor":
        r = np.ceil(xo - 0.5)
    elif mode == "round_prefer_ceil":
        r = np.floor(xo + 0.5)
    elif mode == "floor":
        r = np.floor(xo)
    elif mode == "ceil":
        r = np.ceil(xo)
    elif mode == "simple":
        r = np.ceil(xo) if downsampling else np.trunc(xo)
    else:
        raise NotImplementedError(f"Resize nearest_mode '{mode}'")
    return r.astype(np.int64)


def _cubic_coeffs(s: np.ndarray, a: float) -> np.ndarray:
    a = np.float32(a)
    s = s.astype(np.float32)
    c0 = ((a * (s + 1) - 5 * a) * (s + 1) + 8 * a) * (s + 1) - 4 * a
    c1 = ((a + 2) * s - (a + 3)) * s * s + 1
    c2 = ((a + 2) * (1 - s) - (a + 3)) * (1 - s) * (1 - s) + 1
    c3 = ((a * (2 - s) - 5 * a) * (2 - s) + 8 * a) * (2 - s) - 4 * a
    return np.stack([c0, c1, c2, c3], axis=1)


def _apply_taps(t: Tensor, axis: int, idx: np.ndarray, w: np.ndarray) -> Tensor:
    """sum_k w[:, k] * t[idx[:, k]] along ``axis`` (``idx``/``w``: (out_len, taps))."""
    dev = t.device
    out_len, taps = idx.shape
    gathered = t.index_select(axis, torch.from_numpy(idx.reshape(-1)).to(dev))
    shape = list(t.shape)
    shape[axis : axis + 1] = [out_len, taps]
    gathered = gathered.reshape(shape)
    wshape = [1] * len(shape)
    wshape[axis], wshape[axis + 1] = out_len, taps
    weights = torch.from_numpy(w.astype(np.float32)).to(dev, t.dtype).reshape(wshape)
    return (gathered * weights).sum(axis + 1)


def _resize_axis(
    t: Tensor,
    axis: int,
    out_len: int,
    scale: float,
    roi: tuple[float, float],
    *,
    mode: str,
    coord: str,
    nearest_mode: str,
    cubic_a: float,
    exclude_outside: bool,
    extrapolation_value: float,
) -> Tensor:
    in_len = t.shape[axis]
    xo = _coords(coord, out_len, in_len, scale, roi)
    outside = None
    if coord == "tf_crop_and_resize":
        outside = (xo < 0) | (xo > in_len - 1)
    if mode == "nearest":
        i = np.clip(_nearest(xo, nearest_mode, scale < 1), 0, in_len - 1)
        y = t.index_select(axis, torch.from_numpy(i).to(t.device))
    elif mode == "linear":
        xc = np.clip(xo, 0, in_len - 1).astype(np.float32)
        i1 = np.minimum(xc.astype(np.int64), in_len - 1)
        i2 = np.minimum(i1 + 1, in_len - 1)
        d1 = np.abs(xc - i1.astype(np.float32))
        d2 = np.abs(xc - i2.astype(np.float32))
        same = i1 == i2
        d1[same], d2[same] = 0.5, 0.5
        y = _apply_taps(t, axis, np.stack([i1, i2], 1), np.stack([d2, d1], 1))
    elif mode == "cubic":
        base = np.floor(xo).astype(np.int64)
        w = _cubic_coeffs(xo - base.astype(np.float32), cubic_a)
        idx = base[:, None] + np.arange(-1, 3)[None, :]
        if exclude_outside:
            w = np.where((idx >= 0) & (idx < in_len), w, 0.0)
            w = w / w.sum(1, keepdims=True)
        y = _apply_taps(t, axis, np.clip(idx, 0, in_len - 1), w)
    else:
        raise NotImplementedError(f"Resize mode '{mode}'")
    if outside is not None and outside.any():
        shape = [1] * t.dim()
        shape[axis] = out_len
        mask = torch.from_numpy(outside).to(t.device).reshape(shape)
        y = torch.where(mask, torch.full_like(y, extrapolation_value), y)
    return y


def resize(
    t: Tensor,
    *,
    scales: Sequence[float] | None = None,
    sizes: Sequence[int] | None = None,
    roi: Sequence[float] | None = None,
    axes: Sequence[int] | None = None,
    mode: str = "nearest",
    coord: str = "half_pixel",
    nearest_mode: str = "round_prefer_floor",
    cubic_a: float = -0.75,
    exclude_outside: bool = False,
    extrapolation_value: float = 0.0,
    keep_aspect_ratio_policy: str = "stretch",
) -> Tensor:
    """Resizes ``t`` like ONNX ``Resize`` (see the module docstring for what is covered)."""
    rank = t.dim()
    axes = [a + rank if a < 0 else a for a in axes] if axes else list(range(rank))
    in_shape = [t.shape[a] for a in axes]
    n = len(axes)
    roi_pairs = [(0.0, 1.0)] * n
    if roi is not None and len(roi) == 2 * n:
        roi_pairs = [(float(roi[i]), float(roi[i + n])) for i in range(n)]
    if sizes is not None:
        sizes = [int(s) for s in sizes]
        if keep_aspect_ratio_policy != "stretch":
            ratios = [s / i for s, i in zip(sizes, in_shape, strict=True)]
            r = min(ratios) if keep_aspect_ratio_policy == "not_larger" else max(ratios)
            sizes = [int(math.floor(r * i + 0.5)) for i in in_shape]
            scale_list = [r] * n
        else:
            scale_list = [s / i for s, i in zip(sizes, in_shape, strict=True)]
        out_shape = sizes
    elif scales is not None:
        scale_list = [float(s) for s in scales]
        out_shape = [
            int(np.floor(np.float32(i) * np.float32(e - b) * np.float32(s)))
            if coord == "tf_crop_and_resize"
            else int(np.floor(np.float32(i) * np.float32(s)))
            for i, s, (b, e) in zip(in_shape, scale_list, roi_pairs, strict=True)
        ]
    else:
        raise ValueError("Resize needs scales or sizes")
    mode = {"bilinear": "linear", "trilinear": "linear", "bicubic": "cubic"}.get(mode, mode)
    for a, out_len, scale, r in zip(axes, out_shape, scale_list, roi_pairs, strict=True):
        if out_len == t.shape[a] and scale == 1.0 and coord != "tf_crop_and_resize":
            continue
        t = _resize_axis(
            t,
            a,
            out_len,
            scale,
            r,
            mode=mode,
            coord=coord,
            nearest_mode=nearest_mode,
            cubic_a=cubic_a,
            exclude_outside=exclude_outside,
            extrapolation_value=extrapolation_value,
        )
    return t
