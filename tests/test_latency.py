"""Latency measured side by side (``idap_onnx.deploy.latency``): the report's shape, the feed taken
from real data, and clear errors. Figures themselves are never asserted (timings belong in
``tools/`` benchmarks); the structure and the arithmetic are."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from idap_onnx.deploy.latency import LatencyUnavailable, example_feed, measure, tensorrt_available
from idap_onnx.errors import IdapError


def _mlp(hidden: int, batch: int | str = "N") -> onnx.ModelProto:
    """x[N, 32] -> MatMul(32 x hidden) -> Relu -> MatMul(hidden x 10) -> y."""
    rng = np.random.default_rng(hidden)
    w1 = numpy_helper.from_array(rng.standard_normal((32, hidden)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((hidden, 10)).astype(np.float32), "w2")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "w2"], ["y"]),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 10])],
        [w1, w2],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _batches(n: int, size: int) -> list[dict[str, np.ndarray]]:
    x = np.arange(n * size * 32, dtype=np.float32).reshape(n * size, 32)
    return [{"x": x[i * size : (i + 1) * size]} for i in range(n)]


def test_models_take_turns_and_the_speedup_is_the_ratio_of_medians():
    feed = example_feed(_batches(2, 4), batch=1)
    report = measure(
        {"original": _mlp(512), "optimized": _mlp(64)}, feed, rounds=3, per_round=4, warmup=1
    )
    assert report.backend == "onnxruntime" and "CPUExecutionProvider" in report.device
    assert report.batch == 1 and report.inputs == {"x": [1, 32]}
    assert report.rounds == 3
    assert {name: t.runs for name, t in report.timings.items()} == {"original": 12, "optimized": 12}
    for t in report.timings.values():
        assert 0 < t.p10_ms <= t.median_ms <= t.p90_ms
    t0, t1 = report.timings["original"], report.timings["optimized"]
    assert report.speedup["original"] == 1.0
    assert report.speedup["optimized"] == pytest.approx(t0.median_ms / t1.median_ms, rel=1e-3)
    assert report.to_dict()["timings"]["optimized"]["runs"] == 12


def test_timed_sessions_stop_spinning_when_their_run_returns(tmp_path):
    """Models take turns: an idle session's threads must not spin on the CPUs the next one is
    timed on (``latency`` module docstring)."""
    from idap_onnx.deploy.latency import SPIN_STOP, _OrtRunner

    path = tmp_path / "mlp.onnx"
    onnx.save(_mlp(64), path)
    runner = _OrtRunner(path, example_feed(_batches(1, 4), batch=1), "cpu")
    options = runner.session.get_session_options()
    assert options.get_session_config_entry(SPIN_STOP) == "1"
    assert runner.run() > 0


def test_max_seconds_ends_the_rounds_after_the_first():
    report = measure(
        {"a": _mlp(64)}, {"x": np.ones((1, 32), np.float32)}, rounds=50, per_round=2,
        max_seconds=0.0,
    )
    assert report.rounds == 1 and report.timings["a"].runs == 2
    assert "stopped after 1 of 50 rounds" in report.note


def test_the_feed_is_the_first_samples_of_the_data_in_order():
    batches = _batches(3, 2)
    feed = example_feed(batches, batch=3)
    expected = np.concatenate([batches[0]["x"], batches[1]["x"][:1]])
    np.testing.assert_array_equal(feed["x"], expected)
    with pytest.raises(IdapError, match="latency batch 7 needs 7 samples"):
        example_feed(batches, batch=7)


def test_a_model_with_a_fixed_batch_size_is_a_clear_error():
    fixed = _mlp(64, batch=1)
    with pytest.raises(IdapError, match="does not run on the 2-sample feed"):
        measure({"fixed": fixed}, {"x": np.ones((2, 32), np.float32)}, rounds=1, per_round=1)


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(IdapError, match="unknown latency backend 'trt'"):
        measure({"a": _mlp(8)}, {"x": np.ones((1, 32), np.float32)}, backend="trt")


def test_tensorrt_backend_says_what_is_missing():
    ok, why = tensorrt_available()
    if ok:
        pytest.skip("TensorRT and a CUDA GPU are present: the missing-backend error cannot occur")
    with pytest.raises(LatencyUnavailable, match="tensorrt|CUDA"):
        measure({"a": _mlp(8)}, {"x": np.ones((1, 32), np.float32)}, backend="tensorrt")
    assert why


def test_fp32_and_fp16_files_are_timed_side_by_side(tmp_path):
    """An fp16 ONNX file (fp32 inputs and outputs, from ``deploy.fp16``) next to its fp32
    source on ONNX Runtime: both run on the same feed."""
    from idap_onnx.deploy.fp16 import to_fp16
    from idap_onnx.model_io import save_model

    fp32 = _mlp(256)
    path32 = save_model(fp32, tmp_path / "mlp.onnx")
    path16 = save_model(to_fp16(fp32, _batches(2, 4)).model, tmp_path / "mlp.fp16.onnx")
    report = measure({"fp32": str(path32), "fp16": str(path16)},
                     example_feed(_batches(1, 2), batch=2), rounds=2, per_round=3, warmup=1)
    assert {n: t.runs for n, t in report.timings.items()} == {"fp32": 6, "fp16": 6}
    assert report.speedup["fp16"] > 0


def test_each_gpu_backend_says_whether_it_can_run_here():
    from idap_onnx.deploy.latency import backend_available
    from idap_onnx.deploy.trtexec import find_trtexec

    assert backend_available("onnxruntime") == (True, "")
    assert backend_available("tensorrt") == tensorrt_available()
    ok, why = backend_available("trtexec")
    if find_trtexec() is None:
        assert not ok and "trtexec" in why and "PATH" in why
        with pytest.raises(LatencyUnavailable, match="trtexec"):
            measure({"a": _mlp(8)}, {"x": np.ones((1, 32), np.float32)}, backend="trtexec")


def test_latency_command_with_engines_gives_one_line_errors(tmp_path, capsys):
    """``idap-onnx latency`` with ``.plan`` files: an engine on ONNX Runtime, a missing engine,
    engines only, and a missing TensorRT each end in one ``idap-onnx: error:`` line."""
    from idap_onnx.cli.main import main
    from idap_onnx.model_io import save_model

    model = str(save_model(_mlp(16), tmp_path / "mlp.onnx"))
    plan = tmp_path / "mlp.plan"
    plan.write_bytes(b"serialized engine")
    cases = [
        ([model, "--compare", str(plan)], "mlp.plan is a TensorRT engine; time it with the"),
        ([model, "--compare", str(tmp_path / "no.plan"), "--backend", "tensorrt"],
         "engine '.*no.plan' does not exist"),
        ([str(plan), "--backend", "tensorrt"], "every model is a TensorRT engine"),
    ]
    if not tensorrt_available()[0]:
        cases.append(([model, "--compare", str(plan), "--backend", "tensorrt"], "TensorRT needs"))
    for argv, message in cases:
        assert main(["latency", *argv]) == 1
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("idap-onnx: error:")]
        assert len(lines) == 1 and re.search(message, lines[0]), err
