"""INT8 through ONNX Runtime's quantizer (``idap_onnx.deploy.int8``) on the trained digits CNN:
the form follows the target, the result stays close to fp32, a pinned form is deterministic,
and the measured search never returns a model slower than its fp32 source."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import pytest
from onnx import numpy_helper
from tools_loader import load_tool

from idap_onnx.deploy.int8 import MARGIN, BatchReader, Int8Form, node_classes, quantize_int8
from idap_onnx.errors import UsageError

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("torch")


@pytest.fixture(scope="module")
def digits():
    asset = load_tool("digits").build()
    x = np.load(asset.model_path.parent / "x_train.npz")["x"]
    batches = [{"x": x[i : i + 16]} for i in range(0, 64, 16)]
    return onnx.load(str(asset.model_path)), batches, x


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_batch_reader_is_an_onnxruntime_calibration_reader():
    from onnxruntime.quantization import CalibrationDataReader

    from idap_onnx.deploy.int8 import _reader

    batches = [{"x": np.zeros((2, 3), np.float32)}, {"x": np.ones((2, 3), np.float32)}]
    reader = _reader(batches)
    assert isinstance(reader, CalibrationDataReader)
    got = [reader.get_next(), reader.get_next(), reader.get_next()]
    assert got[2] is None and float(got[1]["x"].sum()) == 6.0
    reader.rewind()
    assert reader.get_next()["x"].sum() == 0 and len(BatchReader(batches)) == 2


def test_node_classes_split_convs_by_groups_and_matmuls_by_weights():
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 8, 4, 4] x) => (float[1, 8, 4, 4] y, float[1, 8, 4, 4] z) {
            a = Conv <group = 1> (x, w1)
            b = Conv <group = 8, pads = [1, 1, 1, 1]> (a, w2)
            c = Conv <group = 4> (b, w3)
            y = MatMul (c, w4)
            z = MatMul (c, c)
        }
    """)
    for i, node in enumerate(model.graph.node):
        node.name = f"n{i}"
    for name, shape in (("w1", (8, 8, 1, 1)), ("w2", (8, 1, 3, 3)), ("w3", (8, 2, 1, 1)),
                        ("w4", (4, 4))):
        model.graph.initializer.append(numpy_helper.from_array(np.ones(shape, np.float32), name))
    assert node_classes(model) == {
        "n0": "conv", "n1": "depthwise-conv", "n2": "grouped-conv", "n3": "gemm", "n4": "matmul",
    }


def test_onnxruntime_cpu_qoperator_is_u8s8_and_close_to_fp32(digits):
    model, batches, x = digits
    res = quantize_int8(model, batches, form=Int8Form("onnxruntime-cpu", "QOperator"))
    ops = {n.op_type for n in res.model.graph.node}
    assert "QLinearConv" in ops and "Conv" not in ops
    assert res.form.activations == "uint8" and len(res.quantized) == 5 and not res.kept_fp32
    for node in res.model.graph.node:  # activations uint8, weights int8
        if node.op_type == "QuantizeLinear":
            zp = _inits(res.model)[node.input[2]]
            assert zp.dtype == np.uint8
        if node.op_type == "QLinearConv":
            assert _inits(res.model)[node.input[3]].dtype == np.int8
    assert _rel(_run(model, x[:256]), _run(res.model, x[:256])) < 0.05
    assert res.model.ByteSize() < model.ByteSize() / 3


