"""Normalizations and Softmax.

BatchNormalization and InstanceNormalization act per channel: their scale, bias, mean and
variance are sliced with the channels, and zeroing scale and bias zeroes the channel (exact).
LayerNormalization, Softmax and LpNormalization over the channel axis mix channels: removal is
valid but not exact.
"""

from __future__ import annotations

import numpy as np
import onnx

from idap_onnx.dependency import SLICE, AnalysisContext
from idap_onnx.graph import attr
from idap_onnx.oprules.base import register
from idap_onnx.oprules.elementwise import passthrough


@register("BatchNormalization", "InstanceNormalization")
def per_channel_norm(node: onnx.NodeProto, ctx: AnalysisContext) -> None:
    """y = scale[c] * (x - mean[c]) / sqrt(var[c] + eps) + B[c]: channels on axis 1."""
    lay = ctx.layout(node.input[0])
    if lay is None:
        return
    if lay.axis != 1 or lay.fold != 1:
        ctx.decline(node, f"{node.op_type} '{node.name}': channels not on axis 1")
        return
    for i, name in enumerate(node.input[1:], start=1):
        if ctx.index.initializer_name(name) is None:
            ctx.decline(node, f"{node.op_type} '{node.name}': non-constant parameters")
            return
        role = "producer" if i <= 2 else "consumer"
        ctx.edit(SLICE, node, node.output[0], input=i, axis=0, role=role)
    ctx.set(node.output[0], lay, np.zeros(len(lay), dtype=bool))
    for out in node.output[1:]:
        if out:
            ctx.decline(node, f"{node.op_type} '{node.name}' in training mode")


@register("LayerNormalization", since=17)
def layer_norm(node: onnx.NodeProto, ctx: AnalysisContext) -> None:
    """LayerNorm over axes [axis, rank): channels there are sliced from Scale and B; the
    mean and variance then run over fewer channels (not exact)."""
    lay = ctx.layout(node.input[0])
    rank = ctx.rank(node.input[0])
    if lay is None or rank is None:
        return
    axis = int(attr(node, "axis", -1)) % rank
    if lay.axis < axis:
        passthrough(node, ctx, keeps_zero=False)
        return
    if lay.fold != 1:
        ctx.decline(node, f"LayerNormalization '{node.name}' over heads")
        return
    for i in (1, 2):
        if len(node.input) <= i or not node.input[i]:
            continue
        shape = ctx.shape(node.input[i])
        if ctx.index.initializer_name(node.input[i]) is None or shape is None:
            ctx.decline(node, f"LayerNormalization '{node.name}': non-constant scale or bias")
            return
        k = lay.axis - (rank - len(shape))
        if k >= 0 and shape[k] != 1:
            ctx.edit(SLICE, node, node.output[0], input=i, axis=k, role="producer")
    ctx.consume(node, lay)
    ctx.inexact(lay, f"LayerNormalization '{node.name}' normalizes over the channel axis")
    ctx.set(node.output[0], lay, np.zeros(len(lay), dtype=bool))


@register("Softmax", "LogSoftmax", "Hardmax", "LpNormalization")
def softmax(node: onnx.NodeProto, ctx: AnalysisContext) -> None:
    """Softmax over axis s: channels pass through; over the channel axis it is not exact
    (opset < 13 flattens [s, rank) into one axis, so any channel axis >= s counts)."""
    lay = ctx.layout(node.input[0])
    rank = ctx.rank(node.input[0])
    if lay is None or rank is None:
        return
    default = 1 if ctx.opset < 13 else -1
    axis = int(attr(node, "axis", default)) % rank
    over = (
        lay.axis >= axis
        if ctx.opset < 13 and node.op_type != "LpNormalization"
        else (lay.axis == axis)
    )
    if over:
        ctx.consume(node, lay)
        ctx.inexact(lay, f"{node.op_type} '{node.name}' normalizes over the channel axis")
    passthrough(node, ctx, keeps_zero=node.op_type == "LpNormalization")
