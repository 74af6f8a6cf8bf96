"""Pooling and reductions (``idap_onnx.oprules.reduce_pool``): pooling passes channels on axis
1 through; a reduction over other axes moves the channel axis, over the channel axis it ends the
channels (exact for sum-like reductions only); ArgMax/ArgMin over channels fix them."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import (
    analyze,
    assert_declined,
    assert_exact,
    assert_frozen,
    assert_valid,
    group_of,
    parse,
)


def i64(*values: int) -> np.ndarray:
    return np.array(values, np.int64)


# -- pooling ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pool, hw",
    [
        ("MaxPool<kernel_shape=[2,2], strides=[2,2]>", 3),
        ("AveragePool<kernel_shape=[3,3], pads=[1,1,1,1]>", 6),
        ("LpPool<kernel_shape=[2,2], p=2>", 5),
        ("GlobalAveragePool", 1),
        ("GlobalMaxPool", 1),
        ("GlobalLpPool", 1),
    ],
)
def test_pooling_passes_channels(pool, hw):
    model = parse(
        f"""
        g (float[1,3,6,6] x) => (float[1,5,{hw},{hw}] y) {{
            a = Conv(x, W1, B1)
            r = Relu(a)
            p = {pool}(r)
            y = Conv(p, W2)
        }}""",
        W1=(4, 3, 1, 1),
        B1=(4,),
        W2=(5, 4, 1, 1),
    )
    assert group_of(analyze(model), "a").consumers == ("y",)
    assert_exact(model, {"a": [0, 3]})


def test_pooling_with_channels_off_axis_1_declines():
    model = parse(
        """
        g (float[1,3,4,4] x) => (float[1,4,2,2] y) {
            a = Conv(x, W1)
            t = Transpose<perm=[0,2,1,3]>(a)
            y = MaxPool<kernel_shape=[2,2], strides=[2,2]>(t)
        }""",
        W1=(4, 3, 1, 1),
    )
    assert_declined(analyze(model), "y", "channels not on axis 1")


# -- reductions (axes attribute; ReduceSum input from 13, all inputs from 18) -----------------


def _reduce(op: str, opset: int, axes: list[int], keepdims: int, x: str) -> tuple[str, dict]:
    as_input = opset >= 18 or (op == "ReduceSum" and opset >= 13)
    if as_input:
        return f"{op}<keepdims={keepdims}>({x}, axes)", {"axes": i64(*axes)}
    return f"{op}<keepdims={keepdims}, axes=[{','.join(map(str, axes))}]>({x})", {}


@pytest.mark.parametrize(
    "op, opset",
    [("ReduceMean", 13), ("ReduceMean", 18), ("ReduceSum", 11), ("ReduceSum", 13),
     ("ReduceMax", 13), ("ReduceMax", 18), ("ReduceL2", 18)],
)  # fmt: skip
def test_spatial_reduction_moves_the_channel_axis(op, opset):
    line, inits = _reduce(op, opset, [2, 3], 0, "r")
    model = parse(
        f"""
        g (float[1,3,6,6] x) => (float[1,5] y) {{
            a = Conv(x, W1, B1)
            r = Relu(a)
            m = {line}
            y = Gemm(m, B2)
        }}""",
        opset,
        W1=(4, 3, 1, 1),
        B1=(4,),
        B2=(4, 5),
        **inits,
    )
    assert analyze(model).layouts["m"].axis == 1
    assert_exact(model, {"a": [1, 2]})


@pytest.mark.parametrize("opset", [13, 18])
def test_token_mean_pooling_shifts_the_channel_axis(opset):
    line, inits = _reduce("ReduceMean", opset, [1], 0, "h")
    model = parse(
        f"""
        g (float[1,5,6] x) => (float[1,3] y) {{
            h = MatMul(x, W1)
            m = {line}
            y = MatMul(m, W2)
        }}""",
        opset,
        W1=(6, 4),
        W2=(4, 3),
        **inits,
    )
    assert analyze(model).layouts["m"].axis == 1
    assert_exact(model, {"h": [0]})


def test_reduction_keeping_dims_passes_channels():
    line, inits = _reduce("ReduceMean", 18, [2, 3], 1, "a")
    model = parse(
        f"""
        g (float[1,3,6,6] x) => (float[1,5,1,1] y) {{
            a = Conv(x, W1, B1)
            m = {line}
            y = Conv(m, W2)
        }}""",
        18,
        W1=(4, 3, 1, 1),
        B1=(4,),
        W2=(5, 4, 1, 1),
        **inits,
    )
    assert analyze(model).layouts["m"].axis == 1
    assert_exact(model, {"a": [2]})


@pytest.mark.parametrize("op", ["ReduceSum", "ReduceSumSquare", "ReduceL1"])
@pytest.mark.parametrize("opset", [13, 18])
def test_sum_over_channels_is_exact(op, opset):
    line, inits = _reduce(op, opset, [1], 1, "a")
    model = parse(
        f"""
        g (float[1,3,6,6] x) => (float[1,1,6,6] y) {{
            a = Conv(x, W1, B1)
            y = {line}
        }}""",
        opset,
        W1=(4, 3, 1, 1),
        B1=(4,),
        **inits,
    )
    group = group_of(analyze(model), "a")
    assert group.consumers == ("y",) and not group.frozen
    assert_exact(model, {"a": [0, 1]})


@pytest.mark.parametrize("op", ["ReduceMean", "ReduceMax", "ReduceProd"])
def test_mean_or_max_over_channels_is_inexact(op):
    line, inits = _reduce(op, 18, [1], 1, "a")
    model = parse(
        f"""
        g (float[1,3,6,6] x) => (float[1,1,6,6] y) {{
            a = Conv(x, W1, B1)
            y = {line}
        }}""",
        18,
        W1=(4, 3, 1, 1),
        B1=(4,),
        **inits,
    )
    group = group_of(analyze(model), "a")
    assert f"{op} 'y' reduces over the channel axis" in group.inexact_reasons
    assert_valid(model, {"a": [0, 1]})


def test_reduction_with_runtime_axes_declines():
    model = parse(
        """
        g (float[1,3,6,6] x, int64[1] axes) => (float[1,?,?,?] y) {
            a = Conv(x, W1)
            y = ReduceMean(a, axes)
        }""",
        18,
        W1=(4, 3, 1, 1),
    )
    assert_declined(analyze(model), "y", "axes are not constant")


def test_reduction_over_all_axes_by_default_ends_the_channels():
    model = parse(
        """
        g (float[1,3,6,6] x) => (float[1,1,1,1] y) {
            a = Conv(x, W1, B1)
            y = ReduceSum(a)
        }""",
        13,
        W1=(4, 3, 1, 1),
        B1=(4,),
    )
    assert_exact(model, {"a": [3]})


# -- ArgMax / ArgMin --------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["ArgMax", "ArgMin"])
def test_arg_reduce_over_channels_fixes_them(op):
    model = parse(
        f"""
        g (float[1,3,6,6] x) => (int64[1,6,6] y) {{
            a = Conv(x, W1)
            y = {op}<axis=1, keepdims=0>(a)
        }}""",
        W1=(4, 3, 1, 1),
    )
    assert_frozen(analyze(model), "a", f"{op} 'y' returns channel indices")


def test_arg_reduce_over_another_axis_passes_channels():
    model = parse(
        """
        g (float[1,3,6,6] x) => (int64[1,4,6] y) {
            a = Conv(x, W1)
            y = ArgMax<axis=2, keepdims=0>(a)
        }""",
        W1=(4, 3, 1, 1),
    )
    graph = analyze(model)
    assert graph.layouts["y"].axis == 1
    assert_frozen(graph, "a", "reaches graph output 'y'")
