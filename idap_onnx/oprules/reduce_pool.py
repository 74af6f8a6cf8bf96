"""Pooling and reductions.

Pooling works per channel (axis 1): channels pass through. A reduction over other axes moves
the channel axis; a reduction over the channel axis ends it: ReduceSum of zeros is exact,
ReduceMean/Max over fewer channels is not.
"""

from __future__ import annotations

import numpy as np
import onnx

from idap_onnx.dependency import AnalysisContext
from idap_onnx.graph import attr
from idap_onnx.oprules.base import register
from idap_onnx.oprules.elementwise import passthrough
from idap_onnx.oprules.movement import _axes

POOLS = (
    "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool",
    "MaxRoiPool",
)  # fmt: skip
SUM_LIKE = {"ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2"}
REDUCES = (
    "ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceMean", "ReduceMax",
    "ReduceMin", "ReduceProd", "ReduceLogSum", "ReduceLogSumExp",
)  # fmt: skip


@register(*POOLS)
def pool(node: onnx.NodeProto, ctx: AnalysisContext) -> None:
    """Pooling over spatial axes: channels on axis 1 pass through, zeros stay zero."""
    lay = ctx.layout(node.input[0])
    if lay is None:
        return
    if lay.axis != 1:
        ctx.decline(node, f"{node.op_type} '{node.name}': channels not on axis 1")
        return
    passthrough(node, ctx)


def _reduce_axes_input(node: onnx.NodeProto, ctx: AnalysisContext) -> list[int] | None:
    axes_as_input = ctx.opset >= 18 or (node.op_type == "ReduceSum" and ctx.opset >= 13)
    if axes_as_input:
        return _axes(node, ctx, 1)
    return attr(node, "axes", None)


@register(*REDUCES)
def reduce(node: onnx.NodeProto, ctx: AnalysisContext) -> None:
    """Reduce over axes R (keepdims k): the channel axis a not in R moves to
    a - |{r in R: r < a}| (k = 0); a in R ends the channels (ReduceSum-like is exact)."""
    lay = ctx.layout(node.input[0])
    rank = ctx.rank(node.input[0])
    if lay is None or rank is None:
        return
    axes = _reduce_axes_input(node, ctx)
    if axes is None and len(node.input) > 1 and node.input[1]:
        ctx.decline(node, f"{node.op_type} '{node.name}': axes are not constant")
        return
    noop = int(attr(node, "noop_with_empty_axes", 0))
    if not axes:
        if noop:
            passthrough(node, ctx)
            return
        axes = list(range(rank))
    axes = sorted(a % rank for a in axes)
    keepdims = int(attr(node, "keepdims", 1))
    if lay.axis in axes or (lay.inner is not None and lay.inner in axes):
        if node.op_type in SUM_LIKE and lay.inner is None:
            ctx.sink(node, node.input[0])
        else:
            ctx.consume(node, lay)
            ctx.inexact(lay, f"{node.op_type} '{node.name}' reduces over the channel axis")
        return
    if keepdims:
        passthrough(node, ctx)
        return
    shift = {a: a - sum(1 for r in axes if r < a) for a in range(rank) if a not in axes}
    inner = shift.get(lay.inner) if lay.inner is not None else None
    nz = ctx.nonzero(node.input[0])
    ctx.set(node.output[0], lay.moved(shift[lay.axis], inner), nz)


@register("ArgMax", "ArgMin")
def arg_reduce(node: onnx.NodeProto, ctx: AnalysisContext) -> None:
    """ArgMax/ArgMin over another axis pass channels through; over the channel axis they
    end them (the index of a removed channel changes)."""
    lay = ctx.layout(node.input[0])
    rank = ctx.rank(node.input[0])
    if lay is None or rank is None:
        return
    axis = int(attr(node, "axis", 0)) % rank
    if axis == lay.axis:
        ctx.fix(lay, f"{node.op_type} '{node.name}' returns channel indices")
        return
    keepdims = int(attr(node, "keepdims", 1))
    new_axis = lay.axis if keepdims or lay.axis < axis else lay.axis - 1
    ctx.set(node.output[0], lay.moved(new_axis), np.ones(len(lay), dtype=bool))
