"""Data movement (``idap_onnx.oprules.movement``): Transpose, Squeeze/Unsqueeze, Reshape,
Flatten, Concat, Split, Slice, Gather, Expand, Tile, Pad, Resize/Upsample, Shape/Size move,
offset, stride or permute the channel axis; the edits rewrite the constants that spell sizes."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import (
    analyze,
    assert_declined,
    assert_exact,
    assert_frozen,
    assert_valid,
    attr,
    group_of,
    init,
    node,
    parse,
)

INT64_MAX = np.iinfo(np.int64).max


def i64(*values: int) -> np.ndarray:
    return np.array(values, np.int64)


def f32(*values: float) -> np.ndarray:
    return np.array(values, np.float32)


def sandwich(op_lines: str, opset: int = 17, out: str = "1,5,6,6", c: int = 4, **inits):
    """x [1,3,6,6] -> Conv 'a' (c channels) -> <op_lines: t = ...(a ...)> -> Conv 'y'."""
    return parse(
        f"""
        g (float[1,3,6,6] x) => (float[{out}] y) {{
            a = Conv(x, W1, B1)
            {op_lines}
            y = Conv(t, W2)
        }}""",
        opset,
        W1=(c, 3, 1, 1),
        B1=(c,),
        **{"W2": (5, c, 1, 1), **inits},
    )


# -- Transpose --------------------------------------------------------------------------------


def test_transpose_moves_the_channel_axis_nhwc_linear():
    model = parse(
        """
        g (float[1,3,4,4] x) => (float[1,4,4,6] y) {
            a = Conv(x, W1, B1)
            t = Transpose<perm=[0,2,3,1]>(a)
            y = MatMul(t, W2)
        }""",
        W1=(5, 3, 1, 1),
        B1=(5,),
        W2=(5, 6),
    )
    graph = analyze(model)
    assert graph.layouts["t"].axis == 3
    pruned = assert_exact(model, {"a": [0, 4]})
    assert init(pruned, "y:1").shape == (3, 6)


def test_transpose_without_perm_reverses_axes():
    model = sandwich(
        "r = Transpose(a)\n u = Relu(r)\n t = Transpose(u)",
    )
    graph = analyze(model)
    assert graph.layouts["r"].axis == 2 and graph.layouts["t"].axis == 1
    assert_exact(model, {"a": [2]})


# -- Squeeze / Unsqueeze (axes attribute up to opset 12, input from 13) ----------------------


def _axes(opset: int, name: str, values: list[int]) -> tuple[str, dict]:
    """The `<axes=...>` attribute text or the extra input and its initializer."""
    if opset < 13:
        return f"<axes=[{','.join(map(str, values))}]>", "", {}
    return "", f", {name}", {name: i64(*values)}


@pytest.mark.parametrize("opset", [11, 13])
def test_squeeze_then_gemm(opset):
    a_attr, a_in, a_init = _axes(opset, "ax", [2, 3])
    model = parse(
        f"""
        g (float[1,3,6,6] x) => (float[1,5] y) {{
            a = Conv(x, W1, B1)
            p = GlobalAveragePool(a)
            s = Squeeze{a_attr}(p{a_in})
            y = Gemm(s, B2)
        }}""",
        opset,
        W1=(4, 3, 1, 1),
        B1=(4,),
        B2=(4, 5),
        **a_init,
    )
    graph = analyze(model)
    assert graph.layouts["s"].axis == 1
    pruned = assert_exact(model, {"a": [1, 2]})
    assert init(pruned, "y:1").shape == (2, 5)


def test_squeeze_without_axes_drops_all_unit_dims():
    model = parse(
        """
        g (float[1,3,6,6] x) => (float[1,5] y) {
            a = Conv(x, W1, B1)
            p = GlobalAveragePool(a)
            s = Squeeze(p)
            u = Unsqueeze(s, zero)
            y = Gemm(u, B2)
        }""",
        13,
        W1=(4, 3, 1, 1),
        B1=(4,),
        B2=(4, 5),
        zero=i64(0),
    )
    graph = analyze(model)
    assert graph.layouts["s"].axis == 0 and graph.layouts["u"].axis == 1
    assert_exact(model, {"a": [3]})


@pytest.mark.parametrize("opset", [11, 13])
def test_unsqueeze_then_conv(opset):
    a_attr, a_in, a_init = _axes(opset, "ax", [2, 3])
    model = parse(
        f"""
        g (float[1,6] x) => (float[1,5,1,1] y) {{
            h = Gemm(x, B1, C1)
            u = Unsqueeze{a_attr}(h{a_in})
            y = Conv(u, W2)
        }}""",
        opset,
        B1=(6, 4),
        C1=(4,),
        W2=(5, 4, 1, 1),
        **a_init,
    )
    assert analyze(model).layouts["u"].axis == 1
    assert_exact(model, {"h": [0]})


def test_squeeze_of_the_channel_axis_declines():
    model = parse(
        """
        g (float[1,3,6,6] x) => (float[1,6,6] y) {
            a = Conv(x, W1)
            y = Squeeze(a, one)
        }""",
        13,
        W1=(1, 3, 1, 1),
        one=i64(1),
    )
    assert_declined(analyze(model), "y", "removes the channel axis")


def test_unsqueeze_with_runtime_axes_declines():
    model = parse(
        """
        g (float[1,6] x, int64[1] axes) => (float[1,4,1] y) {
            h = Gemm(x, B1)
            y = Unsqueeze(h, axes)
        }""",
        13,
        B1=(6, 4),
    )
    assert_declined(analyze(model), "y", "axes are not constant")


# -- Reshape ----------------------------------------------------------------------------------


@pytest.mark.parametrize("channel_entry", [4, 0, -1])
def test_reshape_keeping_the_channel_axis(channel_entry):
    # ViT patch embedding: [1,C,H,W] -> [1,C,H*W] -> [1,H*W,C] -> linear
    shape = i64(1, channel_entry, 36) if channel_entry != -1 else i64(1, -1, 36)
    model = parse(
        """
        g (float[1,3,6,6] x) => (float[1,36,6] y) {
            a = Conv(x, W1, B1)
            r = Reshape(a, shape)
            t = Transpose<perm=[0,2,1]>(r)
            y = MatMul(t, W2)
        }""",
        W1=(4, 3, 1, 1),
        B1=(4,),
        W2=(4, 6),
        shape=shape,
    )
    graph = analyze(model)
    assert graph.layouts["r"].axis == 1
    pruned = assert_exact(model, {"a": [0, 3]})
    expect = {4: [1, 2, 36], 0: [1, 0, 36], -1: [1, -1, 36]}[channel_entry]
    assert init(pruned, "r:1").tolist() == expect


@pytest.mark.parametrize("channel_entry", [64, -1])
def test_reshape_flattening_channels_repeats_gemm_rows(channel_entry):
    model = parse(
        """
        g (float[1,3,4,4] x) => (float[1,5] y) {
            a = Conv(x, W1, B1)
            r = Reshape(a, shape)
            y = Gemm(r, B2)
        }""",
        W1=(4, 3, 1, 1),
        B1=(4,),
        B2=(64, 5),
        shape=i64(1, channel_entry),
    )
    pruned = assert_exact(model, {"a": [1]})
    assert init(pruned, "y:1").shape == (48, 5)
    assert init(pruned, "r:1").tolist() == ([1, 48] if channel_entry > 0 else [1, -1])


def test_reshape_as_squeeze_and_unsqueeze():
    # [1,C,1,1] -> [1,C] -> Gemm -> [1,F] -> [1,F,1,1]: unit dims around the channels
    model = parse(
        """
        g (float[1,3,6,6] x) => (float[1,5,1,1] y) {
            a = Conv(x, W1, B1)
            p = GlobalAveragePool(a)
            r = Reshape(p, s2)
            h = Gemm(r, B2)
            u = Reshape(h, s4)
            y = Conv(u, W3)
        }""",
        W1=(4, 3, 1, 1),
        B1=(4,),
        B2=(4, 6),
        W3=(5, 6, 1, 1),
        s2=i64(1, 4),
        s4=i64(1, 6, 1, 1),
    )
    pruned = assert_exact(model, {"a": [0], "h": [1, 2]})
    assert init(pruned, "r:1").tolist() == [1, 3]
    assert init(pruned, "u:1").tolist() == [1, 4, 1, 1]


def test_reshape_target_from_a_constant_node_is_rewritten():
    model = parse(
        """
        g (float[1,3,6,6] x) => (float[1,36,6] y) {
            a = Conv(x, W1, B1)
            shape = Constant<value = int64[3] {1, 4, 36}>()
            r = Reshape(a, shape)
            t = Transpose<perm=[0,2,1]>(r)
            y = MatMul(t, W2)
        }""",
        W1=(4, 3, 1, 1),
        B1=(4,),
        W2=(4, 6),
    )
    assert_exact(model, {"a": [0]})


def test_reshape_mixing_the_channel_axis_with_others_declines():
    model = parse(
        """
        g (float[1,3,2,3] x) => (float[1,2,12] y) {
            a = Conv(x, W1)
            y = Reshape(a, shape)
        }""",
        W1=(4, 3, 1, 1),
        shape=i64(1, 2, 12),
    )
    assert_declined(analyze(model), "y", "channel axis mixed with other dims")


def test_reshape_with_runtime_target_declines():
    model = parse(
        """
        g (float[1,3,2,3] x, int64[3] shape) => (float[1,4,6] y) {
            a = Conv(x, W1)
            y = Reshape(a, shape)
        }""",
        W1=(4, 3, 1, 1),
    )
    assert_declined(analyze(model), "y", "target shape computed at run time")


def test_channel_shuffle_of_one_producer_is_exact():
    # ShuffleNet: [N,C,H,W] -> [N,g,C/g,H,W] -> swap g and C/g -> [N,C,H,W]
    model = sandwich(
        "r = Reshape(a, s5)\n p = Transpose<perm=[0,2,1,3,4]>(r)\n t = Reshape(p, s4)",
        c=8,
        out="1,5,6,6",
        s5=i64(1, 2, 4, 6, 6),
        s4=i64(1, 8, 6, 6),
    )
    group = group_of(analyze(model), "a")
    assert not group.frozen
    # every unit holds the same number of channels (g blocks stay equal)
    assert len({len(u[group.spaces[0]]) for u in group.units}) == 1
    assert_exact(model, {"a": [0]})


def test_channel_shuffle_after_concat_couples_the_branches():
    # ShuffleNetV2: cat(branch1, branch2) -> shuffle(2): channel j of both branches go together
    model = parse(
        """
        g (float[1,3,6,6] x) => (float[1,5,6,6] y) {
            a = Conv(x, W1, B1)
            b = Conv(x, W2, B2)
            c = Concat<axis=1>(a, b)
            r = Reshape(c, s5)
            p = Transpose<perm=[0,2,1,3,4]>(r)
            t = Reshape(p, s4)
            y = Conv(t, W3)
        }""",
        W1=(4, 3, 1, 1),
        B1=(4,),
        W2=(4, 3, 1, 1),
        B2=(4,),
        W3=(5, 8, 1, 1),
        s5=i64(1, 2, 4, 6, 6),
        s4=i64(1, 8, 6, 6),
    )
    group = group_of(analyze(model), "a")
    assert group.producers == ("a", "b") and group.size == 4
    assert_exact(model, {"a": [1, 2]})


def test_channel_shuffle_with_runtime_shape_is_exact():
    # torch: x.view(b, g, c // g, h, w).transpose(1, 2).reshape(b, -1, h, w)
    model = sandwich(
        """
            s = Shape(a)
            n = Gather(s, i0)
            c = Gather(s, i1)
            h = Gather(s, i2)
            w = Gather(s, i3)
            cg = Div(c, two)
            n1 = Unsqueeze(n, ax0)
            c1 = Unsqueeze(cg, ax0)
            h1 = Unsqueeze(h, ax0)
            w1 = Unsqueeze(w, ax0)
            s5 = Concat<axis=0>(n1, g2, c1, h1, w1)
            r = Reshape(a, s5)
            p = Transpose<perm=[0,2,1,3,4]>(r)
            s4 = Concat<axis=0>(n1, m1, h1, w1)
            t = Reshape(p, s4)""",
        13,
        c=8,
        i0=np.array(0, np.int64),
        i1=np.array(1, np.int64),
        i2=np.array(2, np.int64),
        i3=np.array(3, np.int64),
        two=np.array(2, np.int64),
        ax0=i64(0),
        g2=i64(2),
        m1=i64(-1),
    )
    graph = analyze(model)
    group = group_of(graph, "a")
    assert not group.frozen, group.frozen_reasons
    assert_exact(model, {"a": [0]})


def split_attention(radix_entry: str):
    """ResNeSt's split attention, radix 2, 3 channels per radix row: a grouped conv (one conv
    group per row), reshaped to rows ``[1, 2, 3, 6, 6]`` (the row length ``radix_entry``), summed
    over the rows, pooled, two 1x1 convs, a softmax over the rows, and the rows weighted and
    summed: ``(x * attn).sum(1)``."""
    return parse(
        f"""
        g (float[1,3,6,6] x) => (float[1,5,6,6] y) {{
            a = Conv(x, W1, B1)
            r = Relu(a)
            gc = Conv<group=2, pads=[1,1,1,1]>(r, Wg, Bg)
            s = Relu(gc)
            {radix_entry}
            rows = Concat<axis=0>(n2, per, hw)
            xs = Reshape(s, rows)
            gap = ReduceSum<keepdims=0>(xs, ax1)
            pooled = GlobalAveragePool(gap)
            f1 = Conv(pooled, Wf1, Bf1)
            fr = Relu(f1)
            f2 = Conv(fr, Wf2, Bf2)
            fv = Reshape(f2, card_radix)
            ft = Transpose<perm=[0,2,1,3]>(fv)
            sm = Softmax<axis=1>(ft)
            flat = Reshape(sm, batch_flat)
            att = Reshape(flat, radix_rows)
            prod = Mul(xs, att)
            out = ReduceSum<keepdims=0>(prod, ax1)
            y = Conv(out, W2)
        }}""",
        W1=(4, 3, 1, 1),
        B1=(4,),
        Wg=(6, 2, 3, 3),
        Bg=(6,),
        Wf1=(4, 3, 1, 1),
        Bf1=(4,),
        Wf2=(6, 4, 1, 1),
        Bf2=(6,),
        W2=(5, 3, 1, 1),
        n2=i64(1, 2),
        hw=i64(6, 6),
        three=i64(3),
        i1=np.array(1, np.int64),
        two=np.array(2, np.int64),
        ax0=i64(0),
        ax1=i64(1),
        card_radix=i64(1, 1, 2, -1),
        batch_flat=i64(1, -1),
        radix_rows=i64(1, 2, -1, 1, 1),
    )


@pytest.mark.parametrize(
    "radix_entry",
    [
        "per = Identity(three)",
        # timm: B, RC, H, W = x.shape; x.reshape(B, radix, RC // radix, H, W)
        """sh = Shape(s)
            rc = Gather(sh, i1)
            half = Div(rc, two)
            per = Unsqueeze(half, ax0)""",
    ],
    ids=["constant", "run time"],
)
def test_split_attention_rows_are_channels_of_every_radix_row(radix_entry):
    model = split_attention(radix_entry)
    graph = analyze(model)
    rows = group_of(graph, "gc")
    assert rows.producers == ("f2", "gc")
    # channel j of each radix row (conv group) is one unit, the attention's too
    assert [sorted(int(c) for c in unit[rows.spaces[0]]) for unit in rows.units] == [
        [0, 3], [1, 4], [2, 5],
    ]  # fmt: skip
    assert group_of(graph, "a").size == 2  # input i of each conv group: [0, 2] and [1, 3]
    pruned = assert_exact(model, {"gc": [1], "a": [0]})
    assert attr(pruned, "gc", "group") == 2  # still one conv group per radix row
    assert init(pruned, "gc:1").shape == (4, 1, 3, 3)
    assert init(pruned, "f2:1").shape == (4, 4, 1, 1)
    assert init(pruned, "y:1").shape == (5, 2, 1, 1)


def test_patch_unfold_and_fold_keep_the_channel_as_a_factor():
    # MobileViT: [B, C, H, W] -> [B*C*nh, ph, nw, pw] -> [B, C, N, P] -> [B*P, N, C], a linear
    # layer on the tokens, then back; B * C * nh read at run time from Shape(a)
    model = parse(
        """
        g (float[1,3,4,4] x) => (float[1,5,4,4] y) {
            a = Conv(x, W1, B1)
            sa = Shape(a)
            b = Gather(sa, i0)
            c = Gather(sa, i1)
            bc = Mul(b, c)
            bcn = Mul(bc, nh)
            lead = Unsqueeze(bcn, ax0)
            unfold = Concat<axis=0>(lead, p_nw_p)
            u1 = Reshape(a, unfold)
            u2 = Transpose<perm=[0,2,1,3]>(u1)
            u3 = Reshape(u2, b_c_n_p)
            u4 = Transpose<perm=[0,3,2,1]>(u3)
            tokens = Reshape(u4, bp_n_c)
            t = MatMul(tokens, Wt)
            f1 = Reshape(t, b_p_n_c)
            f2 = Transpose<perm=[0,3,2,1]>(f1)
            f3 = Reshape(f2, bcn_p_nw_p)
            f4 = Transpose<perm=[0,2,1,3]>(f3)
            f5 = Reshape(f4, b_c_h_w)
            y = Conv(f5, W2)
        }""",
        13,
        W1=(4, 3, 1, 1),
        B1=(4,),
        Wt=(4, 4),
        W2=(5, 4, 1, 1),
        i0=np.array(0, np.int64),
        i1=np.array(1, np.int64),
        nh=np.array(2, np.int64),
        ax0=i64(0),
        p_nw_p=i64(2, 2, 2),
        b_c_n_p=i64(1, 4, 4, 4),
        bp_n_c=i64(4, 4, -1),
        b_p_n_c=i64(1, 4, 4, -1),
        bcn_p_nw_p=i64(8, 2, 2, 2),
        b_c_h_w=i64(1, 4, 4, 4),
    )
    graph = analyze(model)
    assert not graph.declined, graph.declined
    assert not group_of(graph, "a").frozen and not group_of(graph, "t").frozen
    pruned = assert_exact(model, {"a": [1], "t": [0, 2]})
    assert init(pruned, "t:1").shape == (3, 2)
    assert init(pruned, "f3:1").tolist() == [4, 2, 2, 2]  # B * C * nh with 2 of 4 channels
    assert init(pruned, "f5:1").tolist() == [1, 2, 4, 4]
    assert init(pruned, "u3:1").tolist() == [1, 3, 4, 4]
    assert node(pruned, "bcn").op_type == "Mul"  # the run-time entry follows by itself


# -- Flatten ----------------------------------------------------------------------------------


def test_flatten_gemm_repeats_consumer_rows_over_hw():
    model = parse(
        """
        g (float[1,3,2,2] x) => (float[1,5] y) {
            a = Conv(x, W1, B1)
            f = Flatten(a)
            y = Gemm(f, B2, C2)
        }""",
        W1=(4, 3, 1, 1),
        B1=(4,),
        B2=(16, 5),
        C2=(5,),
    )
    graph = analyze(model)
    lay = graph.layouts["f"]
    assert lay.chan.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]
    pruned = assert_exact(model, {"a": [0, 2]})
    b2 = init(model, "B2")
    np.testing.assert_array_equal(init(pruned, "y:1"), np.concatenate([b2[4:8], b2[12:16]]))


def test_global_pool_flatten_gemm():
    model = parse(
        """
        g (float[1,3,6,6] x) => (float[1,5] y) {
            a = Conv(x, W1, B1)
            p = GlobalAveragePool(a)
            f = Flatten(p)
            y = Gemm<transB=1>(f, B2)
        }""",
        W1=(4, 3, 1, 1),
        B1=(4,),
        B2=(5, 4),
    )
    pruned = assert_exact(model, {"a": [3]})
    assert init(pruned, "y:1").shape == (5, 3)


def test_flatten_before_the_channel_axis_declines():
    model = parse(
        """
        g (float[1,3,2,2] x) => (float[4,4] y) {
            a = Conv(x, W1)
            y = Flatten<axis=2>(a)
        }""",
        W1=(4, 3, 1, 1),
    )
    assert_declined(analyze(model), "y", "channel axis before the flatten axis")


# -- Concat -----------------------------------------------------------------------------------


def test_concat_offsets_each_inputs_channels():
    model = parse(
        """
        g (float[1,3,6,6] x) => (float[1,5,6,6] y) {
            a = Conv(x, W1, B1)
            b = Conv(x, W2, B2)
            c = Concat<axis=1>(a, b)
            y = Conv(c, W3)
        }""",
        W1=(4, 3, 1, 1),
        B1=(4,),
        W2=(6, 3, 1, 1),
        B2=(6,),
        W3=(5, 10, 1, 1),
    )
    graph = analyze(model)
    assert group_of(graph, "a").id != group_of(graph, "b").id
    pruned = assert_exact(model, {"a": [1], "b": [0, 5]})
    w3 = init(model, "W3")
    np.testing.assert_array_equal(init(pruned, "y:1"), w3[:, [0, 2, 3, 5, 6, 7, 8]])


def test_concat_with_an_untracked_input_keeps_its_part():
    model = parse(
        """
        g (float[1,3,6,6] x, float[1,2,6,6] z) => (float[1,5,6,6] y) {
            a = Conv(x, W1, B1)
            c = Concat<axis=1>(z, a)
            y = Conv(c, W2)
        }""",
        W1=(4, 3, 1, 1),
        B1=(4,),
        W2=(5, 6, 1, 1),
    )
    pruned = assert_exact(model, {"a": [0]})
    assert init(pruned, "y:1").shape == (5, 5, 1, 1)


def test_concat_on_another_axis_couples_inputs():
    model = parse(
        """
        g (float[1,3,6,6] x) => (float[1,5,12,6] y) {
            a = Conv(x, W1, B1)
            b = Conv(x, W2, B2)
            c = Concat<axis=2>(a, b)
            y = Conv(c, W3)
        }""",
        W1=(4, 3, 1, 1),
        B1=(4,),
        W2=(4, 3, 1, 1),
        B2=(4,),
        W3=(5, 4, 1, 1),
    )
    assert group_of(analyze(model), "a").producers == ("a", "b")
    assert_exact(model, {"b": [1, 2]})


def test_concat_of_different_channel_axes_declines():
    model = parse(
        """
        g (float[1,3,4,4] x) => (float[1,8,4,4] y) {
            a = Conv(x, W1)
            b = Conv(x, W2)
            bt = Transpose<perm=[0,2,1,3]>(b)
            y = Concat<axis=1>(a, bt)
        }""",
        W1=(4, 3, 1, 1),
        W2=(4, 3, 1, 1),
    )
    graph = analyze(model)
    assert_declined(graph, "y", "inputs with different channel axes")
    assert_frozen(graph, "b", "different channel axes")


def test_concat_of_heads_with_channels_declines():
    model = parse(
        """
        g (float[1,5,6] x) => (float[1,5,4,4] y) {
            q = MatMul(x, Wq)
            qh = Reshape(q, s_heads)
            v = MatMul(x, Wv)
            vu = Unsqueeze(v, ax3)
            vt = Tile(vu, reps)
            y = Concat<axis=2>(qh, vt)
        }""",
        Wq=(6, 8),
        Wv=(6, 2),
        s_heads=i64(1, 5, 2, 4),
        ax3=i64(3),
        reps=i64(1, 1, 1, 4),
    )
    graph = analyze(model)
    assert graph.layouts["qh"].fold == 4
    assert_declined(graph, "y", "heads concatenated with channels")


# -- Split (sizes: attribute at 11, input at 13, num_outputs at 18) --------------------------


@pytest.mark.parametrize("opset", [11, 13, 18])
def test_split_sizes_are_rewritten(opset):
    if opset < 13:
        split, inits = "Split<axis=1, split=[3,5]>(a)", {}
    else:
        split, inits = "Split<axis=1>(a, sizes)", {"sizes": i64(3, 5)}
    model = parse(
        f"""
        g (float[1,3,6,6] x) => (float[1,5,6,6] y1, float[1,5,6,6] y2) {{
            a = Conv(x, W1, B1)
            s1, s2 = {split}
            y1 = Conv(s1, W2)
            y2 = Conv(s2, W3)
        }}""",
        opset,
        W1=(8, 3, 1, 1),
        B1=(8,),
        W2=(5, 3, 1, 1),
        W3=(5, 5, 1, 1),
        **inits,
    )
    pruned = assert_exact(model, {"a": [0, 4, 7]})
    if opset < 13:
        assert attr(pruned, "s1", "split") == [2, 3]
    else:
        assert init(pruned, "s1:1").tolist() == [2, 3]
    assert init(pruned, "y1:1").shape == (5, 2, 1, 1)
    assert init(pruned, "y2:1").shape == (5, 3, 1, 1)


@pytest.mark.parametrize("opset", [13, 18])
def test_implicit_equal_split_ties_the_halves(opset):
    split = "Split<axis=1, num_outputs=2>(a)" if opset >= 18 else "Split<axis=1>(a)"
    model = parse(
        f"""
        g (float[1,3,6,6] x) => (float[1,5,6,6] y) {{
            a = Conv(x, W1, B1)
            s1, s2 = {split}
            g1 = Sigmoid(s2)
            t = Mul(s1, g1)
            y = Conv(t, W2)
        }}""",
        opset,
        W1=(8, 3, 1, 1),
        B1=(8,),
        W2=(5, 4, 1, 1),
    )
    group = group_of(analyze(model), "a")
    assert group.size == 4
    assert [sorted(u[group.spaces[0]].tolist()) for u in group.units] == [
        [0, 4], [1, 5], [2, 6], [3, 7],
    ]  # fmt: skip
    assert_exact(model, {"a": [1, 3]})


def test_split_on_another_axis_passes_channels_to_every_output():
    model = parse(
        """
        g (float[1,3,6,6] x) => (float[1,5,6,6] y) {
            a = Conv(x, W1, B1)
            s1, s2 = Split<axis=2>(a)
            c = Concat<axis=2>(s2, s1)
            y = Conv(c, W2)
        }""",
        13,
        W1=(4, 3, 1, 1),
        B1=(4,),
        W2=(5, 4, 1, 1),
    )
    graph = analyze(model)
    assert graph.layouts["s1"].axis == graph.layouts["s2"].axis == 1
    assert_exact(model, {"a": [2]})


def test_split_with_runtime_sizes_declines():
    model = parse(
        """
        g (float[1,3,6,6] x, int64[2] sizes) => (float[1,3,6,6] y1, float[1,5,6,6] y2) {
            a = Conv(x, W1)
            y1, y2 = Split<axis=1>(a, sizes)
        }""",
        13,
        W1=(8, 3, 1, 1),
    )
    assert_declined(analyze(model), "y1", "sizes are not constant")


def test_uneven_implicit_split_declines():
    model = parse(
        """
        g (float[1,3,6,6] x) => (float[1,3,6,6] y1, float[1,2,6,6] y2) {
            a = Conv(x, W1)
            y1, y2 = Split<axis=1, num_outputs=2>(a)
        }""",
        18,
        W1=(5, 3, 1, 1),
    )
    assert_declined(analyze(model), "y1", "uneven implicit split")


# -- Slice ------------------------------------------------------------------------------------


@pytest.mark.parametrize("opset", [10, 13])
@pytest.mark.parametrize("start, end", [(2, 6), (4, INT64_MAX), (-6, -2)])
def test_slice_of_channels_rewrites_bounds(opset, start, end):
    model = sandwich(
        "t = Slice(a, starts, ends, axes)",
        opset,
        c=8,
        W2=(5, len(range(8)[start:end]), 1, 1),
        starts=i64(start),
        ends=i64(end),
        axes=i64(1),
    )
    kept = list(range(8)[start:end])
    removed = [0, kept[0], kept[-1]]
    pruned = assert_exact(model, {"a": removed})
    new_start, new_end = int(init(pruned, "t:1")[0]), int(init(pruned, "t:2")[0])
    left = [c for c in range(8) if c not in removed]
    assert len(left[new_start:new_end]) == len(kept) - 2


def test_slice_of_channels_and_space_rewrites_the_channel_entry_only():
    model = sandwich(
        "t = Slice(a, starts, ends, axes)",
        13,
        c=8,
        out="1,5,4,6",
        W2=(5, 4, 1, 1),
        starts=i64(1, 2),
        ends=i64(5, 6),
        axes=i64(2, 1),
    )
    pruned = assert_exact(model, {"a": [0, 3]})
    assert init(pruned, "t:1").tolist() == [1, 1]
    assert init(pruned, "t:2").tolist() == [5, 4]


def test_slice_on_another_axis_passes_channels():
    model = sandwich(
        "t = Slice(a, starts, ends, axes)",
        13,
        out="1,5,3,6",
        starts=i64(1),
        ends=i64(4),
        axes=i64(2),
    )
    assert analyze(model).layouts["t"].axis == 1
    assert_exact(model, {"a": [0]})


def test_strided_slice_of_channels_declines():
    model = sandwich(
        "t = Slice(a, starts, ends, axes, steps)",
        13,
        c=8,
        W2=(5, 4, 1, 1),
        starts=i64(0),
        ends=i64(8),
        axes=i64(1),
        steps=i64(2),
    )
    assert_declined(analyze(model), "t", "non-constant or strided slice")


def test_slice_with_runtime_bounds_declines():
    model = parse(
        """
        g (float[1,3,6,6] x, int64[1] e) => (float[1,?,6,6] y) {
            a = Conv(x, W1)
            y = Slice(a, starts, e, axes)
        }""",
        13,
        W1=(8, 3, 1, 1),
        starts=i64(0),
        axes=i64(1),
    )
    assert_declined(analyze(model), "y", "computed at run time")


def test_runtime_chunk_glu_ties_the_chunks():
    # torch: a, b = x.chunk(2, dim=1); a * sigmoid(b), bounds computed from Shape(x)[1]
    model = sandwich(
        """
            s = Shape(a)
            c = Gather(s, i1)
            h = Div(c, two)
            h1 = Unsqueeze(h, ax0)
            c1 = Unsqueeze(c, ax0)
            lo = Slice(a, zero, h1, axes)
            hi = Slice(a, h1, c1, axes)
            gate = Sigmoid(hi)
            t = Mul(lo, gate)""",
        13,
        c=8,
        W2=(5, 4, 1, 1),
        i1=np.array(1, np.int64),
        two=np.array(2, np.int64),
        ax0=i64(0),
        zero=i64(0),
        axes=i64(1),
    )
    group = group_of(analyze(model), "a")
    assert not group.frozen, group.frozen_reasons
    assert group.size == 4
    assert_exact(model, {"a": [0, 2]})


# -- Gather -----------------------------------------------------------------------------------


def test_gather_of_a_token_passes_channels():
    # the CLS token: h[:, 0] -> [1, D]
    model = parse(
        """
        g (float[1,5,6] x) => (float[1,3] y) {
            h = MatMul(x, W1)
            cls = Gather<axis=1>(h, zero)
            y = MatMul(cls, W2)
        }""",
        W1=(6, 4),
        W2=(4, 3),
        zero=np.array(0, np.int64),
    )
    assert analyze(model).layouts["cls"].axis == 1
    assert_exact(model, {"h": [1]})


def test_gather_on_the_channel_axis_declines():
    model = parse(
        """
        g (float[1,5,6] x) => (float[1,5] y) {
            h = MatMul(x, W1)
            y = Gather<axis=2>(h, zero)
        }""",
        W1=(6, 4),
        zero=np.array(0, np.int64),
    )
    assert_declined(analyze(model), "y", "removes the channel axis")


# -- Expand / Tile ----------------------------------------------------------------------------


def test_expand_of_unit_dims_passes_channels():
    model = sandwich(
        "p = GlobalAveragePool(a)\n t = Expand(p, shape)",
        shape=i64(1, 1, 6, 6),
    )
    assert_exact(model, {"a": [1]})


def test_expand_to_higher_rank_shifts_the_channel_axis():
    model = parse(
        """
        g (float[1,6] x) => (float[2,1,5] y) {
            h = Gemm(x, B1)
            e = Expand(h, shape)
            y = MatMul(e, W2)
        }""",
        B1=(6, 4),
        W2=(4, 5),
        shape=i64(2, 1, 1),
    )
    assert analyze(model).layouts["e"].axis == 2
    assert_exact(model, {"h": [0]})


def test_expand_to_a_run_time_shape_with_a_unit_channel_entry_passes_channels():
    """``expand(n, 1, h, w)`` built from the input's shape: the channel entry is a 1 the
    graph spells, so the channels broadcast as they are."""
    model = sandwich(
        "p = GlobalAveragePool(a)\n s = Shape(x)\n n = Slice(s, zero, one)\n"
        " hw = Slice(s, two, four)\n target = Concat<axis=0>(n, one, hw)\n t = Expand(p, target)",
        zero=i64(0), one=i64(1), two=i64(2), four=i64(4),
    )
    assert_exact(model, {"a": [1]})


def test_expand_to_a_run_time_shape_spelling_channels_declines():
    model = sandwich(
        "p = GlobalAveragePool(a)\n s = Shape(x)\n n = Slice(s, zero, one)\n"
        " hw = Slice(s, two, four)\n target = Concat<axis=0>(n, four, hw)\n t = Expand(p, target)",
        zero=i64(0), one=i64(1), two=i64(2), four=i64(4),
    )
    assert_declined(analyze(model), "t", "channel entry not a constant 1")


def test_expand_with_channel_count_in_shape_is_rewritten():
    model = sandwich(
        "p = GlobalAveragePool(a)\n t = Expand(p, shape)",
        shape=i64(1, 4, 6, 6),
    )
    pruned = assert_exact(model, {"a": [1]})
    assert init(pruned, "t:1").tolist() == [1, 3, 6, 6]


def test_tile_of_other_axes_passes_channels():
    model = sandwich(
        "t = Tile(a, reps)",
        out="1,5,12,6",
        reps=i64(1, 1, 2, 1),
    )
    assert_exact(model, {"a": [0, 1]})


def test_tile_of_the_channel_axis_declines():
    model = sandwich("t = Tile(a, reps)", reps=i64(1, 2, 1, 1), W2=(5, 8, 1, 1))
    assert_declined(analyze(model), "t", "repeats the channel axis")


# -- Pad (pads attribute at 10, input at 11, axes input at 18) -------------------------------


@pytest.mark.parametrize("opset", [10, 11, 18])
def test_spatial_zero_pad_is_exact(opset):
    if opset < 11:
        line, inits = "t = Pad<pads=[0,0,1,1,0,0,1,1]>(a)", {}
    elif opset < 18:
        line, inits = "t = Pad(a, pads)", {"pads": i64(0, 0, 1, 1, 0, 0, 1, 1)}
    else:
        line, inits = 't = Pad(a, pads, "", axes)', {"pads": i64(1, 1, 1, 1), "axes": i64(2, 3)}
    model = sandwich(line, opset, out="1,5,8,8", **inits)
    assert_exact(model, {"a": [2, 3]})


def test_reflect_pad_is_exact():
    model = sandwich(
        't = Pad<mode="reflect">(a, pads)', out="1,5,8,8", pads=i64(0, 0, 1, 1, 0, 0, 1, 1)
    )
    assert_exact(model, {"a": [0]})


def test_non_zero_pad_value_is_inexact():
    model = sandwich(
        "t = Pad(a, pads, value)",
        out="1,5,8,8",
        pads=i64(0, 0, 1, 1, 0, 0, 1, 1),
        value=np.array(0.5, np.float32),
    )
    assert not group_of(analyze(model), "a").exact
    assert_valid(model, {"a": [0]})


@pytest.mark.parametrize("opset", [11, 18])
def test_pad_of_the_channel_axis_declines(opset):
    if opset < 18:
        line, inits = "t = Pad(a, pads)", {"pads": i64(0, 1, 0, 0, 0, 1, 0, 0)}
    else:
        line, inits = 't = Pad(a, pads, "", axes)', {"pads": i64(1, 1), "axes": i64(1)}
    model = sandwich(line, opset, W2=(5, 6, 1, 1), **inits)
    assert_declined(analyze(model), "t", "pads the channel axis")


def test_pad_with_runtime_pads_declines():
    model = parse(
        """
        g (float[1,3,6,6] x, int64[8] pads) => (float[1,?,?,?] y) {
            a = Conv(x, W1)
            y = Pad(a, pads)
        }""",
        13,
        W1=(4, 3, 1, 1),
    )
    assert_declined(analyze(model), "y", "pads are not constant")


# -- Resize / Upsample ------------------------------------------------------------------------


def test_resize_by_spatial_scales_is_exact():
    model = sandwich(
        't = Resize<mode="nearest">(a, "", scales)', 13, out="1,5,12,12", scales=f32(1, 1, 2, 2)
    )
    assert_exact(model, {"a": [0]})


def test_resize_sizes_get_the_kept_channel_count():
    model = sandwich(
        't = Resize<mode="linear">(a, "", "", sizes)', 13, out="1,5,9,9", sizes=i64(1, 4, 9, 9)
    )
    pruned = assert_exact(model, {"a": [1, 2]})
    assert init(pruned, "t:3").tolist() == [1, 2, 9, 9]


def test_resize_of_the_channel_axis_declines():
    model = sandwich(
        't = Resize<mode="nearest">(a, "", scales)', 13, W2=(5, 8, 1, 1), scales=f32(1, 2, 1, 1)
    )
    assert_declined(analyze(model), "t", "scales the channel axis")


def test_upsample_opset_9_is_exact():
    model = sandwich('t = Upsample<mode="nearest">(a, scales)', 9, out="1,5,12,12",
                     scales=f32(1, 1, 2, 2))  # fmt: skip
    assert_exact(model, {"a": [3]})


# -- Shape / Size -----------------------------------------------------------------------------


def test_shape_of_other_dims_is_harmless():
    model = sandwich(
        "s = Shape(a)\n n = Gather(s, i0)\n t = Relu(a)",
        i0=np.array(0, np.int64),
    )
    assert not group_of(analyze(model), "a").frozen
    assert_exact(model, {"a": [0]})


def test_shape_sliced_before_the_channel_axis_is_harmless():
    model = sandwich(
        "s = Shape<start=2>(a)\n t = Relu(a)",
        15,
    )
    assert not group_of(analyze(model), "a").frozen


def test_shape_sliced_with_a_run_time_end_of_known_length_is_harmless():
    # legacy MHA's unflatten: shape[:dim] with dim computed (Mod) at run time; the slice's
    # length (measured by the shape probe) and its start say it stops before the channels
    model = sandwich(
        """
            s = Shape(a)
            m = Mod(four, three)
            end = Reshape(m, one)
            batch = Slice(s, zero, end)
            target = Concat<axis=0>(batch, c4, hw)
            t = Reshape(a, target)""",
        13,
        four=np.array(4, np.int64),
        three=np.array(3, np.int64),
        one=i64(1),
        zero=i64(0),
        c4=i64(4),
        hw=i64(6, 6),
    )
    assert not group_of(analyze(model), "a").frozen
    pruned = assert_exact(model, {"a": [2]})
    assert init(pruned, "target:1").tolist() == [3]


def test_size_reads_the_channel_count():
    model = parse(
        """
        g (float[1,3,6,6] x) => (float[1,5,6,6] y, int64 n) {
            a = Conv(x, W1)
            n = Size(a)
            y = Conv(a, W2)
        }""",
        W1=(4, 3, 1, 1),
        W2=(5, 4, 1, 1),
    )
    assert_frozen(analyze(model), "a", "Size 'n' reads the channel count")


def test_shape_used_for_another_tensor_fixes_channels():
    model = parse(
        """
        g (float[1,3,6,6] x) => (float[1,5,6,6] y, float[1,4,6,6] z) {
            a = Conv(x, W1)
            s = Shape(a)
            z = ConstantOfShape(s)
            y = Conv(a, W2)
        }""",
        W1=(4, 3, 1, 1),
        W2=(5, 4, 1, 1),
    )
    assert_frozen(analyze(model), "a", "ConstantOfShape 'z' uses the channel count of 'a'")


def test_shape_with_negative_start_reading_the_channel_dim_fixes_channels():
    model = parse(
        """
        g (float[1,3,6,6] x) => (float[1,5,6,6] y, float[4,6,6] z) {
            a = Conv(x, W1)
            s = Shape<start=-3>(a)
            z = ConstantOfShape(s)
            y = Conv(a, W2)
        }""",
        15,
        W1=(4, 3, 1, 1),
        W2=(5, 4, 1, 1),
    )
    assert_frozen(analyze(model), "a", "ConstantOfShape 'z' uses the channel count of 'a'")


def test_shape_of_leading_dims_with_negative_end_is_harmless():
    # torch: h.view(*h.shape[:-1], -1)
    model = parse(
        """
        g (float[1,5,6] x) => (float[1,5,3] y) {
            h = MatMul(x, W1)
            s = Shape<end=-1>(h)
            target = Concat<axis=0>(s, minus1)
            r = Reshape(h, target)
            y = MatMul(r, W2)
        }""",
        15,
        W1=(6, 8),
        W2=(8, 3),
        minus1=i64(-1),
    )
    assert not group_of(analyze(model), "h").frozen
    assert_exact(model, {"h": [0, 5]})
