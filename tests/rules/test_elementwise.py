"""Element-wise rules (``idap_onnx.oprules.elementwise``): unary ops pass channels through,
binary ops couple their inputs channel by channel; zero preservation decides exactness."""

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
    init,
    parse,
)


def sandwich(op_line: str, opset: int = 17, **inits):
    """x -> Conv 'a' (4 channels) -> <op_line: t = ...(a ...)> -> Conv 'y'."""
    return parse(
        f"""
        g (float[1,3,6,6] x) => (float[1,5,6,6] y) {{
            a = Conv(x, W1, B1)
            {op_line}
            y = Conv(t, W2)
        }}""",
        opset,
        W1=(4, 3, 1, 1),
        B1=(4,),
        W2=(5, 4, 1, 1),
        **inits,
    )


# -- unary -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "op_line, opset",
    [
        ("t = Relu(a)", 17),
        ("t = LeakyRelu<alpha=0.1>(a)", 17),
        ("t = Tanh(a)", 17),
        ("t = Elu(a)", 17),
        ("t = HardSwish(a)", 17),
        ("t = Neg(a)", 17),
        ("t = Abs(a)", 17),
        ("t = Identity(a)", 17),
        ("t = Dropout(a)", 17),
        ("t = Erf(a)", 17),
        ("t = Gelu(a)", 20),
    ],
)
def test_zero_preserving_unary_is_exact(op_line, opset):
    model = sandwich(op_line, opset)
    group = group_of(analyze(model), "a")
    assert group.size == 4 and group.consumers == ("y",)
    assert_exact(model, {"a": [1, 3]})


@pytest.mark.parametrize("op", ["Sigmoid", "Exp", "Softplus", "HardSigmoid"])
def test_not_zero_preserving_unary_is_inexact(op):
    model = sandwich(f"t = {op}(a)")
    group = group_of(analyze(model), "a")
    assert not group.exact
    assert any("'y' reads non-zero removed channels" in r for r in group.inexact_reasons)
    assert_valid(model, {"a": [0]})


def test_silu_as_mul_of_sigmoid_is_exact():
    model = sandwich("s = Sigmoid(a)\n t = Mul(a, s)")
    assert_exact(model, {"a": [0, 2]})


# -- Clip (min/max attributes up to opset 10, inputs from 11) -----------------------------------


@pytest.mark.parametrize("opset", [10, 11, 13])
@pytest.mark.parametrize("lo, hi, exact", [(0.0, 6.0, True), (-1.0, 1.0, True), (0.5, 6.0, False)])
def test_clip_exact_iff_zero_in_range(opset, lo, hi, exact):
    if opset < 11:
        line = f"t = Clip<min={lo}, max={hi}>(a)"
        model = sandwich(line, opset)
    else:
        model = sandwich(
            "t = Clip(a, lo, hi)", opset, lo=np.array(lo, np.float32), hi=np.array(hi, np.float32)
        )
    group = group_of(analyze(model), "a")
    assert group.exact is exact
    if exact:
        assert_exact(model, {"a": [1]})
    else:
        assert_valid(model, {"a": [1]})


def test_clip_without_bounds_is_exact():
    model = sandwich("t = Clip(a)", 13)
    assert_exact(model, {"a": [0]})


def test_clip_with_runtime_min_is_not_exact():
    model = parse(
        """
        g (float[1,3,6,6] x, float lo) => (float[1,5,6,6] y) {
            a = Conv(x, W1, B1)
            t = Clip(a, lo)
            y = Conv(t, W2)
        }""",
        13,
        W1=(4, 3, 1, 1),
        B1=(4,),
        W2=(5, 4, 1, 1),
    )
    assert not group_of(analyze(model), "a").exact


# -- PRelu ------------------------------------------------------------------------------------


def test_prelu_per_channel_slope_is_sliced():
    model = sandwich("t = PRelu(a, slope)", slope=(4, 1, 1))
    pruned = assert_exact(model, {"a": [0, 3]})
    assert init(pruned, "t:1").shape == (2, 1, 1)