def test_tensorrt_form_is_symmetric_signed_per_channel_qdq(digits):
    model, batches, x = digits
    res = quantize_int8(model, batches, target="tensorrt", form=Int8Form("tensorrt", "QDQ"))
    q = res.model
    opset = next(o.version for o in q.opset_import if o.domain in ("", "ai.onnx"))
    assert opset >= 13
    inits = _inits(q)
    kinds = {n.op_type for n in q.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm"} <= kinds
    for node in q.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zp = inits.get(node.input[2]) if len(node.input) > 2 else None
            assert zp is not None and zp.dtype == np.int8 and not zp.any(), node.name
    conv = next(n for n in q.graph.node if n.op_type == "Conv")
    weight_dq = next(n for n in q.graph.node if n.output[0] == conv.input[1])
    assert weight_dq.op_type == "DequantizeLinear"
    assert inits[weight_dq.input[1]].shape == (32,)  # one scale per output channel
    consumers: dict[str, int] = {}  # DedicatedQDQPair: one Q/DQ pair per quantized consumer
    for node in q.graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul"):
            for name in node.input:
                consumers[name] = consumers.get(name, 0) + 1
    for node in q.graph.node:
        if node.op_type == "DequantizeLinear":
            assert consumers.get(node.output[0], 0) <= 1, node.name
    assert _rel(_run(model, x[:256]), _run(q, x[:256])) < 0.05


def test_a_pinned_form_gives_byte_identical_models(digits):
    model, batches, _ = digits
    form = Int8Form("onnxruntime-cpu", "QDQ", ("gemm",))
    a = quantize_int8(model, batches, form=form).model.SerializeToString()
    b = quantize_int8(model, batches, form=form).model.SerializeToString()
    assert a == b


def test_excluded_class_and_keep_fp32_nodes_stay_fp32(digits):
    model, batches, x = digits
    stem = model.graph.node[0].name
    res = quantize_int8(model, batches, keep_fp32=[stem],
                        form=Int8Form("onnxruntime-cpu", "QOperator", ("gemm",)))
    ops = {n.name: n.op_type for n in res.model.graph.node}
    assert ops[stem] == "Conv" and "Gemm" in ops.values()
    assert "--keep-fp32" in res.kept_fp32[stem] and len(res.kept_fp32) == 2
    assert _rel(_run(model, x[:64]), _run(res.model, x[:64])) < 0.05
    with pytest.raises(UsageError, match="no node named nope"):
        quantize_int8(model, batches, keep_fp32=["nope"])


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_histogram_calibration_methods_run(digits, method):
    model, batches, x = digits
    res = quantize_int8(model, batches[:2], calib_method=method,
                        form=Int8Form("onnxruntime-cpu", "QOperator"))
    assert _rel(_run(model, x[:64]), _run(res.model, x[:64])) < 0.1


def test_the_search_never_returns_a_model_slower_than_fp32(digits):
    model, batches, x = digits
    res = quantize_int8(model, batches, feed={"x": x[:8]})
    last = max(t["round"] for t in res.trials)
    final = {t["candidate"]: t["median_ms"] for t in res.trials if t["round"] == last}
    assert {"QOperator U8S8", "QDQ U8S8"} <= {t["candidate"] for t in res.trials}
    if res.form is None:  # fp32 kept: the same model, and the note says why
        assert res.model is model and "keeping fp32" in res.note
    else:
        assert final[res.form.label()] < final["fp32"] * (1 - MARGIN)
        assert "over fp32" in res.note


def test_bad_options_are_usage_errors(digits):
    model, batches, _ = digits
    with pytest.raises(UsageError, match="calibration data"):
        quantize_int8(model, [])
    with pytest.raises(UsageError, match="unknown int8 target"):
        quantize_int8(model, batches, target="tflite")
    with pytest.raises(UsageError, match="calibration method"):
        quantize_int8(model, batches, calib_method="mse")


def test_tensorrt_target_without_tensorrt_quantizes_untimed_and_says_so(digits):
    from idap_onnx.deploy.latency import tensorrt_available

    if tensorrt_available()[0]:
        pytest.skip("TensorRT and a CUDA GPU are present here: the form is timed there")
    model, batches, _ = digits
    res = quantize_int8(model, batches, target="tensorrt")
    assert res.form == Int8Form("tensorrt", "QDQ") and not res.trials
    assert "not timed on the target" in res.note and len(res.quantized) == 5
