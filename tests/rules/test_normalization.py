"""Normalizations and Softmax (``idap_onnx.oprules.normalization``): per-channel norms are
exact (their parameters are sliced, scale and bias zeroed); LayerNormalization, Softmax and
LpNormalization over the channel axis mix channels, so removal is valid but not exact."""

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


def bn_params(c: int, seed: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "scale": rng.uniform(0.5, 1.5, c).astype(np.float32),
        "bias": rng.standard_normal(c).astype(np.float32),
        "mean": rng.standard_normal(c).astype(np.float32),
        "var": rng.uniform(0.5, 2.0, c).astype(np.float32),
    }


# -- BatchNormalization / InstanceNormalization -----------------------------------------------


@pytest.mark.parametrize("opset", [9, 15])
def test_batch_norm_is_exact(opset):
    model = parse(
        """
        g (float[1,3,6,6] x) => (float[1,5,6,6] y) {
            a = Conv(x, W1)
            bn = BatchNormalization(a, scale, bias, mean, var)
            r = Relu(bn)
            y = Conv(r, W2)
        }""",
        opset,
        W1=(4, 3, 1, 1),
        W2=(5, 4, 1, 1),
        **bn_params(4),
    )
    graph = analyze(model)
    # scale and bias are the producer's parameters (zeroed); mean and var are only sliced
    roles = {e.input: e.role for e in graph.edits if e.node == "bn"}
    assert roles == {1: "producer", 2: "producer", 3: "consumer", 4: "consumer"}
    pruned = assert_exact(model, {"a": [1, 2]})
    for i in range(1, 5):
        assert init(pruned, f"bn:{i}").shape == (2,)


def test_instance_norm_is_exact():
    p = bn_params(4)
    model = parse(
        """
        g (float[1,3,6,6] x) => (float[1,5,6,6] y) {
            a = Conv<pads=[1,1,1,1]>(x, W1, B1)
            n = InstanceNormalization(a, scale, bias)
            y = Conv(n, W2)
        }""",
        W1=(4, 3, 3, 3),
        B1=(4,),
        W2=(5, 4, 1, 1),
        scale=p["scale"],
        bias=p["bias"],
    )
    assert_exact(model, {"a": [0]})


def test_batch_norm_with_non_constant_parameters_declines():
    model = parse(
        """
        g (float[1,3,6,6] x, float[4] scale) => (float[1,4,6,6] y) {
            a = Conv(x, W1)
            y = BatchNormalization(a, scale, bias, mean, var)
        }""",
        W1=(4, 3, 1, 1),
        bias=bn_params(4)["bias"],
        mean=bn_params(4)["mean"],
        var=bn_params(4)["var"],
    )
    graph = analyze(model)
    assert_declined(graph, "y", "non-constant parameters")
    assert_frozen(graph, "a", "non-constant parameters")


def test_batch_norm_with_channels_off_axis_1_declines():
    model = parse(
        """
        g (float[1,3,4,4] x) => (float[1,4,4,4] y) {
            a = Conv(x, W1)
            t = Transpose<perm=[0,2,1,3]>(a)
            y = BatchNormalization(t, scale, bias, mean, var)
        }""",
        W1=(4, 3, 1, 1),
        **bn_params(4),
    )
    assert_declined(analyze(model), "y", "channels not on axis 1")


def test_batch_norm_in_training_mode_declines():
    model = parse(
        """
        g (float[1,3,6,6] x) => (float[1,4,6,6] y, float[4] rm, float[4] rv) {
            a = Conv(x, W1)
            y, rm, rv = BatchNormalization<training_mode=1>(a, scale, bias, mean, var)
        }""",
        15,
        W1=(4, 3, 1, 1),
        **bn_params(4),
    )
    assert_declined(analyze(model), "y", "in training mode")


# -- LayerNormalization (opset 17) and its decomposed form --------------------------------------


def transformer_mlp(norm_lines: str, opset: int = 17, **inits):
    """x [1,5,6] -> MatMul 'h' (8 features) -> <norm_lines: n = ...(h ...)> -> MatMul 'y'."""
    return parse(
        f"""
        g (float[1,5,6] x) => (float[1,5,3] y) {{
            h = MatMul(x, W1)
            {norm_lines}
            y = MatMul(n, W2)
        }}""",
        opset,
        W1=(6, 8),
        W2=(8, 3),
        **inits,
    )


def test_layer_norm_over_channels_is_valid_not_exact():
    model = transformer_mlp("n = LayerNormalization<axis=-1>(h, gamma, beta)",
                            gamma=(8,), beta=(8,))  # fmt: skip
    group = group_of(analyze(model), "h")
    assert group.inexact_reasons == ("LayerNormalization 'n' normalizes over the channel axis",)
    pruned = assert_valid(model, {"h": [0, 7]})
    assert init(pruned, "n:1").shape == init(pruned, "n:2").shape == (6,)


