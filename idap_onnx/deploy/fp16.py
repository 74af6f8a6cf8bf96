"""fp16 export through ONNX Runtime's maintained converter, with fp32 kept where fp16 is unsafe.

``onnxruntime.transformers.float16.convert_float_to_float16`` (it ships with onnxruntime, so
no new dependency) does the conversion, with ``keep_io_types=True``: the result's graph inputs
and outputs keep the fp32 model's names, element types and shapes, and Cast nodes at the
borders turn them to and from fp16. Its weight clamping is fp16's own range. Two fix-ups
follow it: the graph is sorted (ONNX Runtime's ``OnnxModel.topological_sort``; the converter
appends its Casts at the end, which the ONNX checker rejects), and a tensor passed between
two nodes kept in fp32 no longer goes through a fp32 -> fp16 -> fp32 Cast pair the converter
puts there (a value fp16 cannot hold would become inf on the way). onnxconverter-common 1.16
was tried and not taken: on a graph whose last node stays fp32 it declares the fp32 output
as fp16, and it leaves a weight shared by a fp16 and a fp32 node in fp32, a type error.
A node stays fp32 when

- its op has no safe fp16 form: the converter's own ``DEFAULT_OP_BLOCK_LIST`` (TopK, Range,
  CumSum, Min, Max, NonMaxSuppression, RoiAlign, Upsample, the ai.onnx.ml ops, ...);
- it reads a weight (initializer) above 65504 in magnitude, which the converter would clamp
  (a real case: the BatchNorm variances of RapidOCR's PP-OCRv4 detector reach 1e8);
- one of its inputs or outputs overflows fp16 on the calibration batches: its largest
  magnitude in the fp32 model is above 65504 (fp16's largest finite value) or not finite.
  The writer and every reader of such a tensor stay fp32, so it is never cast to fp16. The
  magnitudes are measured inside the graph by ONNX Runtime: an ``Abs -> ReduceMax`` probe
  on every float tensor, so no whole intermediate tensor is copied out;
- the user named it (``keep_fp32``).

The converted model is run beside the fp32 one on the batches (ONNX Runtime, CPU provider);
``max_rel_error`` is the largest relative L2 error ``||y16 - y32|| / ||y32||`` over the
outputs and batches. A model the converter or ONNX Runtime cannot take is declined with
:class:`UnsupportedModelError` saying why.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from idap_onnx.errors import UnsupportedModelError, UsageError

FP16_MAX = 65504.0
FP16_MIN_POSITIVE = 5.96e-08  # the smallest subnormal
PROBE_SUFFIX = "__idap_fp16_absmax"


@dataclass
class Fp16Result:
    """The converted model, the nodes left in fp32 and why, and the error against fp32.

    ``model``'s graph inputs and outputs are the fp32 model's (fp32); ``kept_fp32`` maps a
    node name to the reason it stayed fp32; ``max_rel_error`` is None without batches.
    """

    model: onnx.ModelProto
    kept_fp32: dict[str, str] = field(default_factory=dict)
    max_rel_error: float | None = None


def to_fp16(
    model: onnx.ModelProto,
    batches: Sequence[Mapping[str, np.ndarray]] = (),
    *,
    keep_fp32: Sequence[str] = (),
) -> Fp16Result:
    """``model`` with fp16 weights and compute and fp32 inputs and outputs (module docstring).

    Args:
        model: An fp32 model with named nodes; not modified.
        batches: Calibration feeds (input name -> array); they find the overflowing nodes and
            measure the error. Without them only the block lists apply.
        keep_fp32: Node names to leave in fp32.

    Raises:
        UsageError: a ``keep_fp32`` name is not a node of the model.
        UnsupportedModelError: the converter fails on the model or ONNX Runtime cannot run
            the converted one.
    """
    from onnxruntime.transformers.float16 import (
        DEFAULT_OP_BLOCK_LIST,
        convert_float_to_float16,
    )

    source = onnx.ModelProto()
    source.CopyFrom(model)
    from idap_onnx.model_io import assign_node_names

    assign_node_names(source.graph)
    names = {node.name for node in source.graph.node}
    unknown = [n for n in keep_fp32 if n not in names]
    if unknown:
        raise UsageError(f"--keep-fp32 {unknown[0]}: no node of that name in the model "
                         "(node names as Netron or 'idap-onnx inspect' show them)")
    kept: dict[str, str] = {}
    blocked_ops = set(DEFAULT_OP_BLOCK_LIST)
    floats = _float_tensors(source)
    for node in source.graph.node:
        if node.op_type in blocked_ops and floats.intersection([*node.input, *node.output]):
            kept[node.name] = f"{node.op_type} has no safe fp16 form (converter block list)"
    with tempfile.TemporaryDirectory(prefix="idap-fp16-") as tmp:
        large = _overflows(source, batches, Path(tmp))
        for node in source.graph.node:  # the writer and every reader of a large tensor
            for tensor in (*node.output, *node.input):
                if tensor in large:
                    what = "output" if tensor in node.output else "input"
                    kept.setdefault(node.name, f"{what} {tensor} reaches {large[tensor]:.3g} on "
                                               f"the batches, over fp16's {FP16_MAX:g}")
        for name, (weight, peak) in _large_weights(source).items():
            kept.setdefault(name, f"weight {weight} reaches {peak:.3g}, over fp16's {FP16_MAX:g}")
        for name in keep_fp32:
            kept.setdefault(name, "kept by the user")
        try:
            with warnings.catch_warnings():  # the converter warns about clamped weights
                warnings.simplefilter("ignore")
                converted = convert_float_to_float16(
                    source, min_positive_val=FP16_MIN_POSITIVE, max_finite_val=FP16_MAX,
                    keep_io_types=True, op_block_list=sorted(blocked_ops),
                    node_block_list=sorted(kept),
                )
        except Exception as exc:  # the converter raises plain exceptions of several types
            raise UnsupportedModelError(
                f"fp16: ONNX Runtime's converter fails on this model ({_first_line(exc)}); "
                "export it in fp32"
            ) from exc
        _sort_and_check(converted)
        error = _max_rel_error(source, converted, batches, Path(tmp)) if batches else None
    return Fp16Result(converted, kept, error)


def _sort_and_check(model: onnx.ModelProto) -> None:
    """The fix-ups of the module docstring, then the ONNX checker: the result is valid."""
    from onnxruntime.transformers.onnx_model import OnnxModel

    _skip_round_trips(model.graph)
    try:
        OnnxModel(model).topological_sort()
        if model.ByteSize() < onnx.checker.MAXIMUM_PROTOBUF:
            onnx.checker.check_model(model)
    except (RuntimeError, onnx.checker.ValidationError) as exc:
        raise UnsupportedModelError(
            f"fp16: the converted graph is not valid ONNX ({_first_line(exc)}); export it in "
            "fp32"
        ) from exc


def _skip_round_trips(graph: onnx.GraphProto) -> None:
    """Readers of ``Cast(to=float)(Cast(to=float16)(t))`` with ``t`` float32 read ``t`` itself;
    Casts left without readers are dropped. In place; graph outputs are kept as they are."""
    floats = {v.name for v in (*graph.input, *graph.value_info, *graph.output)
              if v.type.tensor_type.elem_type == TensorProto.FLOAT}
    floats |= {t.name for t in graph.initializer if t.data_type == TensorProto.FLOAT}
    producer = {out: node for node in graph.node for out in node.output}

    def cast_to(node, to: int) -> bool:
        return node is not None and node.op_type == "Cast" and any(
            a.name == "to" and a.i == to for a in node.attribute)

    outputs = {v.name for v in graph.output}
    bypass = {}
    for node in graph.node:
        down = producer.get(node.input[0]) if cast_to(node, TensorProto.FLOAT) else None
        if (cast_to(down, TensorProto.FLOAT16) and down.input[0] in floats
                and node.output[0] not in outputs):
            bypass[node.output[0]] = down.input[0]
    for node in graph.node:
        node.input[:] = [bypass.get(name, name) for name in node.input]
    while True:  # drop the Casts no one reads any more
        read = {name for node in graph.node for name in node.input} | outputs
        dead = [n for n in graph.node if n.op_type == "Cast" and n.output[0] not in read]
        if not dead:
            return
        for node in dead:
            graph.node.remove(node)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _float_tensors(model: onnx.ModelProto) -> set[str]:
    """Names of the main graph's float32 tensors (inputs, weights, inferred node outputs)."""
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=False)
    values = (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output)
    return ({v.name for v in values if v.type.tensor_type.elem_type == TensorProto.FLOAT}
            | {t.name for t in model.graph.initializer if t.data_type == TensorProto.FLOAT})


