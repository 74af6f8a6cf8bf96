"""Weighted ops: Conv, ConvTranspose, Gemm, MatMul with a constant weight, embedding Gather.

Each *produces* a new space of channels (its output rows: ``W[c]`` and ``bias[c]``) and
*consumes* the channels of its input (its input columns ``W[:, c]``). Depthwise Conv ties each
output channel to its input channel; grouped Conv ties whole conv groups of inputs and outputs
into units, so removal drops whole groups and rewrites ``group``, except where a later Reshape
splits its output into one row per conv group (ResNeSt's radix): then channel j of every group
is one unit, as the rows need, and ``group`` stays.
"""

from __future__ import annotations

import numpy as np
import onnx

from idap_onnx.dependency import GROUP_ATTR, ROWS, SLICE, AnalysisContext
from idap_onnx.graph import attr
from idap_onnx.layout import Layout, block_rows
from idap_onnx.oprules.base import register


def _weight(node: onnx.NodeProto, ctx: AnalysisContext, i: int) -> np.ndarray | None:
    if len(node.input) <= i or ctx.index.initializer_name(node.input[i]) is None:
        return None
    return ctx.const(node.input[i])


def _produce(node: onnx.NodeProto, ctx: AnalysisContext, n: int, axis: int) -> Layout:
    out = node.output[0]
    lay = ctx.new_space(node, n, axis)
    ctx.set(out, lay, np.zeros(n, dtype=bool))
    return lay


def _bias(node: onnx.NodeProto, ctx: AnalysisContext, i: int, n: int) -> None:
    bias = _weight(node, ctx, i)
    if bias is not None and bias.ndim >= 1 and bias.shape[-1] == n:
        ctx.edit(SLICE, node, node.output[0], input=i, axis=bias.ndim - 1, role="producer")


