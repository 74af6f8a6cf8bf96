"""Metrics on hand-made arrays, and the Evaluator on tiny hand-built ONNX models."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from idap_onnx import metrics
from idap_onnx.metrics import (
    Evaluation,
    Evaluator,
    agreement,
    cosine,
    per_sample,
    rel_l2,
    top1,
)

# ----------------------------------------------------------------------------------- metrics


def test_top1():
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 5.0], [9.0, 0.0, 0.0]])
    assert top1(logits, np.array([0, 1, 2, 0])) == 1.0
    assert top1(logits, np.array([0, 1, 2, 1])) == 0.75
    assert top1(logits, np.array([1, 0, 0, 1])) == 0.0
    # per-batch chunks give the same as the concatenation
    assert top1([logits[:1], logits[1:]], np.array([0, 1, 2, 1])) == 0.75
    # one-hot labels
    assert top1(logits, np.eye(3)[[0, 1, 0, 0]]) == 0.75
    with pytest.raises(ValueError):
        top1(logits, np.array([0, 1]))


def test_agreement():
    ref = np.array([[2.0, 1.0], [0.0, 3.0], [1.0, 0.5], [0.0, 0.1]])
    assert agreement(ref, ref) == 1.0
    cand = ref.copy()
    cand[0] = [0.0, 1.0]  # flips sample 0
    assert agreement(cand, ref) == 0.75
    assert agreement(-ref, ref) == 0.0
    assert agreement([cand[:2], cand[2:]], ref) == 0.75
    # scaling logits keeps every prediction
    assert agreement(ref * 7.0 + 1.0, ref) == 1.0


def test_rel_l2():
    y0 = np.array([[3.0, 4.0]])  # ||y0|| = 5
    assert rel_l2(y0, y0) == 0.0
    assert rel_l2(np.array([[3.0, 5.0]]), y0) == pytest.approx(1.0 / 5.0)
    assert rel_l2(np.zeros_like(y0), y0) == pytest.approx(1.0)
    # pooled over all arrays: sqrt((1 + 4) / (25 + 100))
    y0b = np.array([[6.0, 8.0]])
    got = rel_l2([np.array([[3.0, 5.0]]), np.array([[6.0, 10.0]])], [y0, y0b])
    assert got == pytest.approx(math.sqrt(5.0 / 125.0))
    # zero reference: absolute error
    assert rel_l2(np.array([3.0, 4.0]), np.zeros(2)) == pytest.approx(5.0)
    with pytest.raises(ValueError):
        rel_l2(np.zeros(3), np.zeros(2))


def test_cosine():
    e0 = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    assert cosine(e0, e0) == pytest.approx(1.0)
    assert cosine(3.0 * e0, e0) == pytest.approx(1.0)  # scale-invariant
    assert cosine(-e0, e0) == pytest.approx(-1.0)
    e = np.array([[0.0, 1.0], [0.0, 2.0], [1.0, 0.0]])  # 0, 1, 1/sqrt(2)
    assert cosine(e, e0) == pytest.approx((0.0 + 1.0 + 1.0 / math.sqrt(2.0)) / 3.0)
    # samples are flattened: [N, T, D] works and matches the 2-D form
    assert cosine(e.reshape(3, 1, 2), e0.reshape(3, 1, 2)) == pytest.approx(cosine(e, e0))
    # chunks are weighted by their sample count
    assert cosine([e[:1], e[1:]], [e0[:1], e0[1:]]) == pytest.approx(cosine(e, e0))
    # zero vectors: both zero agree, one zero does not
    assert cosine(np.zeros((1, 2)), np.zeros((1, 2))) == 1.0
    assert cosine(np.zeros((1, 2)), np.ones((1, 2))) == 0.0
    # a NaN sample makes the mean NaN (never a silent pass)
    assert math.isnan(cosine(np.array([[np.nan, 1.0], [1.0, 0.0]]), np.ones((2, 2))))


def test_looks_like_logits():
    assert metrics.looks_like_logits(np.zeros((4, 10), np.float32))
    assert not metrics.looks_like_logits(np.zeros((4, 1), np.float32))
    assert not metrics.looks_like_logits(np.zeros((4, 3, 10), np.float32))
    assert not metrics.looks_like_logits(np.zeros((4, 10), np.int64))


# --------------------------------------------------------------------------------- Evaluator


def _linear_model(w: np.ndarray, b: np.ndarray, extra_output: bool = False) -> onnx.ModelProto:
    """``y = x @ w + b`` (and optionally ``z = relu(y)`` as a second output)."""
    d_in, d_out = w.shape
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["xw"], name="mm"),
        helper.make_node("Add", ["xw", "b"], ["y"], name="add"),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", d_out])]
    if extra_output:
        nodes.append(helper.make_node("Relu", ["y"], ["z"], name="relu"))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", d_out]))
    graph = helper.make_graph(
        nodes,
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", d_in])],
        outputs,
        [
            numpy_helper.from_array(w.astype(np.float32), "w"),
            numpy_helper.from_array(b.astype(np.float32), "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(6, 4))
    b = rng.normal(size=4)
    x = rng.normal(size=(40, 6)).astype(np.float32)
    batches = [{"x": x[i : i + 16]} for i in range(0, 40, 16)]  # 16, 16, 8
    logits = x.astype(np.float64) @ w + b
    labels = np.argmax(logits, axis=1)
    labels[:4] = (labels[:4] + 1) % 4  # the original gets 36/40 right
    return w, b, x, batches, labels


@pytest.mark.parametrize("metric", ["top1", "agreement", "rel-l2", "cosine"])
def test_evaluator_identical_model_drops_nothing(setup, metric, tmp_path):
    w, b, _, batches, labels = setup
    original = _linear_model(w, b)
    ev = Evaluator(original, batches, labels=labels, metric=metric)
    assert ev.n_samples == 40
    assert ev.higher_is_better == (metric != "rel-l2")
    expected = {"top1": 0.9, "agreement": 1.0, "rel-l2": 0.0, "cosine": 1.0}[metric]
    assert ev.original_metric == pytest.approx(expected)
    # the same model, from a path and as a fresh proto
    path = tmp_path / "same.onnx"
    onnx.save(original, str(path))
    for cand in (path, _linear_model(w, b)):
        res = ev.evaluate(cand)
        assert isinstance(res, Evaluation)
        assert res.rel_error == 0.0
        assert res.agreement == 1.0
        assert ev.drop(res) == pytest.approx(0.0, abs=1e-9)
        assert ev.within(res, 0.0 if metric == "rel-l2" else 1e-9)


@pytest.mark.parametrize("metric", ["top1", "agreement", "rel-l2", "cosine"])
def test_evaluator_perturbed_model_drops(setup, metric):
    w, b, x, batches, labels = setup
    ev = Evaluator(_linear_model(w, b), batches, labels=labels, metric=metric)
    w2 = w.copy()
    w2[:, 0] *= -1.0  # changes predictions
    res = ev.evaluate(_linear_model(w2, b))
    y0 = x.astype(np.float64) @ w + b
    y = x.astype(np.float64) @ w2 + b
    assert res.rel_error == pytest.approx(np.linalg.norm(y - y0) / np.linalg.norm(y0), rel=1e-5)
    assert res.agreement == pytest.approx(agreement(y, y0))
    assert res.agreement < 1.0
    drop = ev.drop(res)
    assert drop > 0.0
    if metric == "top1":
        assert drop == pytest.approx((0.9 - top1(y, labels)) * 100.0)
    elif metric == "agreement":
        assert drop == pytest.approx((1.0 - res.agreement) * 100.0)
    elif metric == "rel-l2":
        assert drop == pytest.approx(res.rel_error)
    else:
        assert drop == pytest.approx((1.0 - cosine(y, y0)) * 100.0, rel=1e-5)


def test_evaluator_non_logits_output_has_no_agreement():
    rng = np.random.default_rng(1)
    w, b = rng.normal(size=(5, 1)), rng.normal(size=1)
    batches = [{"x": rng.normal(size=(8, 5)).astype(np.float32)}]
    ev = Evaluator(_linear_model(w, b), batches, metric="rel-l2")
    assert not ev.output_is_logits
    assert ev.evaluate(_linear_model(w * 1.1, b)).agreement is None
    with pytest.raises(ValueError, match="logits"):
        Evaluator(_linear_model(w, b), batches, metric="agreement")


def test_evaluator_nan_candidate_has_infinite_drop(setup):
    w, b, _, batches, labels = setup
    ev = Evaluator(_linear_model(w, b), batches, labels=labels, metric="cosine")
    res = ev.evaluate(_linear_model(w, b * np.nan))
    assert ev.drop(res) == math.inf
    assert not ev.within(res, 100.0)


def test_evaluator_callable_metric(setup):
    w, b, x, batches, labels = setup
    seen = {}

    def mean_abs_z(outputs, ref_outputs, labels_):
        seen["n_out"] = len(outputs)
        seen["shapes"] = [o.shape for o in outputs]
        seen["labels"] = labels_
        # judges graph output 1 (relu) against the original's
        return -float(np.mean(np.abs(outputs[1] - ref_outputs[1])))

    ev = Evaluator(_linear_model(w, b, extra_output=True), batches, labels, metric=mean_abs_z)
    assert ev.metric_name == "mean_abs_z"
    assert ev.higher_is_better
    assert seen["n_out"] == 2 and seen["shapes"] == [(40, 4), (40, 4)]
    assert seen["labels"] is labels or np.array_equal(seen["labels"], labels)
    assert ev.original_metric == 0.0
    same = ev.evaluate(_linear_model(w, b, extra_output=True))
    assert ev.drop(same) == 0.0
    pert = ev.evaluate(_linear_model(w, b + 0.5, extra_output=True))
    z0 = np.maximum(x.astype(np.float64) @ w + b, 0)
    z = np.maximum(x.astype(np.float64) @ w + b + 0.5, 0)
    assert ev.drop(pert) == pytest.approx(float(np.mean(np.abs(z - z0))), rel=1e-5)
    assert pert.rel_error > 0.0

    # lower-is-better callable
    ev2 = Evaluator(
        _linear_model(w, b, extra_output=True),
        batches,
        metric=lambda o, r, _l: rel_l2(o[0], r[0]),
        higher_is_better=False,
    )
    assert not ev2.higher_is_better
    pert2 = ev2.evaluate(_linear_model(w, b + 0.5, extra_output=True))
    assert ev2.drop(pert2) == pytest.approx(pert2.rel_error)


def test_evaluator_usage_errors(setup):
    w, b, _, batches, labels = setup
    model = _linear_model(w, b)
    with pytest.raises(ValueError, match="unknown metric"):
        Evaluator(model, batches, labels, metric="top5")
    with pytest.raises(ValueError, match="labels"):
        Evaluator(model, batches, metric="top1")
    with pytest.raises(ValueError):
        Evaluator(model, batches, labels[:10], metric="top1")
    with pytest.raises(ValueError, match="batch"):
        Evaluator(model, [], metric="agreement")
    with pytest.raises(ValueError, match="lack"):
        Evaluator(model, [{"y": np.zeros((2, 6), np.float32)}])
    # a single dict is one batch; extra keys are ignored
    ev = Evaluator(model, {"x": batches[0]["x"], "unused": np.zeros(3)})
    assert ev.n_samples == 16
    # a candidate whose judged output changed shape cannot be compared
    with pytest.raises(ValueError, match="shape"):
        ev.evaluate(_linear_model(np.zeros((6, 3)), np.zeros(3)))


@pytest.mark.parametrize("metric", ["top1", "agreement", "cosine"])
def test_per_sample_values_average_to_the_metric(setup, metric):
    w, b, x, batches, labels = setup
    ev = Evaluator(_linear_model(w, b), batches, labels=labels, metric=metric)
    w2 = w.copy()
    w2[:, 0] *= -1.0
    candidate = _linear_model(w2, b)
    evaluation, values = ev.evaluate_per_sample(candidate)
    assert values.shape == (40,)
    assert evaluation == ev.evaluate(candidate)
    assert values.mean() == pytest.approx(ev.evaluate(candidate).metric, rel=1e-6)
    y0, y = x.astype(np.float64) @ w + b, x.astype(np.float64) @ w2 + b
    if metric == "cosine":  # sample i's own cosine
        a, a0 = y[3], y0[3]
        assert values[3] == pytest.approx(a @ a0 / np.linalg.norm(a) / np.linalg.norm(a0))
    else:
        assert set(np.unique(values)) <= {0.0, 1.0}


def test_rel_l2_and_callables_have_no_per_sample_values(setup):
    w, b, _, batches, labels = setup
    with pytest.raises(ValueError, match="no per-sample"):
        Evaluator(_linear_model(w, b), batches, metric="rel-l2").evaluate_per_sample(
            _linear_model(w, b)
        )
    with pytest.raises(ValueError, match="no per-sample"):
        per_sample("rel-l2", np.ones((2, 3)), np.ones((2, 3)))
    with pytest.raises(ValueError, match="labels"):
        per_sample("top1", np.ones((2, 3)), np.ones((2, 3)))
