"""Intermediate tensors of a model, for tests that check statistics or recovery by hand."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import onnx
import onnxruntime as ort


def pull(
    model: onnx.ModelProto, names: Iterable[str], feeds: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The full activations ``names`` (added as extra graph outputs; the graph outputs too),
    from a session without graph optimizations, so every name survives and nothing is fused
    (the reference: ``collect``'s fused kernels round differently, far below the tolerances)."""
    pulled = onnx.ModelProto()
    pulled.CopyFrom(model)
    for name in names:
        pulled.graph.output.append(onnx.ValueInfoProto(name=name))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(pulled.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    out = sess.run(None, dict(feeds))
    return dict(zip([o.name for o in pulled.graph.output], out, strict=True))
