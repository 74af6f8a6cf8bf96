"""fp16 export (``idap_onnx.deploy.fp16``) on real exported graphs and on small parser-built
ones: every model converts and runs in ONNX Runtime's CPU provider with fp32 inputs and
outputs, and the nodes that stay fp32 are the ones whose fp16 form would be wrong."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from tools_loader import load_tool

from idap_onnx.deploy.fp16 import to_fp16
from idap_onnx.errors import UsageError
from idap_onnx.model_io import load_model, save_model
from idap_onnx.verify import io_signature, rel_l2

zoo = load_tool("zoo")
LIGHT = zoo.light_names()


def _run(model: onnx.ModelProto, feeds) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, dict(feeds))


def _fp16_initializers(model: onnx.ModelProto) -> int:
    return sum(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)


@pytest.mark.zoo
@pytest.mark.parametrize("name", LIGHT)
def test_light_zoo_model_converts_and_runs_with_fp32_io(name, tmp_path):
    model = load_model(zoo.build(name))
    batches = [zoo.make_inputs(name, seed=s) for s in range(2)]
    result = to_fp16(model, batches)
    assert io_signature(result.model) == io_signature(model)  # fp32 in, fp32 out
    assert _fp16_initializers(result.model) > 0
    # a valid file: saved and loaded back through the ONNX checker
    back = load_model(save_model(result.model, tmp_path / "fp16.onnx"))
    got, want = _run(back, batches[1]), _run(model, batches[1])
    assert all(g.dtype == w.dtype for g, w in zip(got, want, strict=True))
    errors = [rel_l2(g, w) for g, w in zip(got, want, strict=True)
              if np.issubdtype(w.dtype, np.floating)]
    assert result.max_rel_error == pytest.approx(max(
        max(errors), *[rel_l2(g, w) for g, w in zip(_run(back, batches[0]),
                                                     _run(model, batches[0]), strict=True)
                       if np.issubdtype(w.dtype, np.floating)]), rel=1e-3)
    assert 0 < result.max_rel_error < 1e-2


def test_digits_cnn_keeps_its_predictions_in_fp16():
    digits = load_tool("digits")
    asset = digits.build()
    model = load_model(asset.model_path)
    x, y = digits.load_splits()["test"]
    name = model.graph.input[0].name
    result = to_fp16(model, [{name: x[:64]}])
    assert result.kept_fp32 == {} and result.max_rel_error < 1e-3
    (logits16,) = _run(result.model, {name: x})
    (logits32,) = _run(model, {name: x})
    assert logits16.dtype == np.float32
    assert np.mean(logits16.argmax(1) == logits32.argmax(1)) > 0.995


def test_attention_mask_overflow_is_found_on_the_batches():
    """GPT-2's causal mask adds float32's lowest value (-3.4e38) to the attention scores: those
    Adds overflow fp16, which only running the batches reveals."""
    model = load_model(zoo.build("gpt2_tiny"))
    result = to_fp16(model, [zoo.make_inputs("gpt2_tiny")])
    overflowing = {n for n, why in result.kept_fp32.items() if "on the batches" in why}
    adds = {n.name for n in model.graph.node if n.op_type == "Add" and "/attn/" in n.name}
    assert overflowing & adds
    assert result.max_rel_error < 1e-2
    assert to_fp16(model).kept_fp32.keys().isdisjoint(adds)  # no batches, no probe


def test_large_weight_keeps_its_node_fp32():
    """RapidOCR's PP-OCRv4 detector has BatchNorm variances up to 1e8; the converter alone
    clamps them to 65504 and wrecks the output."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = load_model(zoo.build("rapidocr_det"))
    feeds = zoo.make_inputs("rapidocr_det")
    result = to_fp16(model, [feeds])
    assert any("reaches 9.79e+07" in why for why in result.kept_fp32.values())
    assert result.max_rel_error < 1e-2
    naive = convert_float_to_float16(model, keep_io_types=True)
    assert rel_l2(_run(naive, feeds)[0], _run(model, feeds)[0]) > 0.5


def _scaled_model() -> onnx.ModelProto:
    """y = ((x * 300) * 300) / 1e4: the middle tensor reaches 9e4 * |x|, over fp16's range."""
    return onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4] x) => (float[N, 4] y)
        <float k = {300.0}, float d = {10000.0}> {
            a = Mul(x, k)
            b = Mul(a, k)
            y = Div(b, d)
        }""")


def test_an_overflowing_node_stays_fp32_and_without_batches_the_output_is_inf():
    """ONNX Runtime's CPU provider runs many fp16 nodes in fp32 (it inserts Casts where it has
    no fp16 kernel), which hides an overflow that a GPU would hit; ONNX's reference evaluator
    computes in the graph's own types, as the GPU does."""
    from onnx.reference import ReferenceEvaluator

    model = _scaled_model()
    onnx.checker.check_model(model)
    feeds = {"x": np.linspace(-3, 3, 8, dtype=np.float32).reshape(2, 4)}
    result = to_fp16(model, [feeds])
    assert result.kept_fp32 == {  # the writer and the reader of the 2.7e5 tensor
        "Mul_1": "output b reaches 2.7e+05 on the batches, over fp16's 65504",
        "Div_2": "input b reaches 2.7e+05 on the batches, over fp16's 65504",
    }
    assert result.max_rel_error < 1e-3
    (y,) = ReferenceEvaluator(result.model).run(None, feeds)
    assert y.dtype == np.float32 and np.allclose(y, feeds["x"] * 9, rtol=1e-3)
    blind = to_fp16(model)
    assert blind.max_rel_error is None and blind.kept_fp32 == {}
    with np.errstate(over="ignore"):  # the overflow this test is about
        (y,) = ReferenceEvaluator(blind.model).run(None, feeds)
    assert not np.all(np.isfinite(y))


def test_user_kept_nodes_and_unknown_names():
    model = _scaled_model()
    result = to_fp16(model, keep_fp32=["Mul_0"])
    assert result.kept_fp32 == {"Mul_0": "kept by the user"}
    with pytest.raises(UsageError, match="--keep-fp32 nope: no node of that name"):
        to_fp16(model, keep_fp32=["nope"])
