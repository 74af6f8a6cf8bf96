"""Element-wise ops: unary activations pass channels through; binary ops couple their inputs.

Zero preservation (``f(0) == 0``) decides exactness: Relu, Tanh, Gelu, HardSwish, SiLU
(``x * sigmoid(x)``) keep a removed channel at zero; Sigmoid, HardSigmoid, Softplus, Exp do not.
"""

from __future__ import annotations

import numpy as np
import onnx

from idap_onnx.dependency import RESHAPE_DIM, SLICE, AnalysisContext
from idap_onnx.graph import attr
from idap_onnx.layout import Layout
from idap_onnx.oprules.base import register
from idap_onnx.oprules.shape_values import partial_value

ZERO_PRESERVING = {
    "Relu", "LeakyRelu", "Elu", "Selu", "Celu", "Tanh", "Gelu", "Erf", "HardSwish", "Mish",
    "Neg", "Abs", "Sqrt", "Sign", "Identity", "Dropout", "Cast", "CastLike", "Floor", "Ceil",
    "Round", "ThresholdedRelu", "Sin", "Asin", "Atan", "Sinh", "Asinh", "Atanh", "Tan",
}  # fmt: skip
NOT_ZERO_PRESERVING = {
    "Sigmoid", "HardSigmoid", "Softplus", "Softsign", "Exp", "Log", "Reciprocal", "Cos",
    "Cosh", "Acos", "Acosh", "Not", "IsNaN", "IsInf",
}  # fmt: skip


def passthrough(node: onnx.NodeProto, ctx: AnalysisContext, keeps_zero: bool = True) -> None:
    """Output 0 carries input 0's channels unchanged (same axis)."""
    lay = ctx.layout(node.input[0])
    if lay is None:
        return
    nz = ctx.nonzero(node.input[0])
    ctx.set(node.output[0], lay, nz if keeps_zero else np.ones_like(nz))


@register(*sorted(ZERO_PRESERVING))
def unary_zero_preserving(node: onnx.NodeProto, ctx: AnalysisContext) -> None:
    """Unary op with f(0) = 0: channels pass through and removed channels stay zero."""
    passthrough(node, ctx)


@register(*sorted(NOT_ZERO_PRESERVING))
def unary(node: onnx.NodeProto, ctx: AnalysisContext) -> None:
    """Unary op with f(0) != 0: channels pass through; removed channels become non-zero."""
    passthrough(node, ctx, keeps_zero=False)


@register("Clip")
def clip(node: onnx.NodeProto, ctx: AnalysisContext) -> None:
    """Clip: pass-through; keeps zero when 0 lies in [min, max] (attributes or inputs)."""
    lo = attr(node, "min", None)
    hi = attr(node, "max", None)
    runtime_bound = False
    if len(node.input) > 1 and node.input[1]:
        value = ctx.const(node.input[1])
        lo, runtime_bound = (None, True) if value is None else (float(value), runtime_bound)
    if len(node.input) > 2 and node.input[2]:
        value = ctx.const(node.input[2])
        hi, runtime_bound = (None, True) if value is None else (float(value), runtime_bound)
    keeps = not runtime_bound and (lo is None or lo <= 0) and (hi is None or hi >= 0)
    passthrough(node, ctx, keeps_zero=keeps)


@register("PRelu")
def prelu(node: onnx.NodeProto, ctx: AnalysisContext) -> None:
    """PRelu(x, slope): pass-through; a per-channel slope is sliced with the channels;
    PRelu(0) = 0 whatever the slope."""
    res = couple_inputs(node, ctx, [0, 1])
    if res is not None and 0 in res[1]:
        ctx.set(node.output[0], res[0], ctx.nonzero(node.input[0]))


def aligned(ctx: AnalysisContext, name: str, out_rank: int) -> Layout | None:
    """The layout of input ``name`` with its axis numbered in the broadcast output's axes."""
    lay = ctx.layout(name)
    rank = ctx.rank(name)
    if lay is None or rank is None:
        return lay
    shift = out_rank - rank
    return lay.moved(lay.axis + shift, None if lay.inner is None else lay.inner + shift)


def couple_inputs(
    node: onnx.NodeProto, ctx: AnalysisContext, inputs: list[int], const_role: str = "producer"
):
    """Join the channels of the tracked ``inputs`` (numpy broadcasting); slice constants.

    Returns ``(layout, tracked input indices)`` in output axes, or None when no input is
    tracked. Inputs of size 1 on the channel axis broadcast; a constant of full size is a
    per-channel parameter (sliced; zeroed by ``zero_units`` when ``const_role`` is
    ``producer``); a non-constant untracked tensor of full size fixes the channels.
    """
    out_rank = ctx.rank(node.output[0])
    if out_rank is None:
        ctx.decline(node, f"{node.op_type} '{node.name}': output rank unknown")
        return None
    tracked = [i for i in inputs if ctx.layout(node.input[i]) is not None]
    if not tracked:
        return None
    lays = {i: aligned(ctx, node.input[i], out_rank) for i in tracked}
    base = lays[tracked[0]]
    for i in tracked[1:]:
        other = lays[i]
        if other.axis != base.axis or len(other) != len(base) or other.fold != base.fold:
            ctx.decline(node, f"{node.op_type} '{node.name}' combines unaligned channel axes")
            return None
        ctx.join(base, other)
    for i in inputs:
        name = node.input[i]
        if i in lays or not name:
            continue
        shape = ctx.shape(name)
        if shape is None:
            ctx.fix(base, f"{node.op_type} '{node.name}': shape of '{name}' unknown")
            continue
        axis = base.axis - (out_rank - len(shape))
        if axis < 0 or shape[axis] == 1:
            continue
        if ctx.index.initializer_name(name) is not None:
            ctx.edit(SLICE, node, node.output[0], input=i, axis=axis, role=const_role)
        elif not _constant_chain(ctx, name, axis, node.output[0], const_role):
            ctx.fix(base, f"{node.op_type} '{node.name}' combines channels with untracked '{name}'")
    return base, tracked