def test_prelu_shared_slope_is_untouched():
    model = sandwich("t = PRelu(a, slope)", slope=(1,))
    pruned = assert_exact(model, {"a": [2]})
    assert init(pruned, "t:1").shape == (1,)


# -- binary ops -------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["Add", "Sub", "Max", "Min"])
def test_residual_couples_two_producers(op):
    model = parse(
        f"""
        g (float[1,3,6,6] x) => (float[1,5,6,6] y) {{
            a = Conv(x, W1, B1)
            b = Conv<pads=[1,1,1,1]>(x, W2, B2)
            t = {op}(a, b)
            y = Conv(t, W3)
        }}""",
        W1=(4, 3, 1, 1),
        B1=(4,),
        W2=(4, 3, 3, 3),
        B2=(4,),
        W3=(5, 4, 1, 1),
    )
    graph = analyze(model)
    group = group_of(graph, "a")
    assert group.id == group_of(graph, "b").id
    assert group.producers == ("a", "b") and group.size == 4
    pruned = assert_exact(model, {"a": [0, 1]})
    assert init(pruned, "a:1").shape[0] == init(pruned, "b:1").shape[0] == 2


@pytest.mark.parametrize("op", ["Sum", "Mean"])
def test_variadic_sum_mean_couple_all_inputs(op):
    model = parse(
        f"""
        g (float[1,3,6,6] x) => (float[1,5,6,6] y) {{
            a = Conv(x, W1)
            b = Conv(x, W2)
            c = Conv(x, W3)
            t = {op}(a, b, c)
            y = Conv(t, W4)
        }}""",
        W1=(4, 3, 1, 1),
        W2=(4, 3, 1, 1),
        W3=(4, 3, 1, 1),
        W4=(5, 4, 1, 1),
    )
    assert group_of(analyze(model), "a").producers == ("a", "b", "c")
    assert_exact(model, {"c": [3]})


def test_add_per_channel_constant_is_sliced():
    model = sandwich("t = Add(a, bias)", bias=(1, 4, 1, 1))
    pruned = assert_exact(model, {"a": [1]})
    assert init(pruned, "t:1").shape == (1, 3, 1, 1)


@pytest.mark.parametrize("kind", ["scalar constant", "broadcast input"])
def test_add_of_broadcast_operand_makes_removed_channels_nonzero(kind):
    if kind == "scalar constant":
        model = sandwich("t = Add(a, c)", c=np.array([0.7], np.float32))
    else:
        model = parse(
            """
            g (float[1,3,6,6] x, float[1,1,6,6] c) => (float[1,5,6,6] y) {
                a = Conv(x, W1, B1)
                t = Add(a, c)
                y = Conv(t, W2)
            }""",
            W1=(4, 3, 1, 1),
            B1=(4,),
            W2=(5, 4, 1, 1),
        )
    # a + c reads c at removed channels, and y contracts them: pruning is not exact
    assert not group_of(analyze(model), "a").exact
    assert_valid(model, {"a": [1]})


def test_add_of_broadcast_operand_prunes_validly():
    model = sandwich("t = Add(a, c)", c=np.array([0.7], np.float32))
    pruned = assert_valid(model, {"a": [1]})
    assert init(pruned, "t:1").shape == (1,)


def test_where_with_constant_condition_is_exact():
    cond = np.array([True, False, True, False]).reshape(4, 1, 1)
    model = parse(
        """
        g (float[1,3,6,6] x) => (float[1,5,6,6] y) {
            a = Conv(x, W1, B1)
            b = Conv(x, W2, B2)
            t = Where(cond, a, b)
            y = Conv(t, W3)
        }""",
        cond=cond,
        W1=(4, 3, 1, 1),
        B1=(4,),
        W2=(4, 3, 1, 1),
        B2=(4,),
        W3=(5, 4, 1, 1),
    )
    pruned = assert_exact(model, {"a": [0, 1]})
    assert init(pruned, "t:0").shape == (2, 1, 1)