def _large_weights(model: onnx.ModelProto) -> dict[str, tuple[str, float]]:
    """Nodes reading a float32 initializer with a magnitude over ``FP16_MAX`` (the converter
    would clamp it: a BatchNorm variance of 1e7, say) -> (that initializer, its magnitude)."""
    from idap_onnx.model_io import tensor_array

    large: dict[str, float] = {}
    for tensor in model.graph.initializer:
        if tensor.data_type == TensorProto.FLOAT:
            peak = float(np.max(np.abs(tensor_array(tensor)), initial=0.0))
            if not peak <= FP16_MAX:
                large[tensor.name] = peak
    return {node.name: (name, large[name]) for node in model.graph.node
            for name in node.input if name in large}


def _overflows(
    model: onnx.ModelProto, batches: Sequence[Mapping[str, np.ndarray]], tmp: Path
) -> dict[str, float]:
    """Float tensors (graph inputs, node outputs) whose fp32 magnitude goes over ``FP16_MAX``
    (or is not finite) on any batch -> the largest magnitude seen."""
    if not batches:
        return {}
    floats = _float_tensors(model)
    inits = {t.name for t in model.graph.initializer}
    tensors = [v.name for v in model.graph.input if v.name in floats and v.name not in inits]
    tensors += [out for node in model.graph.node for out in node.output if out in floats]
    probes = []
    for k, tensor in enumerate(tensors):
        probe = f"{tensor}{PROBE_SUFFIX}"
        probes += [helper.make_node("Abs", [tensor], [f"{probe}_abs"], name=f"{probe}_a{k}"),
                   helper.make_node("ReduceMax", [f"{probe}_abs"], [probe], keepdims=0,
                                    name=f"{probe}_m{k}")]
    session = _session(model, tmp / "probe.onnx", [*model.graph.node, *probes],
                       [f"{t}{PROBE_SUFFIX}" for t in tensors])
    peaks: dict[str, float] = {}
    wanted = [f"{t}{PROBE_SUFFIX}" for t in tensors]
    for batch in batches:
        for tensor, value in zip(tensors, session.run(wanted, _feed(session, batch)), strict=True):
            peak = float(np.max(value)) if np.size(value) else 0.0
            if not peak <= FP16_MAX:  # NaN too
                peaks[tensor] = max(peaks.get(tensor, 0.0), peak) if peak == peak else np.nan
    return peaks


