"""Weighted ops (``idap_onnx.oprules.conv_gemm``): Conv, ConvTranspose, Gemm, MatMul with a
constant weight and embedding Gather produce a space of channels (their output rows) and
consume their input's channels (their input columns)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import (
    analyze,
    assert_declined,
    assert_exact,
    assert_frozen,
    attr,
    group_of,
    init,
    parse,
)

# -- Conv -------------------------------------------------------------------------------------


def test_conv_produces_rows_and_consumes_columns():
    model = parse(
        """
        g (float[1,3,6,6] x) => (float[1,5,6,6] y) {
            a = Conv<pads=[1,1,1,1]>(x, W1, B1)
            r = Relu(a)
            y = Conv(r, W2, B2)
        }""",
        W1=(4, 3, 3, 3),
        B1=(4,),
        W2=(5, 4, 1, 1),
        B2=(5,),
    )
    group = group_of(analyze(model), "a")
    assert (group.size, group.producers, group.consumers) == (4, ("a",), ("y",))
    pruned = assert_exact(model, {"a": [0, 2]})
    assert init(pruned, "a:1").shape == (2, 3, 3, 3)
    assert init(pruned, "a:2").shape == (2,)
    assert init(pruned, "y:1").shape == (5, 2, 1, 1)


def test_conv_with_non_constant_weight_declines():
    model = parse(
        """
        g (float[1,3,6,6] x, float[5,4,1,1] w) => (float[1,5,6,6] y) {
            a = Conv(x, W1)
            y = Conv(a, w)
        }""",
        W1=(4, 3, 1, 1),
    )
    graph = analyze(model)
    assert_declined(graph, "y", "weight is not a constant")
    assert_frozen(graph, "a", "weight is not a constant")


def test_conv_with_channels_off_axis_1_declines():
    model = parse(
        """
        g (float[1,3,4,4] x) => (float[1,5,4,4] y) {
            a = Conv(x, W1)
            t = Transpose<perm=[0,2,1,3]>(a)
            y = Conv(t, W2)
        }""",
        W1=(4, 3, 1, 1),
        W2=(5, 4, 1, 1),
    )
    graph = analyze(model)
    assert_declined(graph, "y", "channels not on axis 1")
    assert_frozen(graph, "a", "channels not on axis 1")


# -- depthwise and grouped Conv ---------------------------------------------------------------


def test_depthwise_conv_ties_each_output_to_its_input():
    model = parse(
        """
        g (float[1,3,6,6] x) => (float[1,5,6,6] y) {
            a = Conv(x, W1, B1)
            dw = Conv<group=4, pads=[1,1,1,1]>(a, Wdw, Bdw)
            r = Relu(dw)
            y = Conv(r, W2)
        }""",
        W1=(4, 3, 1, 1),
        B1=(4,),
        Wdw=(4, 1, 3, 3),
        Bdw=(4,),
        W2=(5, 4, 1, 1),
    )
    group = group_of(analyze(model), "a")
    assert group.producers == ("a", "dw") and group.size == 4
    pruned = assert_exact(model, {"a": [1, 2]})
    assert attr(pruned, "dw", "group") == 2
    assert init(pruned, "dw:1").shape == (2, 1, 3, 3)
    assert init(pruned, "dw:2").shape == (2,)


def test_depthwise_conv_with_multiplier_2_removes_both_outputs_of_a_channel():
    model = parse(
        """
        g (float[1,3,6,6] x) => (float[1,5,6,6] y) {
            a = Conv(x, W1, B1)
            dw = Conv<group=4, pads=[1,1,1,1]>(a, Wdw, Bdw)
            y = Conv(dw, W2)
        }""",
        W1=(4, 3, 1, 1),
        B1=(4,),
        Wdw=(8, 1, 3, 3),
        Bdw=(8,),
        W2=(5, 8, 1, 1),
    )
    group = group_of(analyze(model), "a")
    assert group.size == 4  # one unit per input channel: its two depthwise outputs go with it
    pruned = assert_exact(model, {"a": [3]})
    assert attr(pruned, "dw", "group") == 3
    assert init(pruned, "dw:1").shape == (6, 1, 3, 3)
    assert init(pruned, "y:1").shape == (5, 6, 1, 1)


@pytest.mark.parametrize("per_out", [2, 3])
def test_grouped_conv_drops_whole_conv_groups(per_out):
    # ResNeXt-like: 8 input channels in 4 conv groups of 2, 4 * per_out output channels
    model = parse(
        """
        g (float[1,3,6,6] x) => (float[1,5,6,6] y) {
            a = Conv(x, W1, B1)
            r = Relu(a)
            gc = Conv<group=4, pads=[1,1,1,1]>(r, Wg, Bg)
            s = Relu(gc)
            y = Conv(s, W2)
        }""",
        W1=(8, 3, 1, 1),
        B1=(8,),
        Wg=(4 * per_out, 2, 3, 3),
        Bg=(4 * per_out,),
        W2=(5, 4 * per_out, 1, 1),
    )
    group = group_of(analyze(model), "a")
    assert group.producers == ("a", "gc")
    assert group.size == 4
    assert [sorted(int(c) for c in unit[group.spaces[0]]) for unit in group.units] == [
        [0, 1], [2, 3], [4, 5], [6, 7],
    ]  # fmt: skip
    pruned = assert_exact(model, {"a": [1, 2]})
    assert attr(pruned, "gc", "group") == 2
    assert init(pruned, "gc:1").shape == (2 * per_out, 2, 3, 3)
    assert init(pruned, "a:1").shape == (4, 3, 1, 1)
    assert init(pruned, "y:1").shape == (5, 2 * per_out, 1, 1)


def test_grouped_conv_on_untracked_input_is_frozen():
    model = parse(
        """
        g (float[1,4,6,6] x) => (float[1,5,6,6] y) {
            gc = Conv<group=2>(x, Wg)
            y = Conv(gc, W2)
        }""",
        Wg=(6, 2, 1, 1),
        W2=(5, 6, 1, 1),
    )
    assert_frozen(analyze(model), "gc", "grouped Conv 'gc' reads untracked channels")


# -- ConvTranspose ----------------------------------------------------------------------------


def test_conv_transpose_consumes_rows_and_produces_columns():
    model = parse(
        """
        g (float[1,3,4,4] x) => (float[1,5,8,8] y) {
            a = Conv(x, W1, B1)
            up = ConvTranspose<strides=[2,2], kernel_shape=[2,2]>(a, Wt, Bt)
            r = Relu(up)
            y = Conv(r, W2)
        }""",
        W1=(4, 3, 1, 1),
        B1=(4,),
        Wt=(4, 6, 2, 2),
        Bt=(6,),
        W2=(5, 6, 1, 1),
    )
    pruned = assert_exact(model, {"a": [0], "up": [1, 4]})
    assert init(pruned, "up:1").shape == (3, 4, 2, 2)
    assert init(pruned, "up:2").shape == (4,)


def test_grouped_conv_transpose_declines():
    model = parse(
        """
        g (float[1,3,4,4] x) => (float[1,6,5,5] y) {
            a = Conv(x, W1)
            y = ConvTranspose<group=2>(a, Wt)
        }""",
        W1=(4, 3, 1, 1),
        Wt=(4, 3, 2, 2),
    )
    graph = analyze(model)
    assert_declined(graph, "y", "grouped or non-constant weight")
    assert_frozen(graph, "a", "grouped or non-constant weight")


# -- Gemm -------------------------------------------------------------------------------------


@pytest.mark.parametrize("trans_b1", [0, 1])
@pytest.mark.parametrize("trans_b2", [0, 1])
def test_gemm_trans_b(trans_b1, trans_b2):
    b1 = (4, 6) if trans_b1 else (6, 4)
    b2 = (5, 4) if trans_b2 else (4, 5)
    model = parse(
        f"""
        g (float[2,6] x) => (float[2,5] y) {{
            h = Gemm<transB={trans_b1}>(x, B1, C1)
            r = Relu(h)
            y = Gemm<transB={trans_b2}>(r, B2, C2)
        }}""",
        B1=b1,
        C1=(4,),
        B2=b2,
        C2=(5,),
    )
    pruned = assert_exact(model, {"h": [0, 3]})
    assert init(pruned, "h:1").shape == ((2, 6) if trans_b1 else (6, 2))
    assert init(pruned, "y:1").shape == ((5, 2) if trans_b2 else (2, 5))


def test_gemm_trans_a_reads_channels_on_axis_0():
    model = parse(
        """
        g (float[2,6] x) => (float[2,5] y) {
            h = Gemm(x, B1, C1)
            ht = Transpose<perm=[1,0]>(h)
            y = Gemm<transA=1>(ht, B2)
        }""",
        B1=(6, 4),
        C1=(1, 4),
        B2=(4, 5),
    )
    pruned = assert_exact(model, {"h": [1]})
    assert init(pruned, "h:2").shape == (1, 3)
    assert init(pruned, "y:1").shape == (3, 5)


def test_gemm_with_non_constant_b_declines():
    model = parse(
        """
        g (float[2,6] x, float[4,5] b) => (float[2,5] y) {
            h = Gemm(x, B1)
            y = Gemm(h, b)
        }""",
        B1=(6, 4),
    )
    assert_declined(analyze(model), "y", "B is not a constant matrix")


def test_gemm_with_channels_off_the_k_axis_declines():
    # h is [4, 4] with channels on axis 1; transA makes axis 0 the K axis
    model = parse(
        """
        g (float[4,6] x) => (float[4,5] y) {
            h = Gemm(x, B1)
            y = Gemm<transA=1>(h, B2)
        }""",
        B1=(6, 4),
        B2=(4, 5),
    )
    graph = analyze(model)
    assert_declined(graph, "y", "channels not on the K axis of A")
    assert_frozen(graph, "h", "not on the K axis")


# -- MatMul with a constant weight ------------------------------------------------------------


def test_matmul_weight_is_a_linear_layer_on_tokens():
    model = parse(
        """
        g (float[1,5,6] x) => (float[1,5,6] y) {
            h = MatMul(x, W1)
            b = Add(h, B1)
            r = Relu(b)
            y = MatMul(r, W2)
        }""",
        W1=(6, 8),
        B1=(8,),
        W2=(8, 6),
    )
    group = group_of(analyze(model), "h")
    assert group.size == 8 and group.consumers == ("y",)
    pruned = assert_exact(model, {"h": [0, 1, 7]})
    assert init(pruned, "h:1").shape == (6, 5)
    assert init(pruned, "b:1").shape == (5,)
    assert init(pruned, "y:1").shape == (5, 6)


def test_matmul_with_3d_weight_declines():
    model = parse(
        """
        g (float[1,5,6] x) => (float[1,5,4] y) {
            h = MatMul(x, W1)
            y = MatMul(h, W2)
        }""",
        W1=(6, 8),
        W2=(1, 8, 4),
    )
    graph = analyze(model)
    assert_declined(graph, "y", "not a 2-D constant")
    assert_frozen(graph, "h", "not a 2-D constant")


def test_matmul_weight_with_channels_off_the_last_axis_declines():
    model = parse(
        """
        g (float[1,5,6] x) => (float[1,8,3] y) {
            h = MatMul(x, W1)
            t = Transpose<perm=[0,2,1]>(h)
            y = MatMul(t, W2)
        }""",
        W1=(6, 8),
        W2=(5, 3),
    )
    assert_declined(analyze(model), "y", "channels not on the last axis")


# -- embedding Gather -------------------------------------------------------------------------


def test_embedding_gather_produces_table_columns():
    model = parse(
        """
        g (int64[1,5] ids) => (float[1,5,4] y) {
            e = Gather(table, ids)
            y = MatMul(e, W)
        }""",
        table=(10, 6),
        W=(6, 4),
    )
    group = group_of(analyze(model), "e")
    assert group.size == 6 and group.consumers == ("y",)
    feeds = {"ids": np.array([[0, 3, 9, 3, 1]], np.int64)}
    pruned = assert_exact(model, {"e": [2, 5]}, feeds)
    assert init(pruned, "e:0").shape == (10, 4)


def test_embedding_from_3d_table_declines():
    model = parse(
        """
        g (int64[1,5] ids) => (float[1,5,2,3] y) {
            y = Gather(table, ids)
        }""",
        table=(10, 2, 3),
    )
    assert_declined(analyze(model), "y", "table is not a 2-D constant")


# -- shared weights ---------------------------------------------------------------------------


@pytest.mark.parametrize("b_weight", ["W1", "w"])
def test_shared_weight_is_copied_before_it_is_sliced(b_weight):
    # the legacy exporter deduplicates equal constants: both convs read W1, directly or
    # through an Identity
    model = parse(
        f"""
        g (float[1,3,6,6] x) => (float[1,5,6,6] y) {{
            w = Identity(W1)
            a = Conv(x, W1)
            b = Conv(x, {b_weight})
            c = Concat<axis=1>(a, b)
            y = Conv(c, W2)
        }}""",
        W1=(4, 3, 1, 1),
        W2=(5, 8, 1, 1),
    )
    pruned = assert_exact(model, {"b": [0, 1]})
    assert init(pruned, "a:1").shape == (4, 3, 1, 1)
    assert init(pruned, "b:1").shape == (2, 3, 1, 1)