def test_add_with_untracked_full_size_tensor_fixes_channels():
    model = parse(
        """
        g (float[1,3,6,6] x, float[1,4,6,6] skip) => (float[1,5,6,6] y) {
            a = Conv(x, W1)
            t = Add(a, skip)
            y = Conv(t, W2)
        }""",
        W1=(4, 3, 1, 1),
        W2=(5, 4, 1, 1),
    )
    assert_frozen(analyze(model), "a", "combines channels with untracked 'skip'")


def test_add_of_unaligned_channel_axes_declines():
    # b has its channels on axis 2 after the Transpose; both tensors are [1,4,4,4]
    model = parse(
        """
        g (float[1,3,4,4] x) => (float[1,5,4,4] y) {
            a = Conv(x, W1)
            b = Conv(x, W2)
            bt = Transpose<perm=[0,2,1,3]>(b)
            t = Add(a, bt)
            y = Conv(t, W3)
        }""",
        W1=(4, 3, 1, 1),
        W2=(4, 3, 1, 1),
        W3=(5, 4, 1, 1),
    )
    graph = analyze(model)
    assert_declined(graph, "t", "combines unaligned channel axes")
    assert_frozen(graph, "a", "unaligned")
    assert_frozen(graph, "b", "unaligned")


# -- Mul: SE gating ---------------------------------------------------------------------------


def se_block():
    return parse(
        """
        g (float[1,3,6,6] x) => (float[1,5,6,6] y) {
            trunk = Conv<pads=[1,1,1,1]>(x, W1, B1)
            act = Relu(trunk)
            pooled = GlobalAveragePool(act)
            squeeze = Conv(pooled, Wsq, Bsq)
            sr = Relu(squeeze)
            excite = Conv(sr, Wex, Bex)
            gate = Sigmoid(excite)
            t = Mul(act, gate)
            y = Conv(t, W2)
        }""",
        W1=(8, 3, 3, 3),
        B1=(8,),
        Wsq=(2, 8, 1, 1),
        Bsq=(2,),
        Wex=(8, 2, 1, 1),
        Bex=(8,),
        W2=(5, 8, 1, 1),
    )


def test_se_gating_couples_trunk_and_excitation():
    model = se_block()
    graph = analyze(model)
    trunk = group_of(graph, "trunk")
    assert trunk.producers == ("excite", "trunk")
    assert set(trunk.consumers) == {"squeeze", "y"}
    assert trunk.size == 8
    # the gate is sigmoid(0) = 0.5 at removed channels, but the trunk there is zero: exact
    pruned = assert_exact(model, {"trunk": [0, 5, 7]})
    assert init(pruned, "excite:1").shape == (5, 2, 1, 1)
    assert init(pruned, "squeeze:1").shape == (2, 5, 1, 1)


def test_se_squeeze_channels_are_their_own_exact_group():
    model = se_block()
    assert group_of(analyze(model), "squeeze").size == 2
    assert_exact(model, {"squeeze": [1]})


def test_mul_by_per_channel_constant_is_sliced():
    model = sandwich("t = Mul(a, scale)", scale=(4, 1, 1))
    pruned = assert_exact(model, {"a": [0]})
    assert init(pruned, "t:1").shape == (3, 1, 1)


# -- Div / Pow --------------------------------------------------------------------------------


def test_div_by_per_channel_constant_is_exact():
    divisor = np.array([1.0, 2.0, 4.0, 8.0], np.float32).reshape(4, 1, 1)
    model = sandwich("t = Div(a, d)", d=divisor)
    graph = analyze(model)
    # the divisor is a consumer-side parameter: sliced by pruning, never zeroed (x / 0)
    (edit,) = [e for e in graph.edits if e.node == "t"]
    assert edit.role == "consumer"
    pruned = assert_exact(model, {"a": [1, 2]})
    np.testing.assert_array_equal(init(pruned, "t:1").ravel(), [1.0, 8.0])