def _session(model: onnx.ModelProto, path: Path, nodes, outputs=()):
    """A CPU session without graph optimizations on ``model`` with ``nodes`` and the extra
    ``outputs`` (written beside its weights in ``path``'s folder)."""
    import onnxruntime as ort

    from idap_onnx.model_io import write_variant

    write_variant(model, path, nodes=nodes, outputs=outputs)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _feed(session, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {i.name: np.asarray(batch[i.name]) for i in session.get_inputs()}


def _max_rel_error(
    fp32: onnx.ModelProto, fp16: onnx.ModelProto,
    batches: Sequence[Mapping[str, np.ndarray]], tmp: Path,
) -> float:
    """The largest relative L2 error of fp16's outputs against fp32's over the batches; the
    fp16 model running on ONNX Runtime's CPU provider with fp32 inputs and outputs."""
    import onnxruntime as ort

    from idap_onnx.model_io import write_variant
    from idap_onnx.verify import io_signature, rel_l2

    if io_signature(fp16) != io_signature(fp32):
        raise UnsupportedModelError("fp16: the converted model's inputs/outputs differ from "
                                    "the fp32 model's; export it in fp32")
    reference = _session(fp32, tmp / "fp32.onnx", fp32.graph.node)
    write_variant(fp16, tmp / "fp16.onnx", nodes=fp16.graph.node)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        converted = ort.InferenceSession(str(tmp / "fp16.onnx"), opts,
                                         providers=["CPUExecutionProvider"])
        worst = 0.0
        for batch in batches:
            want = reference.run(None, _feed(reference, batch))
            got = converted.run(None, _feed(converted, batch))
            for g, w in zip(got, want, strict=True):
                if np.issubdtype(np.asarray(w).dtype, np.floating):
                    worst = max(worst, rel_l2(g, w) if np.all(np.isfinite(g)) else np.inf)
    except Exception as exc:  # ONNX Runtime raises its own exception types
        raise UnsupportedModelError(
            f"fp16: ONNX Runtime cannot run the converted model ({_first_line(exc)}); "
            "export it in fp32"
        ) from exc
    return worst
