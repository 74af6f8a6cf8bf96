"""INT8 through ONNX Runtime's quantization tool, in the form the target runs fast.

:func:`quantize_int8` runs ``quant_pre_process`` (ONNX shape inference and ONNX Runtime's basic
graph optimizations; no symbolic shape inference, which needs sympy) and ``quantize_static`` on
calibration batches from the project's own readers (:class:`BatchReader`, a
``CalibrationDataReader`` over ``idap_onnx.calib.data`` batches). Nothing is hand-quantized.
The form follows the target:

- ``tensorrt``: QDQ, signed int8 activations and weights, symmetric (every zero point 0),
  per-channel weights, a dedicated Q/DQ pair per consumer, biases left fp32 (TensorRT fuses
  them), opset >= 13: what TensorRT's explicit-quantization parser accepts.
- ``onnxruntime-cpu``: uint8 activations and int8 weights (U8S8, ONNX Runtime's fast x86
  kernels), per-channel weights (7-bit weights on CPUs without VNNI, as ONNX Runtime advises),
  as QOperator (``QLinearConv``, ...) or QDQ, whichever measures faster.

Which nodes are quantized is measured on the target, not assumed: the quantizable nodes
(Conv, Gemm, MatMul) fall into op classes (:func:`node_classes`); with the faster format chosen,
each class is tried left in fp32, and an exclusion is kept where it runs faster by more than
:data:`MARGIN`. Candidates of one round are timed in turns in one
``deploy.latency.measure`` call, next to the fp32 source.

Invariants: the returned model is never slower than the fp32 source on the timed feed: the
chosen candidate must beat it by more than :data:`MARGIN` in the round that chose it and again
in a confirmation round of the two alone; else the result is the fp32 source (``form is None``)
and ``note`` says so. With a given ``form`` nothing is timed and the same model, data
and options give byte-identical output.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx

from idap_onnx.errors import UsageError

TARGETS = ("onnxruntime-cpu", "tensorrt")
CALIB_METHODS = ("minmax", "entropy", "percentile")
#: the op types quantized (their int8 kernels are what pays; element-wise ops stay fp32)
OP_TYPES = ("Conv", "Gemm", "MatMul")
#: the op classes, in the order their exclusion is tried
CLASSES = ("depthwise-conv", "grouped-conv", "matmul", "gemm", "conv")
#: a candidate must be this much faster (relative median) to be preferred
MARGIN = 0.05
MIN_OPSET = 13

Batch = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class Int8Form:
    """How a model is quantized: target, format, and the op classes left in fp32."""

    target: str
    quant_format: str  # "QOperator" or "QDQ"
    excluded_classes: tuple[str, ...] = ()

    @property
    def activations(self) -> str:
        return "int8" if self.target == "tensorrt" else "uint8"

    def label(self) -> str:
        kind = "S8S8 symmetric" if self.target == "tensorrt" else "U8S8"
        out = f"{self.quant_format} {kind}"
        if self.excluded_classes:
            out += f" without {'+'.join(self.excluded_classes)}"
        return out


@dataclass
class Int8Result:
    """The model to deploy and how it was chosen.

    ``model`` is int8 when ``form`` is set, else the fp32 source. ``kept_fp32``: node -> why it
    stayed fp32 (quantizable nodes only). ``trials``: every timed candidate, in order,
    ``{"round", "candidate", "median_ms", "speedup"}`` (speed-up over the fp32 source of the
    same round).
    """

    model: onnx.ModelProto
    form: Int8Form | None
    quantized: list[str] = field(default_factory=list)
    kept_fp32: dict[str, str] = field(default_factory=dict)
    trials: list[dict] = field(default_factory=list)
    measured_on: str = ""
    note: str = ""

    def to_dict(self) -> dict:
        return {
            "form": None if self.form is None else self.form.label(),
            "quant_format": None if self.form is None else self.form.quant_format,
            "activations": None if self.form is None else self.form.activations,
            "excluded_classes": [] if self.form is None else list(self.form.excluded_classes),
            "quantized_nodes": len(self.quantized),
            "kept_fp32": dict(self.kept_fp32),
            "trials": list(self.trials),
            "measured_on": self.measured_on,
            "note": self.note,
        }


class BatchReader:
    """A ``CalibrationDataReader`` over ``{input: array}`` batches (``calib.data.batches``)."""

    def __init__(self, batches: Sequence[Batch]) -> None:
        self._batches = [{k: np.ascontiguousarray(v) for k, v in b.items()} for b in batches]
        self._i = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._i >= len(self._batches):
            return None
        self._i += 1
        return self._batches[self._i - 1]

    def rewind(self) -> None:
        self._i = 0

    def __len__(self) -> int:
        return len(self._batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._batches = self._batches[start_index:end_index]
        self._i = 0


def _reader(batches: Sequence[Batch]):
    """:class:`BatchReader` registered as ONNX Runtime's ``CalibrationDataReader``."""
    from onnxruntime.quantization import CalibrationDataReader

    CalibrationDataReader.register(BatchReader)
    return BatchReader(batches)