@register("Conv")
def conv(node: onnx.NodeProto, ctx: AnalysisContext) -> None:
    """Conv: W [C_out, C_in/g, k...]; consumes W[:, c] (g = 1), produces W[c] and B[c].

    Depthwise (g = C_in, C_out = m * C_in): output channel m*c+j is tied to input c.
    Grouped (1 < g < C_in): conv group j of inputs and outputs is one unit; where the output
    is later split into g rows (``_split_into_rows``), output j of every group is one unit and
    input i of every group another, and W[:, i] is sliced by one row's mask.
    """
    x = node.input[0]
    w = _weight(node, ctx, 1)
    lay = ctx.layout(x)
    if w is None:
        ctx.decline(node, f"Conv '{node.name}': weight is not a constant")
        return
    if lay is not None and (lay.axis != 1 or lay.fold != 1):
        ctx.decline(node, f"Conv '{node.name}': channels not on axis 1")
        return
    groups = int(attr(node, "group", 1))
    c_out, c_in = int(w.shape[0]), int(w.shape[1]) * groups
    if groups == 1:
        if lay is not None:
            ctx.sink(node, x)
            ctx.edit(SLICE, node, x, input=1, axis=1, role="consumer")
        out = _produce(node, ctx, c_out, 1)
    elif lay is None:
        out = _produce(node, ctx, c_out, 1)
        ctx.fix(out, f"grouped Conv '{node.name}' reads untracked channels")
        return
    elif groups == c_in:
        out = lay.take(np.repeat(np.arange(len(lay)), c_out // c_in))
        ctx.set(node.output[0], out, np.zeros(len(out), dtype=bool))
        ctx.produce(node, out)
        ctx.consume(node, lay)
        ctx.edit(GROUP_ATTR, node, x, extra=(1,))
    elif _split_into_rows(ctx, node.output[0], groups, c_out):
        out = _produce(node, ctx, c_out, 1)
        for lays in (block_rows(out, groups), block_rows(lay, groups)):
            for row in lays[1:]:
                ctx.join(lays[0], row)
        ctx.sink(node, x)
        ctx.edit(SLICE, node, x, input=1, axis=1, role="consumer", extra=(ROWS, groups))
    else:
        out = _produce(node, ctx, c_out, 1)
        per_in, per_out = c_in // groups, c_out // groups
        for j in range(groups):
            ctx.tie(
                [
                    (lay, np.arange(j * per_in, (j + 1) * per_in)),
                    (out, np.arange(j * per_out, (j + 1) * per_out)),
                ]
            )
        ctx.sink(node, x)
        ctx.edit(GROUP_ATTR, node, node.output[0], extra=(per_out,))
    ctx.edit(SLICE, node, node.output[0], input=1, axis=0, role="producer")
    _bias(node, ctx, 2, c_out)


_UNARY = ("Relu", "BatchNormalization", "Sigmoid", "Clip", "LeakyRelu", "HardSwish", "Identity")


def _split_into_rows(ctx: AnalysisContext, name: str, groups: int, c_out: int) -> bool:
    """True when ``name`` (NCHW, after unary ops) is reshaped to ``[N, groups, C/groups, ...]``."""
    for _ in range(4):
        users = ctx.index.consumers.get(name, [])
        rank = ctx.rank(name)
        for user in users:
            shape = ctx.shape(user.output[0]) if user.op_type == "Reshape" else None
            rows = shape is not None and rank is not None and len(shape) == rank + 1
            if rows and list(shape[1:3]) == [groups, c_out // groups]:
                return True
        unary = [u for u in users if u.op_type in _UNARY]
        if len(unary) != 1:
            return False
        name = unary[0].output[0]
    return False


@register("ConvTranspose")
def conv_transpose(node: onnx.NodeProto, ctx: AnalysisContext) -> None:
    """ConvTranspose: W [C_in, C_out/g, k...]; consumes W[c], produces W[:, c] and B[c] (g = 1)."""
    x = node.input[0]
    w = _weight(node, ctx, 1)
    lay = ctx.layout(x)
    if w is None or int(attr(node, "group", 1)) != 1:
        ctx.decline(node, f"ConvTranspose '{node.name}': grouped or non-constant weight")
        return
    if lay is not None:
        if lay.axis != 1 or lay.fold != 1:
            ctx.decline(node, f"ConvTranspose '{node.name}': channels not on axis 1")
            return
        ctx.sink(node, x)
        ctx.edit(SLICE, node, x, input=1, axis=0, role="consumer")
    _produce(node, ctx, int(w.shape[1]), 1)
    ctx.edit(SLICE, node, node.output[0], input=1, axis=1, role="producer")
    _bias(node, ctx, 2, int(w.shape[1]))


@register("Gemm")
def gemm(node: onnx.NodeProto, ctx: AnalysisContext) -> None:
    """Gemm: Y = A' B' + C with B constant; consumes B' rows (K), produces B' columns (N)."""
    a = node.input[0]
    w = _weight(node, ctx, 1)
    lay = ctx.layout(a)
    trans_a, trans_b = int(attr(node, "transA", 0)), int(attr(node, "transB", 0))
    if w is None or w.ndim != 2:
        ctx.decline(node, f"Gemm '{node.name}': B is not a constant matrix")
        return
    if lay is not None:
        if lay.axis != (0 if trans_a else 1) or lay.fold != 1:
            ctx.decline(node, f"Gemm '{node.name}': channels not on the K axis of A")
            return
        ctx.sink(node, a)
        ctx.edit(SLICE, node, a, input=1, axis=1 if trans_b else 0, role="consumer")
    n = int(w.shape[0] if trans_b else w.shape[1])
    _produce(node, ctx, n, 1)
    ctx.edit(SLICE, node, node.output[0], input=1, axis=0 if trans_b else 1, role="producer")
    _bias(node, ctx, 2, n)


def matmul_weight(
    node: onnx.NodeProto, ctx: AnalysisContext, via: onnx.NodeProto | None = None
) -> None:
    """MatMul X W with W [K, N] constant: consumes W[k, :], produces W[:, n].

    With ``via``, W is ``Transpose(T)`` of a constant T [N, K] (a weight tied to an
    embedding table, as the dynamo exporter writes ``lm_head``): the consumed columns are
    sliced from T's axis 1; the output features stay fixed (their MACs are not predicted
    through the Transpose)."""
    x = node.input[0]
    if via is None:
        w, holder, slot, k_axis = _weight(node, ctx, 1), node, 1, 0
    else:
        t = _weight(via, ctx, 0)
        w, holder, slot, k_axis = (None if t is None else t.T), via, 0, 1
    lay = ctx.layout(x)
    rank = ctx.rank(x)
    out_rank = ctx.rank(node.output[0])
    if w is None or w.ndim != 2 or rank is None or out_rank is None:
        ctx.decline(node, f"MatMul '{node.name}': weight is not a 2-D constant or rank unknown")
        return
    if lay is not None:
        if lay.axis != rank - 1 or lay.fold != 1:
            ctx.decline(node, f"MatMul '{node.name}': channels not on the last axis")
            return
        ctx.sink(node, x)
        ctx.edit(SLICE, holder, x, input=slot, axis=k_axis, role="consumer")
    out = _produce(node, ctx, int(w.shape[1]), out_rank - 1)
    if via is None:
        ctx.edit(SLICE, node, node.output[0], input=1, axis=1, role="producer")
    else:
        ctx.fix(
            out,
            f"MatMul '{node.name}' reads its weight through Transpose '{via.name}': "
            "its output features need a constant weight to be pruned",
        )


def embedding(node: onnx.NodeProto, ctx: AnalysisContext) -> None:
    """Gather(table [V, D] constant, ids): produces the table's columns as channels."""
    table = _weight(node, ctx, 0)
    out_rank = ctx.rank(node.output[0])
    if table is None or table.ndim != 2 or out_rank is None:
        ctx.decline(node, f"Gather '{node.name}': table is not a 2-D constant")
        return
    _produce(node, ctx, int(table.shape[1]), out_rank - 1)
    ctx.edit(SLICE, node, node.output[0], input=0, axis=1, role="producer")
