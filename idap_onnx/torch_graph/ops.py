"""Torch implementations of ONNX operators, one function per ``op_type``.

Every implementation has the signature ``fn(node, rt, x) -> Tensor | tuple``: ``node`` is the
prepared :class:`Node` (attributes already decoded, the model's default-domain opset, host
copies of small constant inputs), ``rt`` the per-forward :class:`Runtime` (training flag,
device) and ``x`` the list of input tensors (``None`` for omitted optional inputs). A tuple
result gives the node's outputs in order; a tensor is its only output.

:data:`OPS` maps ``op_type`` to an :class:`OpDef` that also says which inputs are *data*
(differentiable, so a float initializer feeding them becomes an ``nn.Parameter``) and which are
*weights* (a parameter even when it holds a single value), plus an optional ``check`` that
declines attribute combinations the implementation does not cover.

Semantics follow the ONNX operator specification at opsets 7..25 (attributes that became
inputs are read from wherever the node's opset puts them); where the specification leaves
room, they follow ONNX Runtime's CPU kernels (Resize coordinates, pooling windows in
``ceil_mode``, integer ``Div`` truncation).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from idap_onnx.conv_taps import explicit_pads
from idap_onnx.torch_graph.resize import resize

Tensor = torch.Tensor

#: ONNX ``TensorProto.DataType`` -> torch dtype (the types an executor can hold; the unsigned
#: 16/32/64-bit types need torch >= 2.3).
ONNX_TO_TORCH: dict[int, torch.dtype] = {
    code: getattr(torch, name)
    for code, name in [
        (1, "float32"),
        (2, "uint8"),
        (3, "int8"),
        (4, "uint16"),
        (5, "int16"),
        (6, "int32"),
        (7, "int64"),
        (9, "bool"),
        (10, "float16"),
        (11, "float64"),
        (12, "uint32"),
        (13, "uint64"),
        (16, "bfloat16"),
    ]
    if hasattr(torch, name)
}


@dataclass
class Node:
    """A graph node prepared for execution."""

    op_type: str
    name: str
    opset: int
    attrs: dict[str, Any]
    inputs: list[str]
    outputs: list[str]
    fn: Callable[..., Any] | None = None
    #: Host (numpy) copies of small constant (initializer) inputs, by input index.
    const: dict[int, np.ndarray] = field(default_factory=dict)

    def attr(self, key: str, default: Any = None) -> Any:
        return self.attrs.get(key, default)

    def wants(self, i: int) -> bool:
        """Whether output ``i`` exists and is named (optional outputs may be omitted)."""
        return i < len(self.outputs) and bool(self.outputs[i])


@dataclass
class Runtime:
    """State of one forward pass."""

    training: bool
    device: torch.device
    #: The module's BatchNormalization running-statistics buffers by ONNX name (updated in
    #: place in training mode).
    bn_buffers: dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class OpDef:
    fn: Callable[..., Any]
    #: Input indices that are not data (shapes, indices, axes, running statistics ...).
    non_data: frozenset[int] | Callable[[int], frozenset[int]] = frozenset()
    #: Input indices whose float initializers are parameters whatever their size.
    weights: frozenset[int] = frozenset()
    #: ``check(onnx_node, attrs, opset) -> reason or None``: declines what ``fn`` cannot do.
    check: Callable[[Any, dict[str, Any], int], str | None] | None = None

    def non_data_at(self, opset: int) -> frozenset[int]:
        return self.non_data(opset) if callable(self.non_data) else self.non_data


OPS: dict[str, OpDef] = {}

_ALL = frozenset(range(64))


def _op(*names: str, non_data=frozenset(), weights=frozenset(), check=None):
    def register(fn):
        for name in names:
            OPS[name] = OpDef(
                fn,
                frozenset(non_data) if not callable(non_data) else non_data,
                frozenset(weights),
                check,
            )
        return fn

    return register


# ------------------------------------------------------------------------------------ helpers


def _get(x: Sequence[Tensor | None], i: int) -> Tensor | None:
    return x[i] if i < len(x) else None


def ints(node: Node, x: Sequence[Tensor | None], i: int) -> list[int] | None:
    """Input ``i`` as a list of python ints (``None`` when omitted); constants avoid a sync."""
    const = node.const.get(i)
    if const is not None:
        return [int(v) for v in const.reshape(-1).tolist()]
    t = _get(x, i)
    if t is None:
        return None
    return [int(v) for v in t.reshape(-1).tolist()]


def floats(node: Node, x: Sequence[Tensor | None], i: int) -> list[float] | None:
    const = node.const.get(i)
    if const is not None:
        return [float(v) for v in const.reshape(-1).tolist()]
    t = _get(x, i)
    if t is None:
        return None
    return [float(v) for v in t.reshape(-1).tolist()]


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _is_float(t: Tensor) -> bool:
    return t.is_floating_point()


def _bshape(t: Tensor, axis: int, rank: int) -> Tensor:
    """Reshapes 1-D ``t`` to broadcast along ``axis`` of a rank-``rank`` tensor."""
    shape = [1] * rank
    shape[axis] = -1
    return t.reshape(shape)


# ------------------------------------------------------------------------------- elementwise


def _unary(fn):
    return lambda node, rt, x: fn(x[0])


_UNARY: dict[str, Callable[[Tensor], Tensor]] = {
    "Identity": lambda t: t,
    "Neg": torch.neg,
    "Abs": torch.abs,
    "Exp": torch.exp,
    "Log": torch.log,
    "Sqrt": torch.sqrt,
    "Reciprocal": torch.reciprocal,
    "Erf": torch.erf,
    "Tanh": torch.tanh,
    "Sigmoid": torch.sigmoid,
    "Relu": torch.relu,
    "Sin": torch.sin,
    "Cos": torch.cos,
    "Tan": torch.tan,
    "Asin": torch.asin,
    "Acos": torch.acos,
    "Atan": torch.atan,
    "Sinh": torch.sinh,
    "Cosh": torch.cosh,
    "Asinh": torch.asinh,
    "Acosh": torch.acosh,
    "Atanh": torch.atanh,
    "Softsign": F.softsign,
    "Mish": F.mish,
}
for _name, _fn in _UNARY.items():
    OPS[_name] = OpDef(_unary(_fn))

# Ops whose gradient is zero or undefined: their constant inputs are never parameters.
_NON_DIFF_UNARY: dict[str, Callable[[Tensor], Tensor]] = {
    "Floor": torch.floor,
    "Ceil": torch.ceil,
    "Round": torch.round,  # half to even, like ONNX
    "Sign": torch.sign,
    "Not": torch.logical_not,
    "IsNaN": torch.isnan,
}
for _name, _fn in _NON_DIFF_UNARY.items():
    OPS[_name] = OpDef(_unary(_fn), non_data=_ALL)


@_op("IsInf", non_data=_ALL)
def _isinf(node, rt, x):
    t = x[0]
    neg, pos = node.attr("detect_negative", 1), node.attr("detect_positive", 1)
    if neg and pos:
        return torch.isinf(t)
    if pos:
        return torch.isposinf(t)
    if neg:
        return torch.isneginf(t)
    return torch.zeros_like(t, dtype=torch.bool)


@_op("Add")
def _add(node, rt, x):
    return x[0] + x[1]


@_op("Sub")
def _sub(node, rt, x):
    return x[0] - x[1]


@_op("Mul")
def _mul(node, rt, x):
    return x[0] * x[1]


@_op("Div")
def _div(node, rt, x):
    a, b = x
    if _is_float(a):
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


@_op("Pow", non_data={1})
def _pow(node, rt, x):
    a, b = x
    y = torch.pow(a, b)
    return y if y.dtype == a.dtype else y.to(a.dtype)


@_op("Mod", non_data=_ALL)
def _mod(node, rt, x):
    a, b = x
    if node.attr("fmod", 0):
        return torch.fmod(a, b)
    return torch.remainder(a, b)


@_op("BitShift", non_data=_ALL)
def _bitshift(node, rt, x):
    if node.attr("direction") == "LEFT":
        return torch.bitwise_left_shift(x[0], x[1])
    return torch.bitwise_right_shift(x[0], x[1])


def _variadic(fn):
    def run(node, rt, x):
        out = x[0]
        for t in x[1:]:
            out = fn(out, t)
        return out

    return run


OPS["Max"] = OpDef(_variadic(torch.maximum))
OPS["Min"] = OpDef(_variadic(torch.minimum))
OPS["Sum"] = OpDef(_variadic(torch.add))


@_op("Mean")
def _mean(node, rt, x):
    return _variadic(torch.add)(node, rt, x) / len(x)


_COMPARE = {
    "Equal": torch.eq,
    "Less": torch.lt,
    "Greater": torch.gt,
    "LessOrEqual": torch.le,
    "GreaterOrEqual": torch.ge,
    "And": torch.logical_and,
    "Or": torch.logical_or,
    "Xor": torch.logical_xor,
    "BitwiseAnd": torch.bitwise_and,
    "BitwiseOr": torch.bitwise_or,
    "BitwiseXor": torch.bitwise_xor,
}
for _name, _fn in _COMPARE.items():
    OPS[_name] = OpDef((lambda f: lambda node, rt, x: f(x[0], x[1]))(_fn), non_data=_ALL)
OPS["BitwiseNot"] = OpDef(_unary(torch.bitwise_not), non_data=_ALL)


@_op("Where", non_data={0})
def _where(node, rt, x):
    return torch.where(x[0].bool(), x[1], x[2])


# -------------------------------------------------------------------------------- activations


@_op("LeakyRelu")
def _leaky_relu(node, rt, x):
    return F.leaky_relu(x[0], node.attr("alpha", 0.01))


@_op("PRelu", weights={1})
def _prelu(node, rt, x):
    t, slope = x
    return torch.where(t < 0, t * slope, t)


@_op("Elu")
def _elu(node, rt, x):
    return F.elu(x[0], node.attr("alpha", 1.0))


@_op("Celu")
def _celu(node, rt, x):
    return F.celu(x[0], node.attr("alpha", 1.0))


@_op("Selu")
def _selu(node, rt, x):
    alpha = node.attr("alpha", 1.67326319217681884765625)
    gamma = node.attr("gamma", 1.05070102214813232421875)
    t = x[0]
    return gamma * torch.where(t > 0, t, alpha * (torch.exp(t) - 1))


@_op("ThresholdedRelu")
def _thresholded_relu(node, rt, x):
    t = x[0]
    return torch.where(t > node.attr("alpha", 1.0), t, torch.zeros_like(t))


@_op("Shrink")
def _shrink(node, rt, x):
    t = x[0]
    lambd, bias = node.attr("lambd", 0.5), node.attr("bias", 0.0)
    zero = torch.zeros_like(t)
    return torch.where(t < -lambd, t + bias, torch.where(t > lambd, t - bias, zero))


@_op("Gelu")
def _gelu(node, rt, x):
    return F.gelu(x[0], approximate=node.attr("approximate", "none"))


@_op("Softplus")
def _softplus(node, rt, x):
    return F.softplus(x[0])


@_op("HardSigmoid")
def _hard_sigmoid(node, rt, x):
    alpha, beta = node.attr("alpha", 0.2), node.attr("beta", 0.5)
    return torch.clamp(x[0] * alpha + beta, 0.0, 1.0)


@_op("HardSwish")
def _hard_swish(node, rt, x):
    return F.hardswish(x[0])


@_op("Clip", non_data={1, 2})
def _clip(node, rt, x):
    t = x[0]
    if node.opset < 11:
        lo, hi = node.attr("min"), node.attr("max")
    else:
        lo, hi = _get(x, 1), _get(x, 2)
        lo = floats(node, x, 1)[0] if lo is not None else None
        hi = floats(node, x, 2)[0] if hi is not None else None
        if not _is_float(t):
            lo = int(lo) if lo is not None else None
            hi = int(hi) if hi is not None else None
    if lo is None and hi is None:
        return t
    return torch.clamp(t, lo, hi)


def _softmax_like(fn):
    def run(node, rt, x):
        t = x[0]
        if node.opset >= 13:
            return fn(t, _axis(node.attr("axis", -1), t.dim()))
        axis = _axis(node.attr("axis", 1), t.dim())
        shape = t.shape
        flat = t.reshape(math.prod(shape[:axis]), math.prod(shape[axis:]))
        return fn(flat, 1).reshape(shape)

    return run


OPS["Softmax"] = OpDef(_softmax_like(lambda t, d: torch.softmax(t, d)))
OPS["LogSoftmax"] = OpDef(_softmax_like(lambda t, d: torch.log_softmax(t, d)))


def _hardmax(t: Tensor, dim: int) -> Tensor:
    idx = t.argmax(dim, keepdim=True)
    return torch.zeros_like(t).scatter(dim, idx, 1.0)


OPS["Hardmax"] = OpDef(_softmax_like(_hardmax), non_data=_ALL)


@_op("Dropout", non_data={1, 2})
def _dropout(node, rt, x):
    t = x[0]
    if node.opset < 12:
        ratio = node.attr("ratio", 0.5)
    else:
        r = floats(node, x, 1)
        ratio = r[0] if r else 0.5
    if not rt.training or ratio == 0.0:
        if node.wants(1):
            return t, torch.ones_like(t, dtype=torch.bool)
        return t
    keep = torch.rand_like(t) >= ratio
    y = t * keep / (1.0 - ratio)
    return (y, keep) if node.wants(1) else y


# ------------------------------------------------------------------------------ linear algebra


@_op("MatMul", weights={0, 1})
def _matmul(node, rt, x):
    return torch.matmul(x[0], x[1])


@_op("Gemm", weights={0, 1, 2})
def _gemm(node, rt, x):
    a, b = x[0], x[1]
    c = _get(x, 2)
    if node.attr("transA", 0):
        a = a.t()
    if node.attr("transB", 0):
        b = b.t()
    alpha, beta = node.attr("alpha", 1.0), node.attr("beta", 1.0)
    y = a @ b
    if alpha != 1.0:
        y = y * alpha
    if c is not None:
        y = y + (c if beta == 1.0 else c * beta)
    return y


@_op("Einsum", weights=_ALL)
def _einsum(node, rt, x):
    return torch.einsum(node.attr("equation"), *x)


def _conv_pads(node: Node, t: Tensor, kernel, strides, dilations) -> list[int]:
    return explicit_pads(node.attr("auto_pad", "NOTSET"), node.attr("pads"),
                         list(t.shape[2:]), kernel, strides, dilations)


def _torch_pad(pads: Sequence[int]) -> list[int]:
    """ONNX ``[b1, b2, .., e1, e2, ..]`` over trailing dims -> F.pad's last-dim-first order."""
    n = len(pads) // 2
    out: list[int] = []
    for i in reversed(range(n)):
        out += [pads[i], pads[i + n]]
    return out


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


