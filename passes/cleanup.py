"""Tidy a rewritten graph and check it: drop dead nodes and initializers, stale shapes.

``finalize`` is the postcondition every rewrite ends with: no node whose outputs nobody reads
(except graph outputs), no unused initializer, no stale ``value_info`` (the ONNX docs leave the
result of inference over conflicting shapes unspecified), shapes re-inferred, and
``onnx.checker.check_model(full_check=True)`` passing.
"""

from __future__ import annotations

import onnx

from idap_onnx.errors import SurgeryError
from idap_onnx.model_io import is_large_weight
from idap_onnx.shapes import infer_shapes, skeleton


def remove_dead(model: onnx.ModelProto) -> None:
    """In place: drop nodes none of whose outputs is used, then unused initializers."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    changed = True
    while changed:
        used = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if not any(o in used for o in n.output if o)]
        changed = bool(dead)
        for n in dead:
            graph.node.remove(n)
    used = {i for n in graph.node for i in n.input} | outputs
    for sub in _subgraph_inputs(graph):
        used.add(sub)
    for i in reversed(range(len(graph.initializer))):  # in place: the weights are not copied
        if graph.initializer[i].name not in used:
            del graph.initializer[i]


def _subgraph_inputs(graph: onnx.GraphProto) -> set[str]:
    names: set[str] = set()
    for node in graph.node:
        for a in node.attribute:
            subs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
            for g in subs:
                names |= {i for n in g.node for i in n.input}
    return names


def finalize(model: onnx.ModelProto) -> onnx.ModelProto:
    """Remove dead parts, re-infer shapes from scratch and run the full checker.

    Inference and the full (strict shape-inference) check run on a weight-free skeleton of
    the model, whose large weights are typed graph inputs: the same shapes, without copying
    the weights. The large weights themselves are checked as the plain checker checks a
    tensor (one storage field, as many values as the dims say, ``_check_weights``): the plain
    checker on the model would serialize every weight (0.35 s of ViT-B/16's 330 MB). ``model``
    is edited in place and returned with the inferred ``value_info``.
    """
    remove_dead(model)
    del model.graph.value_info[:]
    try:
        light = infer_shapes(skeleton(model))
        onnx.checker.check_model(light, full_check=True)
    except Exception as exc:  # the checker raises several types; all mean a broken rewrite
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SurgeryError(f"rewritten graph fails the ONNX checker: {first}") from exc
    _check_weights(model)
    model.graph.value_info.extend(light.graph.value_info)
    return model


_VALUE_FIELDS = {
    onnx.TensorProto.FLOAT: ("float_data", 4),
    onnx.TensorProto.FLOAT16: ("int32_data", 2),  # one value per int32
}


def _check_weights(model: onnx.ModelProto) -> None:
    """The weights ``skeleton`` sets aside hold one storage field with ``prod(dims)`` values."""
    for t in model.graph.initializer:
        n = 1
        for d in t.dims:
            n *= d
        if not is_large_weight(t.data_type, n) or t.data_location == onnx.TensorProto.EXTERNAL:
            continue
        field, size = _VALUE_FIELDS[t.data_type]
        typed = len(getattr(t, field))
        raw = len(t.raw_data)
        if (raw and typed) or (raw or typed * size) != n * size:
            raise SurgeryError(
                f"rewritten graph fails the ONNX checker: weight '{t.name}' holds "
                f"{(raw // size) if raw else typed} values for dims {list(t.dims)}"
            )
