"""MatMul: with a constant weight it is a linear layer (``conv_gemm.matmul_weight``); between
two activations it is attention (scores = Q K^T, context = P V).

For A [..., M, K] x B [..., K, N]: channels on a batch axis (the heads) couple A and B element
by element and stay on that axis; channels on K are contracted (A and B coupled, exact when
either reads zeros); channels on M or N pass to the output's M or N axis.
"""

from __future__ import annotations

import onnx

from idap_onnx.dependency import AnalysisContext
from idap_onnx.graph import attr
from idap_onnx.oprules.base import register
from idap_onnx.oprules.conv_gemm import matmul_weight
from idap_onnx.oprules.elementwise import aligned


@register("MatMul")
def matmul(node: onnx.NodeProto, ctx: AnalysisContext) -> None:
    """MatMul: constant B -> linear layer; two activations -> batched matmul (attention)."""
    a, b = node.input[0], node.input[1]
    if ctx.index.initializer_name(b) is not None and ctx.index.initializer_name(a) is None:
        matmul_weight(node, ctx)
        return
    via = _transposed_constant(ctx, node, b)
    if via is not None:
        matmul_weight(node, ctx, via)
        return
    la, lb = ctx.layout(a), ctx.layout(b)
    if la is None and lb is None:
        return
    ra, rb, r = ctx.rank(a), ctx.rank(b), ctx.rank(node.output[0])
    if ra is None or rb is None or r is None or ra < 2 or rb < 2:
        ctx.decline(node, f"MatMul '{node.name}': ranks unknown or 1-D operand")
        return
    role_a = _role(la, ra, "M") if la is not None else None
    role_b = _role(lb, rb, "N") if lb is not None else None
    la = aligned(ctx, a, r) if la is not None else None
    lb = aligned(ctx, b, r) if lb is not None else None
    if role_a == "K" or role_b == "K":
        if role_a != "K" or role_b != "K" or len(la) != len(lb):
            untracked = b if role_b != "K" else a
            ctx.decline(
                node,
                f"MatMul '{node.name}': contracted channels on one side only ('{untracked}' "
                "carries none; needs both operands' channels on K, or a constant weight or "
                "Transpose of a constant read by this MatMul only)",
            )
            return
        ctx.join(la, lb)
        ctx.consume(node, la)
        nz = ctx.nonzero(a) & ctx.nonzero(b)
        if nz.any():
            ctx.inexact(la, f"MatMul '{node.name}' contracts non-zero removed channels", nz)
        return
    if role_a == "batch" and role_b == "batch":
        if la.axis != lb.axis or len(la) != len(lb):
            ctx.decline(node, f"MatMul '{node.name}': unaligned batch channels")
            return
        ctx.join(la, lb)
        nz = ctx.nonzero(a) & ctx.nonzero(b)
        out = lb if lb.inner == r - 1 else (la if la.inner == r - 2 else la.moved(la.axis, None))
        ctx.set(node.output[0], out, nz)
        return
    if role_a is not None and role_b is not None:
        ctx.decline(node, f"MatMul '{node.name}': channels on two output axes")
        return
    lay, name, role, other = (la, a, role_a, b) if la is not None else (lb, b, role_b, a)
    if role == "batch":
        shape = ctx.shape(other)
        k = lay.axis - (r - len(shape)) if shape is not None else -1
        if shape is None or (k >= 0 and shape[k] != 1):
            ctx.fix(lay, f"MatMul '{node.name}' batches channels with untracked '{other}'")
    if lay.inner is not None and role != "batch":
        ctx.decline(node, f"MatMul '{node.name}' contracts within heads")
        return
    ctx.set(node.output[0], lay, ctx.nonzero(name))


def _role(lay, rank: int, own: str) -> str:
    """Where a layout's axis sits in a matmul operand: batch, own (M or N), or K."""
    if lay.axis < rank - 2:
        return "batch"
    if own == "M":
        return "M" if lay.axis == rank - 2 else "K"
    return "N" if lay.axis == rank - 1 else "K"


def _transposed_constant(ctx: AnalysisContext, node: onnx.NodeProto, b: str):
    """The Transpose node when ``b`` is ``Transpose(T)`` of a 2-D initializer T read by this
    MatMul only (a tied output projection ``x @ E^T``), else None."""
    t = ctx.index.producer.get(b)
    if t is None or t.op_type != "Transpose" or ctx.layout(node.input[0]) is None:
        return None
    if ctx.index.initializer_name(t.input[0]) is None or ctx.rank(t.input[0]) != 2:
        return None
    if ctx.index.initializer_name(node.input[0]) is not None:
        return None
    perm = list(attr(t, "perm", None) or [1, 0])
    users = ctx.index.consumers.get(b, [])
    if perm != [1, 0] or len(users) != 1 or b in ctx.index.output_names:
        return None
    return t