def _constant_chain(ctx: AnalysisContext, name: str, axis: int, mask: str, role: str) -> bool:
    """A per-channel constant reached through Reshape/Unsqueeze/Expand/Identity/Cast of an
    initializer (Paddle adds conv biases as ``Reshape(b, [1, C, 1, 1])``; a ViT class token is
    ``Expand(cls, ...)``, its target shape often built at run time, where the channel entry
    must be a known 1: ``shape_values``): record the edits that slice the source and rewrite
    the shape."""
    node = ctx.index.producer.get(name)
    if node is None or ctx.rank(name) is None:
        return False
    src = node.input[0] if node.input else ""
    src_shape = ctx.shape(src)
    if src_shape is None:
        return False
    if node.op_type in ("Identity", "Cast"):
        inner = axis
    elif node.op_type == "Unsqueeze":
        axes = attr(node, "axes", None)
        if axes is None and len(node.input) > 1:
            value = ctx.const(node.input[1])
            axes = None if value is None else [int(a) for a in np.atleast_1d(value)]
        if axes is None:
            return False
        rank = ctx.rank(name)
        kept = [a for a in range(rank) if a not in {x % rank for x in axes}]
        if axis not in kept:
            return False
        inner = kept.index(axis)
    elif node.op_type == "Expand":
        inner = axis - (ctx.rank(name) - len(src_shape))
        target = ctx.const(node.input[1])
        runtime = target is None
        if runtime:  # built at run time (``expand(n, -1, -1)``): its channel entry must be 1
            target = partial_value(ctx, node.input[1])
        if inner < 0 or target is None or len(target) > ctx.rank(name):
            return False
        k = axis - (ctx.rank(name) - len(target))
        entry = target[k] if k >= 0 else 1
        if runtime and entry != 1:
            return False
        if not runtime and int(entry) > 1:
            ctx.edit(RESHAPE_DIM, node, mask, input=1, axis=k)
    elif node.op_type == "Reshape":
        shape = ctx.const(node.input[1])
        big = [d for d in src_shape if d != 1]
        if shape is None or len(big) != 1 or int(shape[axis]) not in (big[0], -1):
            return False
        inner = [j for j, d in enumerate(src_shape) if d != 1][0]
        if int(shape[axis]) > 0:
            ctx.edit(RESHAPE_DIM, node, mask, input=1, axis=axis)
    else:
        return False
    if ctx.index.initializer_name(src) is None:
        return False
    ctx.edit(SLICE, node, mask, input=0, axis=inner, role=role)
    return True


def binary(node: onnx.NodeProto, ctx: AnalysisContext) -> None:
    """Add/Sub/Max/Min/Sum/Mean/Where: inputs are coupled channel by channel; 0 + 0 = 0,
    but a broadcast operand (``x + 3`` in a decomposed HardSwish, an attention mask) makes
    removed channels non-zero."""
    res = couple_inputs(node, ctx, list(range(len(node.input))))
    if res is None:
        return
    base, tracked = res
    nz = np.zeros(len(base), dtype=bool)
    for i in tracked:
        nz |= ctx.nonzero(node.input[i])
    if _adds_broadcast_value(node, ctx, tracked, base):
        nz[:] = True
    ctx.set(node.output[0], base, nz)


def _adds_broadcast_value(node: onnx.NodeProto, ctx: AnalysisContext, tracked, base) -> bool:
    """True when an untracked operand broadcast over the channels is not a zero constant."""
    out_rank = ctx.rank(node.output[0]) or 0
    for i, name in enumerate(node.input):
        if i in tracked or not name or (node.op_type == "Where" and i == 0):
            continue
        shape = ctx.shape(name) or ()
        axis = base.axis - (out_rank - len(shape))
        per_channel = 0 <= axis < len(shape) and shape[axis] != 1
        value = ctx.const(name)
        if per_channel and ctx.index.initializer_name(name) is not None:
            continue  # sliced and zeroed with the channels
        if value is None or np.any(value != 0):
            return True
    return False


register("Add", "Sub", "Max", "Min", "Sum", "Mean", "Where")(binary)


@register("Mul")
def mul(node: onnx.NodeProto, ctx: AnalysisContext) -> None:
    """Mul: inputs coupled channel by channel (SE gating, SiLU); zero when either is zero."""
    res = couple_inputs(node, ctx, [0, 1])
    if res is None:
        return
    base, tracked = res
    nz = np.ones(len(base), dtype=bool)
    for i in tracked:
        nz &= ctx.nonzero(node.input[i])
    ctx.set(node.output[0], base, nz)


@register("Div", "Pow")
def div_pow(node: onnx.NodeProto, ctx: AnalysisContext) -> None:
    """Div/Pow: coupled like Add; zero is kept only through the numerator / base.

    A per-channel divisor or exponent is sliced but never zeroed (x / 0 is not 0).
    """
    res = couple_inputs(node, ctx, [0, 1], const_role="consumer")
    if res is None:
        return
    base, tracked = res
    nz = ctx.nonzero(node.input[0]) if 0 in tracked else np.zeros(len(base), dtype=bool)
    exponent = ctx.const(node.input[1]) if node.op_type == "Pow" else None
    if 1 in tracked or (node.op_type == "Pow" and (exponent is None or np.any(exponent <= 0))):
        nz = np.ones(len(base), dtype=bool)
    ctx.set(node.output[0], base, nz)