@_op("Conv", weights={1, 2})
def _conv(node, rt, x):
    t, w = x[0], x[1]
    b = _get(x, 2)
    nsp = w.dim() - 2
    kernel = list(w.shape[2:])
    strides = list(node.attr("strides", [1] * nsp))
    dilations = list(node.attr("dilations", [1] * nsp))
    pads = _conv_pads(node, t, kernel, strides, dilations)
    group = node.attr("group", 1)
    if pads[:nsp] == pads[nsp:]:
        padding = pads[:nsp]
    else:
        t = F.pad(t, _torch_pad(pads))
        padding = [0] * nsp
    return _CONV[nsp](t, w, b, strides, padding, dilations, group)


@_op("ConvTranspose", weights={1, 2})
def _conv_transpose(node, rt, x):
    t, w = x[0], x[1]
    b = _get(x, 2)
    nsp = w.dim() - 2
    group = node.attr("group", 1)
    kernel = list(w.shape[2:])
    strides = list(node.attr("strides", [1] * nsp))
    dilations = list(node.attr("dilations", [1] * nsp))
    out_pad = list(node.attr("output_padding", [0] * nsp))
    spatial = list(t.shape[2:])
    auto_pad = node.attr("auto_pad", "NOTSET")
    output_shape = node.attr("output_shape")
    full = [
        s * (n - 1) + op + (k - 1) * d + 1
        for n, s, op, k, d in zip(spatial, strides, out_pad, kernel, dilations, strict=True)
    ]
    if output_shape is not None or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        if output_shape is None:
            target = [n * s for n, s in zip(spatial, strides, strict=True)]
        else:
            target = list(output_shape)[-nsp:]
        begins, ends = [], []
        for f, o in zip(full, target, strict=True):
            total = f - o
            if auto_pad == "SAME_UPPER":
                begins.append(total // 2)
                ends.append(total - total // 2)
            else:
                begins.append(total - total // 2)
                ends.append(total // 2)
        pads = begins + ends
    elif auto_pad == "VALID":
        pads = [0] * (2 * nsp)
    else:
        pads = list(node.attr("pads", [0] * (2 * nsp)))
    symmetric = pads[:nsp] == pads[nsp:]
    if symmetric and all(
        op < max(s, d) for op, s, d in zip(out_pad, strides, dilations, strict=True)
    ):
        return _CONV_T[nsp](t, w, b, strides, pads[:nsp], out_pad, group, dilations)
    y = _CONV_T[nsp](t, w, None, strides, 0, 0, group, dilations)
    # Crop the pads (negative F.pad) and add output_padding zeros at the end of each axis.
    crop = [-p for p in pads[:nsp]] + [op - p for op, p in zip(out_pad, pads[nsp:], strict=True)]
    y = F.pad(y, _torch_pad(crop))
    if b is not None:
        y = y + _bshape(b, 1, y.dim())
    return y


# ------------------------------------------------------------------------------ normalization


@_op("BatchNormalization", non_data={3, 4}, weights={1, 2})
def _batch_norm(node, rt, x):
    t, scale, bias, mean, var = x[:5]
    eps = node.attr("epsilon", 1e-5)
    if not rt.training:
        y = F.batch_norm(t, mean, var, scale, bias, False, 0.0, eps)
        if node.wants(1) or node.wants(2):
            return y, mean, var
        return y
    momentum = 1.0 - node.attr("momentum", 0.9)
    # Initializer statistics are the module's buffers (updated in place); computed ones are
    # copied so that the graph's tensors are never modified.
    if rt.bn_buffers.get(node.inputs[3]) is not mean:
        mean = mean.detach().clone()
    if rt.bn_buffers.get(node.inputs[4]) is not var:
        var = var.detach().clone()
    y = F.batch_norm(t, mean, var, scale, bias, True, momentum, eps)
    if node.wants(1) or node.wants(2):
        return y, mean, var
    return y


@_op("InstanceNormalization", weights={1, 2})
def _instance_norm(node, rt, x):
    return F.instance_norm(x[0], weight=x[1], bias=x[2], eps=node.attr("epsilon", 1e-5))


@_op("LayerNormalization", weights={1, 2})
def _layer_norm(node, rt, x):
    t, scale = x[0], x[1]
    bias = _get(x, 2)
    eps = node.attr("epsilon", 1e-5)
    axis = _axis(node.attr("axis", -1), t.dim())
    norm_shape = tuple(t.shape[axis:])
    if (
        not (node.wants(1) or node.wants(2))
        and tuple(scale.shape) == norm_shape
        and (bias is None or tuple(bias.shape) == norm_shape)
    ):
        return F.layer_norm(t, norm_shape, scale, bias, eps)
    dims = tuple(range(axis, t.dim()))
    mean = t.mean(dims, keepdim=True)
    var = (t - mean).square().mean(dims, keepdim=True)
    inv_std = torch.rsqrt(var + eps)
    y = (t - mean) * inv_std * scale
    if bias is not None:
        y = y + bias
    return y, mean, inv_std


@_op("GroupNormalization", weights={1, 2})
def _group_norm(node, rt, x):
    t, scale, bias = x[0], x[1], x[2]
    groups = node.attr("num_groups")
    eps = node.attr("epsilon", 1e-5)
    channels = t.shape[1]
    if scale.numel() != channels:  # opset 18: one scale and bias per group
        scale = scale.repeat_interleave(channels // groups)
        bias = bias.repeat_interleave(channels // groups)
    return F.group_norm(t, groups, scale, bias, eps)


@_op("LpNormalization")
def _lp_normalization(node, rt, x):
    t = x[0]
    p = node.attr("p", 2)
    norm = torch.linalg.vector_norm(t, p, dim=node.attr("axis", -1), keepdim=True)
    return t / norm


@_op("LRN")
def _lrn(node, rt, x):
    t = x[0]
    size = node.attr("size")
    alpha, beta, bias = node.attr("alpha", 1e-4), node.attr("beta", 0.75), node.attr("bias", 1.0)
    sq = t.square()
    lo, hi = (size - 1) // 2, size - 1 - (size - 1) // 2
    pad = [0, 0] * (t.dim() - 2) + [lo, hi]
    padded = F.pad(sq, pad)
    channels = t.shape[1]
    total = sum(padded.narrow(1, o, channels) for o in range(size))
    return t / (bias + alpha / size * total) ** beta


# ------------------------------------------------------------------------------ reductions


def _reduce_axes(node: Node, x, rank: int, input_from: int) -> list[int] | None:
    """The reduced axes, or ``None`` for "no-op" (``noop_with_empty_axes`` and no axes)."""
    if node.opset >= input_from:
        axes = ints(node, x, 1)
        if not axes:
            if node.attr("noop_with_empty_axes", 0):
                return None
            return list(range(rank))
    else:
        axes = node.attr("axes")
        if axes is None:
            return list(range(rank))
    return sorted({_axis(a, rank) for a in axes})


def _reduction(fn, input_from: int = 18):
    def run(node, rt, x):
        t = x[0]
        dims = _reduce_axes(node, x, t.dim(), input_from)
        if dims is None:
            return t
        keep = bool(node.attr("keepdims", 1))
        if not dims:
            return t
        return fn(t, dims, keep)

    return run


def _reduce_prod(t: Tensor, dims: list[int], keep: bool) -> Tensor:
    for d in dims:
        t = t.prod(d, keepdim=True)
    return t if keep else t.squeeze(dims)


_REDUCE = {
    "ReduceMean": lambda t, d, k: t.mean(d, keepdim=k),
    "ReduceMax": lambda t, d, k: t.amax(d, keepdim=k),
    "ReduceMin": lambda t, d, k: t.amin(d, keepdim=k),
    "ReduceProd": _reduce_prod,
    "ReduceL1": lambda t, d, k: t.abs().sum(d, keepdim=k),
    "ReduceL2": lambda t, d, k: torch.linalg.vector_norm(t, 2, d, keepdim=k),
    "ReduceLogSum": lambda t, d, k: t.sum(d, keepdim=k).log(),
    "ReduceLogSumExp": lambda t, d, k: torch.logsumexp(t, d, keepdim=k),
    "ReduceSumSquare": lambda t, d, k: t.square().sum(d, keepdim=k),
}
for _name, _fn in _REDUCE.items():
    OPS[_name] = OpDef(_reduction(_fn), non_data=frozenset({1}))
OPS["ReduceSum"] = OpDef(
    _reduction(lambda t, d, k: t.sum(d, keepdim=k), input_from=13), non_data=frozenset({1})
)


def _arg(fn):
    def run(node, rt, x):
        t = x[0]
        axis = _axis(node.attr("axis", 0), t.dim())
        keep = bool(node.attr("keepdims", 1))
        if node.attr("select_last_index", 0):
            idx = fn(t.flip(axis), axis, keep)
            return t.shape[axis] - 1 - idx
        return fn(t, axis, keep)

    return run


OPS["ArgMax"] = OpDef(_arg(lambda t, a, k: t.argmax(a, keepdim=k)), non_data=_ALL)
OPS["ArgMin"] = OpDef(_arg(lambda t, a, k: t.argmin(a, keepdim=k)), non_data=_ALL)


@_op("TopK", non_data={1})
def _topk(node, rt, x):
    t = x[0]
    k = node.attr("k") if node.opset < 10 else ints(node, x, 1)[0]
    axis = _axis(node.attr("axis", -1), t.dim())
    largest = bool(node.attr("largest", 1))
    values, indices = torch.topk(t, k, axis, largest=largest, sorted=True)
    return values, indices


@_op("CumSum", non_data={1})
def _cumsum(node, rt, x):
    t = x[0]
    axis = _axis(ints(node, x, 1)[0], t.dim())
    reverse, exclusive = node.attr("reverse", 0), node.attr("exclusive", 0)
    if reverse:
        t = t.flip(axis)
    y = t.cumsum(axis)
    if exclusive:
        y = y - t
    return y.flip(axis) if reverse else y


# ---------------------------------------------------------------------------------- pooling


@_op("GlobalAveragePool")
def _global_avg_pool(node, rt, x):
    t = x[0]
    return t.mean(tuple(range(2, t.dim())), keepdim=True)


@_op("GlobalMaxPool")
def _global_max_pool(node, rt, x):
    t = x[0]
    return t.amax(tuple(range(2, t.dim())), keepdim=True)


def _pool_geometry(node: Node, t: Tensor):
    kernel = list(node.attr("kernel_shape"))
    nsp = len(kernel)
    strides = list(node.attr("strides", [1] * nsp))
    dilations = list(node.attr("dilations", [1] * nsp))
    pads = _conv_pads(node, t, kernel, strides, dilations)
    ceil_mode = bool(node.attr("ceil_mode", 0))
    spatial = list(t.shape[2:])
    out = []
    for i in range(nsp):
        eff = (kernel[i] - 1) * dilations[i] + 1
        span = spatial[i] + pads[i] + pads[i + nsp] - eff
        n = (-(-span // strides[i]) if ceil_mode else span // strides[i]) + 1
        # A window may not start in the end padding (ONNX >= 19, ONNX Runtime, torch).
        if ceil_mode and (n - 1) * strides[i] >= spatial[i] + pads[i]:
            n -= 1
        out.append(n)
    return kernel, strides, dilations, pads, ceil_mode, out


def _narrow_to(y: Tensor, sizes: Sequence[int]) -> Tensor:
    for i, n in enumerate(sizes):
        if y.shape[2 + i] > n:
            y = y.narrow(2 + i, 0, n)
    return y


_MAXPOOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVGPOOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _check_maxpool(onnx_node, attrs, opset):
    if len(onnx_node.output) > 1 and onnx_node.output[1]:
        return "Indices output"
    return None


@_op("MaxPool", check=_check_maxpool)
def _max_pool(node, rt, x):
    t = x[0]
    kernel, strides, dilations, pads, ceil_mode, out = _pool_geometry(node, t)
    nsp = len(kernel)
    half = [((k - 1) * d + 1) // 2 for k, d in zip(kernel, dilations, strict=True)]
    if pads[:nsp] == pads[nsp:] and all(p <= h for p, h in zip(pads, half, strict=False)):
        y = _MAXPOOL[nsp](t, kernel, strides, pads[:nsp], dilations, ceil_mode)
    else:
        fill = float("-inf") if _is_float(t) else torch.iinfo(t.dtype).min
        t = F.pad(t, _torch_pad(pads), value=fill)
        y = _MAXPOOL[nsp](t, kernel, strides, 0, dilations, ceil_mode)
    return _narrow_to(y, out)


def _check_avgpool(onnx_node, attrs, opset):
    if any(d != 1 for d in attrs.get("dilations", [])):
        return "dilations"
    return None


def _sum_pool(t: Tensor, kernel, strides, ceil_mode: bool) -> Tensor:
    nsp = len(kernel)
    if nsp == 1:
        t = t.unsqueeze(-2)
        y = F.avg_pool2d(t, [1, *kernel], [1, *strides], 0, ceil_mode, True, 1)
        return y.squeeze(-2)
    return _AVGPOOL[nsp](t, kernel, strides, 0, ceil_mode, True, 1)


@_op("AveragePool", check=_check_avgpool)
def _avg_pool(node, rt, x):
    t = x[0]
    kernel, strides, _, pads, ceil_mode, out = _pool_geometry(node, t)
    nsp = len(kernel)
    include_pad = bool(node.attr("count_include_pad", 0))
    if (
        not ceil_mode
        and pads[:nsp] == pads[nsp:]
        and all(p <= k // 2 for p, k in zip(pads, kernel, strict=False))
    ):
        return _AVGPOOL[nsp](t, kernel, strides, pads[:nsp], False, include_pad)
    # General case: sum over the window / number of counted positions in the window.
    tp = _torch_pad(pads)
    total = _sum_pool(F.pad(t, tp), kernel, strides, ceil_mode)
    ones = torch.ones((1, 1, *t.shape[2:]), dtype=t.dtype, device=t.device)
    mask = F.pad(ones, tp, value=1.0 if include_pad else 0.0)
    count = _sum_pool(mask, kernel, strides, ceil_mode)
    return _narrow_to(total / count, out)


@_op("LpPool")
def _lp_pool(node, rt, x):
    t = x[0]
    kernel, strides, _, pads, ceil_mode, out = _pool_geometry(node, t)
    p = node.attr("p", 2)
    total = _sum_pool(F.pad(t.abs() ** p, _torch_pad(pads)), kernel, strides, ceil_mode)
    return _narrow_to(total ** (1.0 / p), out)


# ------------------------------------------------------------------------------- movement


@_op("Flatten")
def _flatten(node, rt, x):
    t = x[0]
    axis = _axis(node.attr("axis", 1), t.dim())
    return t.reshape(math.prod(t.shape[:axis]), math.prod(t.shape[axis:]))


@_op("Reshape", non_data={1})
def _reshape(node, rt, x):
    t = x[0]
    shape = ints(node, x, 1) if node.opset >= 5 else list(node.attr("shape"))
    if not node.attr("allowzero", 0):
        shape = [t.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return t.reshape(shape)


@_op("Transpose")
def _transpose(node, rt, x):
    t = x[0]
    perm = node.attr("perm")
    if perm is None:
        perm = list(reversed(range(t.dim())))
    return t.permute(*perm)


@_op("Squeeze", non_data={1})
def _squeeze(node, rt, x):
    t = x[0]
    axes = ints(node, x, 1) if node.opset >= 13 else node.attr("axes")
    if axes is None:
        return t.squeeze()
    if not axes:
        return t
    return t.squeeze(tuple(_axis(a, t.dim()) for a in axes))


@_op("Unsqueeze", non_data={1})
def _unsqueeze(node, rt, x):
    t = x[0]
    axes = ints(node, x, 1) if node.opset >= 13 else list(node.attr("axes"))
    rank = t.dim() + len(axes)
    for a in sorted(_axis(a, rank) for a in axes):
        t = t.unsqueeze(a)
    return t


@_op("Concat")
def _concat(node, rt, x):
    tensors = [t for t in x if t is not None]
    axis = node.attr("axis")
    rank = max(t.dim() for t in tensors)
    return torch.cat(tensors, _axis(axis, rank))


@_op("Split", non_data={1})
def _split(node, rt, x):
    t = x[0]
    axis = _axis(node.attr("axis", 0), t.dim())
    split = ints(node, x, 1) if node.opset >= 13 else node.attr("split")
    if not split:
        n = len(node.outputs)
        size = -(-t.shape[axis] // n)
        return tuple(torch.split(t, size, axis))
    return tuple(torch.split(t, list(split), axis))


def _slice_axis(t: Tensor, axis: int, start: int, end: int, step: int) -> Tensor:
    dim = t.shape[axis]
    if start < 0:
        start += dim
    if end < 0:
        end += dim
    if step > 0:
        start, end = min(max(start, 0), dim), min(max(end, 0), dim)
        if step == 1:
            return t.narrow(axis, start, max(end - start, 0))
        return t.narrow(axis, start, max(end - start, 0))[
            (slice(None),) * axis + (slice(None, None, step),)
        ]
    start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
    idx = list(range(start, end, step))
    return t.index_select(axis, torch.tensor(idx, dtype=torch.long, device=t.device))


@_op("Slice", non_data={1, 2, 3, 4})
def _slice(node, rt, x):
    t = x[0]
    if node.opset < 10:
        starts, ends = list(node.attr("starts")), list(node.attr("ends"))
        axes = node.attr("axes")
        steps = None
    else:
        starts, ends = ints(node, x, 1), ints(node, x, 2)
        axes, steps = ints(node, x, 3), ints(node, x, 4)
    if axes is None:
        axes = list(range(len(starts)))
    if steps is None:
        steps = [1] * len(starts)
    for a, s, e, st in zip(axes, starts, ends, steps, strict=True):
        t = _slice_axis(t, _axis(a, t.dim()), s, e, st)
    return t


def _norm_index(idx: Tensor, dim: int) -> Tensor:
    return torch.where(idx < 0, idx + dim, idx)


@_op("Gather", non_data={1}, weights={0})
def _gather(node, rt, x):
    data, idx = x
    axis = _axis(node.attr("axis", 0), data.dim())
    idx = _norm_index(idx.long(), data.shape[axis])
    flat = data.index_select(axis, idx.reshape(-1))
    shape = list(data.shape[:axis]) + list(idx.shape) + list(data.shape[axis + 1 :])
    return flat.reshape(shape)


@_op("GatherElements", non_data={1})
def _gather_elements(node, rt, x):
    data, idx = x
    axis = _axis(node.attr("axis", 0), data.dim())
    return torch.gather(data, axis, _norm_index(idx.long(), data.shape[axis]))


def _nd_index(data: Tensor, idx: Tensor, batch_dims: int):
    """Flattened batch and index tuple for GatherND/ScatterND style indexing."""
    k = idx.shape[-1]
    idx = idx.long()
    dims = torch.tensor(
        data.shape[batch_dims : batch_dims + k], dtype=torch.long, device=idx.device
    )
    idx = torch.where(idx < 0, idx + dims, idx)
    return idx, k


@_op("GatherND", non_data={1})
def _gather_nd(node, rt, x):
    data, idx = x
    b = node.attr("batch_dims", 0)
    idx, k = _nd_index(data, idx, b)
    batch = list(data.shape[:b])
    nb = math.prod(batch)
    d = data.reshape(nb, *data.shape[b:])
    inner = list(idx.shape[b:-1])
    i = idx.reshape(nb, math.prod(inner), k)
    bidx = torch.arange(nb, device=idx.device).unsqueeze(1).expand(nb, i.shape[1])
    out = d[(bidx, *(i[..., j] for j in range(k)))]
    return out.reshape(batch + inner + list(data.shape[b + k :]))


@_op("ScatterND", non_data={1})
def _scatter_nd(node, rt, x):
    data, idx, updates = x
    idx, k = _nd_index(data, idx, 0)
    reduction = node.attr("reduction", "none")
    index = tuple(idx[..., j] for j in range(k))
    if reduction == "none":
        return data.index_put(index, updates)
    if reduction == "add":
        return data.index_put(index, updates, accumulate=True)
    # mul / max / min: reduce over the flattened leading k dims.
    lead = data.shape[:k]
    strides = torch.tensor(
        [math.prod(lead[j + 1 :]) for j in range(k)], dtype=torch.long, device=idx.device
    )
    lin = (idx * strides).sum(-1).reshape(-1)
    flat = data.reshape(math.prod(lead), *data.shape[k:])
    upd = updates.reshape(lin.numel(), *data.shape[k:])
    op = {"mul": "prod", "max": "amax", "min": "amin"}[reduction]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "index_reduce() is in beta"
        return flat.index_reduce(0, lin, upd, op, include_self=True).reshape(data.shape)


@_op("ScatterElements", non_data={1})
def _scatter_elements(node, rt, x):
    data, idx, updates = x
    axis = _axis(node.attr("axis", 0), data.dim())
    idx = _norm_index(idx.long(), data.shape[axis])
    reduction = node.attr("reduction", "none")
    if reduction == "none":
        return data.scatter(axis, idx, updates)
    if reduction == "add":
        return data.scatter_add(axis, idx, updates)
    op = {"mul": "prod", "max": "amax", "min": "amin"}[reduction]
    return data.scatter_reduce(axis, idx, updates, op, include_self=True)


OPS["Scatter"] = OPS["ScatterElements"]


@_op("Expand", non_data={1})
def _expand(node, rt, x):
    t = x[0]
    shape = ints(node, x, 1)
    return t.expand(torch.broadcast_shapes(tuple(t.shape), tuple(shape)))


@_op("Tile", non_data={1})
def _tile(node, rt, x):
    return x[0].repeat(ints(node, x, 1))


def _pad_index(size: int, before: int, after: int, mode: str, device) -> Tensor:
    i = torch.arange(-before, size + after, device=device)
    if mode == "edge":
        return i.clamp(0, size - 1)
    if mode == "wrap":
        return torch.remainder(i, size)
    # reflect (without repeating the edge)
    period = 2 * (size - 1)
    if period == 0:
        return torch.zeros_like(i)
    i = torch.remainder(i, period)
    return torch.where(i >= size, period - i, i)


@_op("Pad", non_data={1, 2, 3})
def _pad(node, rt, x):
    t = x[0]
    mode = node.attr("mode", "constant")
    rank = t.dim()
    if node.opset < 11:
        pads = list(node.attr("pads"))
        value = node.attr("value", 0.0)
        axes = list(range(rank))
    else:
        pads = ints(node, x, 1)
        v = _get(x, 2)
        value = v.reshape(-1)[0].item() if v is not None and v.numel() else 0
        axes = ints(node, x, 3)
        axes = [_axis(a, rank) for a in axes] if axes else list(range(rank))
    n = len(axes)
    full = [0] * (2 * rank)
    for j, a in enumerate(axes):
        full[a], full[a + rank] = pads[j], pads[j + n]
    if mode == "constant":
        return F.pad(t, _torch_pad(full), value=value)
    for a in range(rank):
        before, after = full[a], full[a + rank]
        if before or after:
            if before < 0 or after < 0:  # crop first, then pad the rest
                t = t.narrow(a, max(-before, 0), t.shape[a] - max(-before, 0) - max(-after, 0))
                before, after = max(before, 0), max(after, 0)
            idx = _pad_index(t.shape[a], before, after, mode, t.device)
            t = t.index_select(a, idx)
    return t


@_op("DepthToSpace")
def _depth_to_space(node, rt, x):
    t = x[0]
    b = node.attr("blocksize")
    n, c, h, w = t.shape
    if node.attr("mode", "DCR") == "DCR":
        y = t.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
    else:
        y = t.reshape(n, c // (b * b), b, b, h, w).permute(0, 1, 4, 2, 5, 3)
    return y.reshape(n, c // (b * b), h * b, w * b)


@_op("SpaceToDepth")
def _space_to_depth(node, rt, x):
    t = x[0]
    b = node.attr("blocksize")
    n, c, h, w = t.shape
    y = t.reshape(n, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4)
    return y.reshape(n, c * b * b, h // b, w // b)


@_op("Trilu", non_data={1})
def _trilu(node, rt, x):
    k = ints(node, x, 1)
    k = k[0] if k else 0
    if node.attr("upper", 1):
        return torch.triu(x[0], k)
    return torch.tril(x[0], k)


# ------------------------------------------------------------------------- shapes and types


@_op("Shape", non_data=_ALL)
def _shape(node, rt, x):
    dims = list(x[0].shape)
    start, end = node.attr("start", 0), node.attr("end")
    dims = dims[start:end] if end is not None else dims[start:]
    return torch.tensor(dims, dtype=torch.int64, device=x[0].device)


@_op("Size", non_data=_ALL)
def _size(node, rt, x):
    return torch.tensor(x[0].numel(), dtype=torch.int64, device=x[0].device)


@_op("ConstantOfShape", non_data=_ALL)
def _constant_of_shape(node, rt, x):
    shape = ints(node, x, 0)
    value = node.attr("value")
    if value is None:
        return torch.zeros(shape, dtype=torch.float32, device=rt.device)
    dtype = torch.from_numpy(np.zeros(0, dtype=value.dtype)).dtype
    return torch.full(shape, value.reshape(-1)[0].item(), dtype=dtype, device=rt.device)


@_op("Range", non_data=_ALL)
def _range(node, rt, x):
    start, limit, delta = x
    if _is_float(start):
        s, lim, d = start.item(), limit.item(), delta.item()
        n = max(math.ceil((lim - s) / d), 0)
        steps = torch.arange(n, dtype=start.dtype, device=start.device)
        return start + steps * delta
    s, lim, d = int(start.item()), int(limit.item()), int(delta.item())
    return torch.arange(s, lim, d, dtype=start.dtype, device=start.device)


def _check_cast(onnx_node, attrs, opset):
    if attrs.get("to") not in ONNX_TO_TORCH:
        return f"to={onnx.TensorProto.DataType.Name(attrs.get('to', 0))}"
    return None


@_op("Cast", check=_check_cast)
def _cast(node, rt, x):
    return x[0].to(ONNX_TO_TORCH[node.attr("to")])


@_op("CastLike", non_data={1})
def _cast_like(node, rt, x):
    return x[0].to(x[1].dtype)


@_op("NonZero", non_data=_ALL)
def _nonzero(node, rt, x):
    return torch.nonzero(x[0]).t().contiguous()


@_op("OneHot", non_data=_ALL)
def _one_hot(node, rt, x):
    idx, depth, values = x
    d = int(depth.reshape(-1)[0].item())
    idx = idx.long()
    idx = torch.where(idx < 0, idx + d, idx)
    valid = (idx >= 0) & (idx < d)
    oh = F.one_hot(torch.where(valid, idx, torch.zeros_like(idx)), d).bool()
    oh = oh & valid.unsqueeze(-1)
    axis = node.attr("axis", -1)
    if axis != -1:
        oh = oh.movedim(-1, _axis(axis, oh.dim()))
    off, on = values.reshape(-1)[0], values.reshape(-1)[1]
    return torch.where(oh, on, off)


@_op("Constant", non_data=_ALL)
def _constant(node, rt, x):
    for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        if key in node.attrs:
            value = np.asarray(node.attrs[key])
            if key in ("value_float", "value_floats"):
                value = value.astype(np.float32)
            elif key in ("value_int", "value_ints"):
                value = value.astype(np.int64)
            return torch.from_numpy(np.array(value)).to(rt.device)
    raise NotImplementedError(f"Constant node '{node.name}' holds an unsupported value kind")


def _check_constant(onnx_node, attrs, opset):
    if not any(
        k in attrs for k in ("value", "value_float", "value_floats", "value_int", "value_ints")
    ):
        return "sparse or string value"
    return None


OPS["Constant"] = OpDef(_constant, non_data=_ALL, check=_check_constant)


# ---------------------------------------------------------------------------------- resize


def _check_resize(onnx_node, attrs, opset):
    if attrs.get("antialias", 0):
        return "antialias"
    return None


@_op("Resize", non_data={1, 2, 3}, check=_check_resize)
def _resize(node, rt, x):
    t = x[0]
    if node.opset < 11:
        return resize(
            t,
            scales=floats(node, x, 1),
            mode=node.attr("mode", "nearest"),
            coord="asymmetric",
            nearest_mode="simple",
        )
    roi, scales, sizes = floats(node, x, 1), floats(node, x, 2), ints(node, x, 3)
    return resize(
        t,
        scales=scales or None,
        sizes=sizes or None,
        roi=roi or None,
        axes=node.attr("axes"),
        mode=node.attr("mode", "nearest"),
        coord=node.attr("coordinate_transformation_mode", "half_pixel"),
        nearest_mode=node.attr("nearest_mode", "round_prefer_floor"),
        cubic_a=node.attr("cubic_coeff_a", -0.75),
        exclude_outside=bool(node.attr("exclude_outside", 0)),
        extrapolation_value=node.attr("extrapolation_value", 0.0),
        keep_aspect_ratio_policy=node.attr("keep_aspect_ratio_policy", "stretch"),
    )


@_op("Upsample", non_data={1})
def _upsample(node, rt, x):
    scales = node.attr("scales") if node.opset < 9 else floats(node, x, 1)
    return resize(
        x[0],
        scales=list(scales),
        mode=node.attr("mode", "nearest"),
        coord="asymmetric",
        nearest_mode="simple",
    )