def node_classes(model: onnx.ModelProto) -> dict[str, str]:
    """Quantizable node -> op class: ``conv`` (group 1), ``depthwise-conv`` (one input channel
    per group), ``grouped-conv``, ``gemm`` (Gemm or MatMul on a weight), ``matmul`` (MatMul of
    two activations, e.g. attention)."""
    inits = {t.name: t for t in model.graph.initializer}
    out: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type == "Conv":
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            w = inits.get(node.input[1]) if len(node.input) > 1 else None
            if group == 1:
                out[node.name] = "conv"
            elif w is not None and len(w.dims) > 1 and w.dims[1] == 1:
                out[node.name] = "depthwise-conv"
            else:
                out[node.name] = "grouped-conv"
        elif node.op_type in ("Gemm", "MatMul"):
            weighted = any(name in inits for name in node.input[:2])
            out[node.name] = "gemm" if weighted else "matmul"
    return out


def _has_vnni() -> bool:
    """Whether this x86 CPU has VNNI (ONNX Runtime advises 7-bit weights without it)."""
    from idap_onnx.deploy.latency_table import cpu_flags

    flags = cpu_flags()
    if not flags:
        return True
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"}) or "avx2" not in flags


def _prepared(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with every node named (``nodes_to_exclude`` names nodes) at opset >= 13."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    used = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in used:
                name += "_"
            node.name = name
            used.add(name)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), MIN_OPSET)
    if opset < MIN_OPSET:
        from onnx import version_converter

        model = version_converter.convert_version(model, MIN_OPSET)
    return model


def _quantize(
    pre: Path, out: Path, form: Int8Form, batches: Sequence[Batch], exclude, method: str,
    cache: Path | None,
) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    trt = form.target == "tensorrt"
    extra = {"WeightSymmetric": True}
    if trt:
        extra |= {"ActivationSymmetric": True, "DedicatedQDQPair": True, "QuantizeBias": False}
    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    with _quiet():
        quantize_static(
            str(pre),
            str(out),
            _reader(batches),
            quant_format=getattr(QuantFormat, form.quant_format),
            op_types_to_quantize=list(OP_TYPES),
            per_channel=True,
            reduce_range=not trt and not _has_vnni(),
            activation_type=QuantType.QInt8 if trt else QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=sorted(exclude),
            calibrate_method=methods[method],
            extra_options=extra,
            calibration_cache_path=cache,
        )