def test_layer_norm_before_the_channel_axis_passes_non_zero_channels():
    # normalizing over W only: channels pass through, but removed channels become non-zero
    model = parse(
        """
        g (float[1,3,6,6] x) => (float[1,5,6,6] y) {
            a = Conv(x, W1, B1)
            n = LayerNormalization<axis=-1>(a, gamma, beta)
            y = Conv(n, W2)
        }""",
        17,
        W1=(4, 3, 1, 1),
        B1=(4,),
        W2=(5, 4, 1, 1),
        gamma=(6,),
        beta=(6,),
    )
    group = group_of(analyze(model), "a")
    assert any("'y' reads non-zero removed channels" in r for r in group.inexact_reasons)
    assert_valid(model, {"a": [3]})


def test_layer_norm_with_non_constant_scale_declines():
    model = parse(
        """
        g (float[1,5,6] x, float[8] gamma) => (float[1,5,8] y) {
            h = MatMul(x, W1)
            y = LayerNormalization<axis=-1>(h, gamma)
        }""",
        17,
        W1=(6, 8),
    )
    assert_declined(analyze(model), "y", "non-constant scale or bias")


def test_layer_norm_over_heads_declines():
    model = parse(
        """
        g (float[1,5,6] x) => (float[1,5,2,4] y) {
            h = MatMul(x, W1)
            r = Reshape(h, shape)
            y = LayerNormalization<axis=-2>(r, gamma)
        }""",
        17,
        W1=(6, 8),
        shape=np.array([1, 5, 2, 4], np.int64),
        gamma=(2, 4),
    )
    assert_declined(analyze(model), "y", "over heads")


@pytest.mark.parametrize("opset", [13, 18])
def test_decomposed_layer_norm_is_valid_not_exact(opset):
    if opset >= 18:
        mean1, mean2 = "ReduceMean(h, last)", "ReduceMean(p, last)"
        inits = {"last": np.array([-1], np.int64)}
    else:
        mean1, mean2 = "ReduceMean<axes=[-1]>(h)", "ReduceMean<axes=[-1]>(p)"
        inits = {}
    model = transformer_mlp(
        f"""
            m = {mean1}
            d = Sub(h, m)
            p = Pow(d, two)
            v = {mean2}
            ve = Add(v, eps)
            s = Sqrt(ve)
            nd = Div(d, s)
            ng = Mul(nd, gamma)
            n = Add(ng, beta)""",
        opset,
        two=np.array(2.0, np.float32),
        eps=np.array(1e-5, np.float32),
        gamma=(8,),
        beta=(8,),
        **inits,
    )
    group = group_of(analyze(model), "h")
    assert not group.exact and not group.frozen
    assert "ReduceMean 'm' reduces over the channel axis" in group.inexact_reasons
    pruned = assert_valid(model, {"h": [1, 2, 3]})
    assert init(pruned, "ng:1").shape == init(pruned, "n:1").shape == (5,)


# -- Softmax (axis semantics change at 13) ----------------------------------------------------


@pytest.mark.parametrize("opset", [11, 13])
@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
def test_softmax_over_channels_is_inexact(opset, op):
    model = transformer_mlp(f"n = {op}<axis=2>(h)", opset)
    group = group_of(analyze(model), "h")
    assert f"{op} 'n' normalizes over the channel axis" in group.inexact_reasons
    assert_valid(model, {"h": [4]})


@pytest.mark.parametrize("opset, over_channels", [(11, True), (13, False)])
def test_softmax_axis_semantics(opset, over_channels):
    # Softmax(axis=1) over [1,5,8] tokens: opset 11 flattens axes [1, 3) into one (the channels
    # are normalized over); opset 13 normalizes over axis 1 only
    model = transformer_mlp("n = Softmax<axis=1>(h)", opset)
    group = group_of(analyze(model), "h")
    assert ("Softmax 'n' normalizes over the channel axis" in group.inexact_reasons) is (
        over_channels
    )
    # either way softmax(0) != 0, so the consumer reads non-zero removed channels
    assert any("'y' reads non-zero removed channels" in r for r in group.inexact_reasons)
    assert_valid(model, {"h": [0, 1]})


def test_lp_normalization_over_another_axis_keeps_zero():
    model = transformer_mlp("n = LpNormalization<axis=1, p=2>(h)")
    assert group_of(analyze(model), "h").exact
    assert_exact(model, {"h": [2, 5]})


def test_lp_normalization_over_channels_is_inexact():
    model = transformer_mlp("n = LpNormalization<axis=-1, p=2>(h)")
    group = group_of(analyze(model), "h")
    assert "LpNormalization 'n' normalizes over the channel axis" in group.inexact_reasons
    assert_valid(model, {"h": [2, 5]})
