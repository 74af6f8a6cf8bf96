"""Shape vectors built at run time, known entry by entry where the graph spells them.

Exporters build shape vectors from the input's dims: a class token's ``expand(n, -1, -1)``
becomes ``Concat(Shape(x)[0:1], 1, 1)`` (dynamo) or ``Where(Equal(s, -1), 1, s)`` over
``s = Concat(n, -1, -1)`` (the legacy exporter). The batch entry depends on the input, but the
entry a channel rule asks about is often a constant inside that sub-graph.
:func:`partial_value` evaluates such a 1-D integer tensor entry by entry: an entry is an int
(or bool) where the graph fixes it, ``None`` where it depends on a tensor's dims or data; the
whole is ``None`` when not even its length is known.

An entry read from ``Shape(t)`` is unknown even where the analysis knows ``t``'s dims: the
analysis runs at one input shape, and a channel dim changes with pruning. Only lengths are
structural: ``Shape`` of a traced shape vector of length L is ``[L]``.
"""

from __future__ import annotations

import math

import numpy as np
import onnx

from idap_onnx.dependency import AnalysisContext
from idap_onnx.graph import attr

Entry = int | float | bool | None
MAX_DEPTH = 32

_BINARY = {
    "Add": lambda a, b: a + b,
    "Sub": lambda a, b: a - b,
    "Mul": lambda a, b: a * b,
    "Div": lambda a, b: math.trunc(a / b) if isinstance(a, int) and isinstance(b, int) else a / b,
    "Equal": lambda a, b: a == b,
    "Max": max,
    "Min": min,
}


def partial_value(ctx: AnalysisContext, name: str, depth: int = 0) -> list[Entry] | None:
    """``name`` (a scalar or 1-D tensor) entry by entry (module docstring)."""
    if not name or depth > MAX_DEPTH:
        return None
    rank = ctx.rank(name)
    if rank is not None and rank > 1:
        return None
    value = ctx.const(name)
    if value is not None:
        a = np.asarray(value)
        return None if a.ndim > 1 else [v.item() for v in a.reshape(-1)]
    node = ctx.index.producer.get(name)
    if node is None:
        return None

    def sub(i: int) -> list[Entry] | None:
        if len(node.input) <= i or not node.input[i]:
            return None
        return partial_value(ctx, node.input[i], depth + 1)

    op = node.op_type
    if op == "Shape":
        return _shape(node, ctx, sub(0))
    if op in ("Identity", "Cast", "Unsqueeze", "Squeeze", "Reshape"):
        return sub(0)  # of a scalar or 1-D vector: the same entries
    if op == "Concat":
        parts = [sub(i) for i in range(len(node.input))]
        return None if any(p is None for p in parts) else [e for p in parts for e in p]
    if op == "Gather" and int(attr(node, "axis", 0)) == 0:
        data, index = sub(0), ctx.const(node.input[1])
        if data is None or index is None:
            return None
        picks = [int(i) for i in np.asarray(index).reshape(-1)]
        return [data[i] for i in picks] if all(-len(data) <= i < len(data) for i in picks) else None
    if op == "Slice":
        return _slice(node, ctx, sub(0))
    if op == "ConstantOfShape":
        dims = sub(0)
        if dims is None or len(dims) != 1 or not isinstance(dims[0], int):
            return None
        fill = attr(node, "value", None)
        entry = onnx.numpy_helper.to_array(fill).reshape(-1)[0].item() if fill is not None else 0.0
        return [entry] * dims[0]
    if op in _BINARY:
        return _broadcast(_BINARY[op], sub(0), sub(1))
    if op == "Where":
        cond, x, y = sub(0), sub(1), sub(2)
        if cond is None or x is None or y is None:
            return None
        n = max(len(cond), len(x), len(y))
        if any(len(v) not in (1, n) for v in (cond, x, y)):
            return None
        pick = [v * n if len(v) == 1 else v for v in (cond, x, y)]
        return [a if c is True else b if c is False else (a if a == b else None)
                for c, a, b in zip(*pick, strict=True)]
    return None


def _shape(node: onnx.NodeProto, ctx: AnalysisContext, traced: list[Entry] | None):
    if traced is not None and ctx.rank(node.input[0]) == 1:
        entries: list[Entry] = [len(traced)]  # a shape vector's length is a rank
    else:
        rank = ctx.rank(node.input[0])
        if rank is None:
            return None
        entries = [None] * rank
    start, end = int(attr(node, "start", 0)), attr(node, "end", None)
    return entries[start:None if end is None else int(end)]


def _slice(node: onnx.NodeProto, ctx: AnalysisContext, data: list[Entry] | None):
    if data is None:
        return None
    starts, ends = ctx.const(node.input[1]), ctx.const(node.input[2])
    axes = ctx.const(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    steps = ctx.const(node.input[4]) if len(node.input) > 4 and node.input[4] else None
    if starts is None or ends is None or (axes is not None and [int(a) for a in axes] not in
                                          ([0], [-1])):
        return None
    step = 1 if steps is None else int(np.asarray(steps).reshape(-1)[0])
    start, end = (int(np.asarray(v).reshape(-1)[0]) for v in (starts, ends))
    return data[slice(start, end, step)]


def _broadcast(fn, a: list[Entry] | None, b: list[Entry] | None) -> list[Entry] | None:
    if a is None or b is None:
        return None
    n = max(len(a), len(b))
    if len(a) not in (1, n) or len(b) not in (1, n):
        return None
    a, b = (v * n if len(v) == 1 else v for v in (a, b))
    out: list[Entry] = []
    for x, y in zip(a, b, strict=True):
        try:
            out.append(None if x is None or y is None else fn(x, y))
        except (ZeroDivisionError, TypeError):
            out.append(None)
    return out
