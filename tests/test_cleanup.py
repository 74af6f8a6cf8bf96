"""``passes.cleanup.finalize``: the postcondition of every rewrite (dead parts dropped, shapes
re-inferred, the checker passed, the large weights checked without serializing them)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import pytest

from idap_onnx.errors import SurgeryError
from idap_onnx.passes.cleanup import finalize


def _model() -> onnx.ModelProto:
    """y = x @ w (w: 12 x 96 floats, over the skeleton's 1024), and a dead Relu."""
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 5, 12] x) => (float[1, 5, 96] y) {
            y = MatMul (x, w)
            dead = Relu (x)
        }
    """)
    w = np.random.default_rng(0).standard_normal((12, 96)).astype(np.float32)
    model.graph.initializer.append(onnx.numpy_helper.from_array(w, "w"))
    return model


def test_finalize_drops_dead_nodes_and_infers_shapes():
    model = finalize(_model())

    assert [n.op_type for n in model.graph.node] == ["MatMul"]
    assert {vi.name for vi in model.graph.value_info} == set()  # y is a graph output
    onnx.checker.check_model(model, full_check=True)


@pytest.mark.parametrize("break_it", ["short raw data", "raw and typed data"])
def test_a_large_weight_whose_values_do_not_match_its_dims_fails(break_it):
    model = _model()
    w = model.graph.initializer[0]
    if break_it == "short raw data":
        w.raw_data = w.raw_data[:-4]
    else:
        w.float_data.append(1.0)

    with pytest.raises(SurgeryError, match="weight 'w' holds"):
        finalize(model)
    with pytest.raises(onnx.checker.ValidationError):  # as the plain checker would say
        onnx.checker.check_model(model)


def test_a_node_reading_a_missing_tensor_fails_the_checker():
    model = _model()
    model.graph.node[0].input[1] = "missing"

    with pytest.raises(SurgeryError, match="fails the ONNX checker"):
        finalize(model)