def test_div_of_constant_by_channels_is_inexact():
    model = sandwich("t = Div(one, a)", one=np.array(1.0, np.float32))
    assert not group_of(analyze(model), "a").exact


def test_div_by_tracked_tensor_is_inexact():
    model = sandwich("e = Exp(a)\n t = Div(a, e)")
    group = group_of(analyze(model), "a")
    assert not group.exact
    assert_valid(model, {"a": [0]})


def test_pow_square_is_exact():
    model = sandwich("t = Pow(a, two)", two=np.array(2.0, np.float32))
    assert_exact(model, {"a": [3]})


@pytest.mark.parametrize("exponent", [-1.0, 0.0])
def test_pow_with_non_positive_exponent_is_not_exact(exponent):
    model = sandwich("t = Pow(a, e)", e=np.array(exponent, np.float32))
    assert not group_of(analyze(model), "a").exact


# -- a class token expanded to the batch at run time -------------------------------------------

# A ViT front: patches [1,6,4] -> tokens [1,4,6]; the class token [1,1,6] expanded to
# [n,1,6] and put before them on the token axis; a position embedding; a head over the width.
VIT_FRONT = """
    g (float[1,3,4,4] x) => (float[1,5,5] y) {{
        h = Conv<strides=[2,2]>(x, Wp)
        f = Reshape(h, flat)
        t = Transpose<perm=[0,2,1]>(f)
        {target}
        cls = Expand(class_token, target)
        z = Concat<axis=1>(cls, t)
        p = Add(z, pos)
        y = MatMul(p, W2)
    }}"""


def vit_front(target: str, **inits):
    return parse(VIT_FRONT.format(target=target), Wp=(6, 3, 2, 2), flat=np.array([1, 6, 4]),
                 class_token=(1, 1, 6), pos=(1, 5, 6), W2=(6, 5), **inits)


ONE = np.array([1], np.int64)
DYNAMO_TARGET = """
        n = Shape<start=0, end=1>(x)
        target = Concat<axis=0>(n, one, one)"""
# torch.onnx's legacy expand(n, -1, -1): Where(Equal(s, -1), ones, s) over s = [n, -1, -1]
LEGACY_TARGET = """
        xs = Shape(t)
        n0 = Gather(xs, zero)
        n = Unsqueeze(n0, zero1)
        s0 = Concat<axis=0>(n, minus, minus)
        s = Reshape(s0, minus)
        ss = Shape(s)
        ones = ConstantOfShape<value=int64[1] {1}>(ss)
        neg = Mul(ones, minus)
        eq = Equal(s, neg)
        target = Where(eq, ones, s)"""


@pytest.mark.parametrize("style", ["dynamo", "legacy"])
def test_a_class_token_expanded_at_run_time_is_sliced_with_the_width(style):
    """The target's channel entry is a 1 the graph spells (``shape_values``): the token
    broadcasts its own width, so slicing it with the residual width is exact."""
    if style == "dynamo":
        model = vit_front(DYNAMO_TARGET, one=ONE)
    else:
        model = vit_front(LEGACY_TARGET, zero=np.array(0, np.int64), zero1=np.array([0]),
                          minus=np.array([-1], np.int64))
    group = group_of(analyze(model), "h")
    assert not group.frozen, group.frozen_reasons
    pruned = assert_exact(model, {"h": [1, 4]})
    assert init(pruned, "cls:0").shape == (1, 1, 4)
    assert init(pruned, "p:1").shape == (1, 5, 4)


def test_a_run_time_target_that_spells_the_width_is_frozen():
    """``expand(n, 1, 6)``: the 6 inside a run-time shape is not rewritten (yet), so the
    width stays fixed, with a reason naming the token."""
    model = vit_front(DYNAMO_TARGET.replace("one, one)", "one, six)"), one=ONE,
                      six=np.array([6], np.int64))
    assert_frozen(analyze(model), "h", "untracked 'cls'")