@contextlib.contextmanager
def _quiet():
    """ONNX Runtime's quantizer logs per-node advice at WARNING through the root logger."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def check_options(target: str, calib_method: str) -> None:
    """UsageError for an unknown target or calibration method."""
    if target not in TARGETS:
        raise UsageError(f"unknown int8 target '{target}'; choose one of {', '.join(TARGETS)}")
    if calib_method not in CALIB_METHODS:
        raise UsageError(
            f"unknown calibration method '{calib_method}'; choose one of {', '.join(CALIB_METHODS)}"
        )


def quantize_int8(
    model: onnx.ModelProto,
    batches: Sequence[Batch],
    *,
    target: str = "onnxruntime-cpu",
    calib_method: str = "minmax",
    keep_fp32: Sequence[str] = (),
    form: Int8Form | None = None,
    feed: Mapping[str, np.ndarray] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Int8Result:
    """``model`` in int8 for ``target``, or the fp32 model where no int8 form pays.

    Args:
        model: the fp32 model (not modified).
        batches: calibration batches (``{input: array}``, batch first).
        target: ``onnxruntime-cpu`` or ``tensorrt``.
        calib_method: ``minmax``, ``entropy`` or ``percentile`` (activation ranges).
        keep_fp32: node names never quantized.
        form: quantize in this form, untimed (deterministic); None: search by measurement.
        feed: the inputs the candidates are timed on (default: the first sample of ``batches``).
        progress: called with one line per timed round.

    Raises:
        UsageError: unknown target, method or ``keep_fp32`` node; no calibration batch.
    """
    check_options(target, calib_method)
    if not batches:
        raise UsageError("int8 needs calibration data: give --calib DATA (samples of the inputs)")
    names = {n.name for n in model.graph.node}
    unknown = sorted(set(keep_fp32) - names)
    if unknown:
        raise UsageError(
            f"--keep-fp32: no node named {', '.join(unknown)} in the model; "
            "node names as `idap-onnx inspect` prints them"
        )
    say = progress or (lambda _line: None)
    with tempfile.TemporaryDirectory(prefix="idap-int8-") as tmp:
        search = _Search(Path(tmp), model, batches, target, calib_method, keep_fp32, say)
        if form is not None:
            return search.fixed(form)
        from idap_onnx.deploy.latency import example_feed

        return search.run(feed if feed is not None else example_feed(list(batches), 1))


class _Search:
    """The candidates of one model, quantized into a temporary folder and timed in rounds."""

    def __init__(self, tmp, model, batches, target, method, keep_fp32, say) -> None:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        from idap_onnx.model_io import save_model

        self.tmp, self.batches, self.target, self.method = tmp, batches, target, method
        self.source, self.say = model, say
        src = save_model(_prepared(model), tmp / "source.onnx")
        self.pre = tmp / "pre.onnx"
        with _quiet():
            quant_pre_process(str(src), str(self.pre), skip_symbolic_shape=True)
        self.classes = node_classes(onnx.load(str(self.pre), load_external_data=False))
        self.keep = {n: "kept fp32 on request (--keep-fp32)" for n in keep_fp32}
        self.cache = tmp / "ranges.json"
        self.built: dict[Int8Form, Path] = {}
        self.trials: list[dict] = []
        self.rounds = 0

    def build(self, form: Int8Form) -> Path:
        if form not in self.built:
            out = self.tmp / f"q{len(self.built)}.onnx"
            excluded = set(self.keep) | {n for n, c in self.classes.items()
                                         if c in form.excluded_classes}
            cache = self.cache if form.target != "tensorrt" else self.tmp / "ranges_sym.json"
            _quantize(self.pre, out, form, self.batches, excluded, self.method, cache)
            self.built[form] = out
        return self.built[form]

    def result(self, form: Int8Form, note: str = "", measured_on: str = "") -> Int8Result:
        model = onnx.load(str(self.build(form)))
        kept = {}
        for node, cls in self.classes.items():
            if node in self.keep:
                kept[node] = self.keep[node]
            elif cls in form.excluded_classes:
                kept[node] = f"{cls}: its int8 form measured slower on the target"
        quantized = sorted(n for n in self.classes if n not in kept)
        if not quantized:
            note = (note + "; " if note else "") + "no node left to quantize"
        return Int8Result(model, form, quantized, kept, self.trials, measured_on, note)

    def fixed(self, form: Int8Form) -> Int8Result:
        if form.target != self.target:
            form = replace(form, target=self.target)
        return self.result(form, note=f"form given ({form.label()}); not timed")

    def time(self, candidates: dict[str, Path], feed, backend: str) -> tuple[dict, str]:
        from idap_onnx.deploy.latency import measure

        self.rounds += 1
        report = measure(
            {"fp32": self.tmp / "source.onnx", **candidates}, feed, backend=backend,
            device="cpu" if backend == "onnxruntime" else "auto", rounds=5, per_round=10,
            max_seconds=20.0,
        )
        medians = {k: t.median_ms for k, t in report.timings.items()}
        for name, ms in medians.items():
            self.trials.append({"round": self.rounds, "candidate": name, "median_ms": ms,
                                "speedup": report.speedup[name]})
        self.say(f"int8 round {self.rounds}: " + ", ".join(
            f"{k} {v:.3f} ms" for k, v in medians.items()))
        return medians, report.device

    def run(self, feed) -> Int8Result:
        from idap_onnx.deploy.latency import tensorrt_available

        formats = ["QOperator", "QDQ"] if self.target == "onnxruntime-cpu" else ["QDQ"]
        first = Int8Form(self.target, formats[0])
        backend = "onnxruntime" if self.target == "onnxruntime-cpu" else "tensorrt"
        if backend == "tensorrt":
            ok, why = tensorrt_available()
            if not ok:
                return self.result(first, note=f"not timed on the target ({why}); all Conv/Gemm/"
                                   "MatMul nodes quantized, as TensorRT's QDQ fusion expects")
        forms = {f.label(): f for f in (Int8Form(self.target, fmt) for fmt in formats)}
        medians, device = self.time({k: self.build(f) for k, f in forms.items()}, feed, backend)
        best = _fastest(medians, list(forms))
        form = forms[best]
        present = [c for c in CLASSES if any(
            v == c and n not in self.keep for n, v in self.classes.items())]
        if len(present) > 1:
            trial = {f"{form.label()} without {c}": replace(form, excluded_classes=(c,))
                     for c in present}
            medians, device = self.time(
                {best: self.build(form), **{k: self.build(f) for k, f in trial.items()}},
                feed, backend,
            )
            better = [f.excluded_classes[0] for k, f in trial.items()
                      if medians[k] < medians[best] * (1 - MARGIN)]
            if better:
                single = _fastest(medians, [best, *trial])
                form = trial.get(single, form)
                if len(better) > 1:
                    combined = replace(form, excluded_classes=tuple(c for c in CLASSES
                                                                    if c in better))
                    cands = {form.label(): form, combined.label(): combined}
                    medians, device = self.time({k: self.build(f) for k, f in cands.items()},
                                                feed, backend)
                    form = cands[_fastest(medians, list(cands))]
                best = form.label()
        fp32, chosen = medians["fp32"], medians[best]
        if chosen < fp32 * (1 - MARGIN):  # confirmed in a round of its own: noise rarely
            medians, device = self.time({best: self.build(form)}, feed, backend)  # wins twice
            fp32, chosen = medians["fp32"], medians[best]
        if not chosen < fp32 * (1 - MARGIN):
            note = (f"no int8 form ran faster than fp32 on {device} (best: {best}, "
                    f"{chosen:.4f} vs {fp32:.4f} ms); keeping fp32")
            self.say(note)
            return Int8Result(self.source, None, [], {}, self.trials, device, note)
        return self.result(form, note=f"{best}: {fp32 / chosen:.2f}x over fp32 on {device}",
                           measured_on=device)


def _fastest(medians: Mapping[str, float], order: Sequence[str]) -> str:
    """The first of ``order`` unless a later one is faster than it by more than MARGIN."""
    best = order[0]
    for name in order[1:]:
        if medians[name] < medians[best] * (1 - MARGIN):
            best = name
    return best
