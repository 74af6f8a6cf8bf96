"""``export``: a model at the precision its runtime runs, verified and timed against its source.

:func:`convert` is the in-memory step (also what ``optimize --precision`` judges its budget on):
``fp32`` returns the model; ``fp16`` calls ``deploy.fp16.to_fp16`` (ONNX Runtime's maintained
converter, fp32 graph inputs and outputs); ``int8`` calls ``deploy.int8.quantize_int8`` (ONNX
Runtime's ``quantize_static`` in the target's form, nodes chosen by measurement; the fp32 model
where no int8 form pays). :func:`verify` runs source and result on the same samples: the
largest relative output error ``max ||y - y0|| / ||y0||`` over samples and outputs, and top-1
of both where labels are given. :func:`export` reads the model and the calibration data with the
project's readers, converts, verifies, times source and result side by side
(``deploy.latency.measure``) and writes the result atomically, and with ``engine`` builds a
TensorRT engine from it (``deploy.tensorrt.build_engine``).

Invariants: the input file is never modified; a failed export leaves no file behind (every
file is written through a temporary file and renamed, the ONNX file only after the engine
built); TensorRT and a GPU are checked before any work when an engine is asked for.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from idap_onnx.deploy.int8 import Int8Form, Int8Result, check_options, quantize_int8
from idap_onnx.errors import UsageError

PRECISIONS = ("fp32", "fp16", "int8")
#: samples read from the calibration data (quantization ranges and verification)
CALIB_SAMPLES = 64

Batch = Mapping[str, np.ndarray]


@dataclass
class Converted:
    """The model to deploy. ``precision`` as asked; ``applied`` as delivered (``fp32`` where an
    int8 export kept the fp32 model because no int8 form paid). ``kept_fp32``: node -> why."""

    model: onnx.ModelProto
    precision: str
    applied: str
    kept_fp32: dict[str, str] = field(default_factory=dict)
    int8: Int8Result | None = None
    note: str = ""


@dataclass
class ExportResult:
    """What :func:`export` did; ``to_dict()`` is the ``--json`` report (docs/CLI.md)."""

    precision: str
    applied: str
    target: str
    source: str
    output: str
    engine: str | None
    bytes: dict[str, int]
    samples: int
    max_rel_error: float
    metric: dict | None
    kept_fp32: dict[str, str]
    int8: dict | None
    latency: dict | None
    note: str
    seconds: float

    def to_dict(self) -> dict:
        return {"schema_version": 1, "command": "export", **self.__dict__}


def check_precision(precision: str, target: str, calib_method: str = "minmax") -> None:
    """UsageError for an unknown precision, target or calibration method."""
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision '{precision}'; choose one of {', '.join(PRECISIONS)}")
    check_options(target, calib_method)


def convert(
    model: onnx.ModelProto,
    precision: str,
    batches: Sequence[Batch] = (),
    *,
    target: str = "onnxruntime-cpu",
    calib_method: str = "minmax",
    keep_fp32: Sequence[str] = (),
    feed: Mapping[str, np.ndarray] | None = None,
    int8_form: Int8Form | None = None,
    progress: Callable[[str], None] | None = None,
) -> Converted:
    """``model`` at ``precision`` for ``target`` (module docstring); ``model`` is not modified.

    Raises:
        UsageError: unknown precision/target/method, int8 without calibration batches.
    """
    check_precision(precision, target, calib_method)
    if precision == "fp32":
        return Converted(model, "fp32", "fp32")
    if precision == "fp16":
        from idap_onnx.deploy.fp16 import to_fp16

        out = to_fp16(model, list(batches), keep_fp32=tuple(keep_fp32))
        return Converted(out.model, "fp16", "fp16", dict(out.kept_fp32))
    res = quantize_int8(
        model, list(batches), target=target, calib_method=calib_method, keep_fp32=keep_fp32,
        form=int8_form, feed=feed, progress=progress,
    )
    applied = "int8" if res.form is not None else "fp32"
    return Converted(res.model, "int8", applied, dict(res.kept_fp32), res, res.note)


def verify(
    reference: onnx.ModelProto,
    candidate: onnx.ModelProto,
    batches: Sequence[Batch],
    labels: np.ndarray | None = None,
) -> tuple[float, dict | None]:
    """(max relative output error, ``{"source", "exported"}`` top-1 or None) of ``candidate``
    against ``reference`` on ``batches``: ``max ||y - y0|| / ||y0||`` over samples and outputs,
    each output in float64. Top-1 compares the first output's arg-max with ``labels``."""
    ref, cand = _session(reference), _session(candidate)
    worst, hits0, hits1, seen = 0.0, 0, 0, 0
    for batch in batches:
        y0s = ref.run(None, dict(batch))
        y1s = cand.run(None, dict(batch))
        for y0, y1 in zip(y0s, y1s, strict=True):
            a = np.asarray(y0, np.float64).reshape(len(y0), -1)
            b = np.asarray(y1, np.float64).reshape(len(y1), -1)
            err = np.linalg.norm(b - a, axis=1) / np.maximum(np.linalg.norm(a, axis=1), 1e-12)
            worst = max(worst, float(err.max()))
        if labels is not None:
            n = len(y0s[0])
            want = labels[seen : seen + n]
            if len(want) != n:
                raise UsageError(f"labels have {len(labels)} entries, fewer than the samples "
                                 "checked; give one class index per --calib sample, in order")
            hits0 += int((np.asarray(y0s[0]).reshape(n, -1).argmax(1) == want).sum())
            hits1 += int((np.asarray(y1s[0]).reshape(n, -1).argmax(1) == want).sum())
            seen += n
    metric = None
    if labels is not None and seen:
        metric = {"name": "top1", "samples": seen, "source": 100.0 * hits0 / seen,
                  "exported": 100.0 * hits1 / seen}
    return worst, metric


def _session(model: onnx.ModelProto):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(
        model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
    )


class _Head:
    """The first ``n`` samples of a dataset (``calib.data.Dataset``)."""

    def __init__(self, ds, n: int) -> None:
        self.ds, self.n = ds, min(n, len(ds))
        self.description, self.synthetic = ds.description, ds.synthetic

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return self.ds[i]


def read_batches(
    model: onnx.ModelProto, calib, *, data=None, samples: int = CALIB_SAMPLES,
    batch_size: int = 8, seed: int = 0,
) -> tuple[list[dict[str, np.ndarray]], str]:
    """The first ``samples`` samples of ``calib`` (any ``calib.data`` source; ``data`` an
    ``optimize_api.DataOptions``) in batches, and the data's description. A static batch dim
    of the model sets the batch size."""
    from idap_onnx.calib.data import batches, load_data, model_inputs

    ds = load_data(
        calib, model, image=data.image if data else None,
        tokenizer=data.tokenizer if data else None, seq_len=data.seq_len if data else 128,
        num_random=data.num_random if data else 64, seed=seed,
    )
    static = {s.shape[0] for s in model_inputs(model) if s.shape and isinstance(s.shape[0], int)}
    size = static.pop() if len(static) == 1 else batch_size
    head = _Head(ds, samples)
    if len(head) < size:
        raise UsageError(f"calibration data has {len(head)} samples, fewer than one batch ({size})")
    out = [b for b in batches(head, size) if len(next(iter(b.values()))) == size]
    return out, ds.description


def size_on_disk(path: str | os.PathLike) -> int:
    """Bytes of an ONNX file plus the external data files beside it that it names."""
    path = Path(path)
    total = path.stat().st_size
    model = onnx.load(str(path), load_external_data=False)
    files = {
        e.value
        for t in model.graph.initializer
        for e in t.external_data
        if e.key == "location"
    }
    return total + sum((path.parent / f).stat().st_size for f in files)


def export(
    model: str | os.PathLike | onnx.ModelProto,
    out: str | os.PathLike,
    precision: str = "fp32",
    *,
    calib=None,
    labels: np.ndarray | str | os.PathLike | None = None,
    target: str | None = None,
    engine: str | os.PathLike | None = None,
    input_shapes: Sequence[str] = (),
    min_shapes: Sequence[str] = (),
    opt_shapes: Sequence[str] = (),
    max_shapes: Sequence[str] = (),
    timing_cache: str | os.PathLike | None = None,
    calib_method: str = "minmax",
    keep_fp32: Sequence[str] = (),
    int8_form: Int8Form | None = None,
    data=None,
    samples: int = CALIB_SAMPLES,
    batch_size: int = 8,
    latency_batch: int = 1,
    latency: bool = True,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> ExportResult:
    """Convert ``model`` to ``precision``, verify it, time it against the source, write ``out``
    (and with ``engine`` a TensorRT engine built from it).

    ``target`` defaults to ``tensorrt`` with an engine, else ``onnxruntime-cpu``. ``int8_form``
    pins the int8 form (untimed, deterministic); None chooses it by measurement. Shapes are
    ``NAME:DIMS`` strings (``x:1x3x224x224``) for the engine's optimization profile (default:
    the timing feed's shapes); ``timing_cache`` is TensorRT's, read and updated.

    Raises:
        UsageError: bad precision/target/method/paths, int8 without ``calib``.
        LatencyUnavailable: ``engine`` where TensorRT or a GPU is missing (before any work).
    """
    from idap_onnx.model_io import load_model, save_model

    started = time.perf_counter()
    say = progress or (lambda _line: None)
    target = target or ("tensorrt" if engine else "onnxruntime-cpu")
    check_precision(precision, target, calib_method)
    source = str(model) if isinstance(model, (str, os.PathLike)) else "<in memory>"
    out = Path(out)
    _check_paths(source, out, engine)
    if precision == "int8" and calib is None:
        raise UsageError("--precision int8 needs calibration data: give --calib DATA")
    profile = None
    if engine is not None:
        profile = _engine_ready(input_shapes, min_shapes, opt_shapes, max_shapes)
    fp32 = model if isinstance(model, onnx.ModelProto) else load_model(model)
    batches, described = ([], "none")
    if calib is not None:
        batches, described = read_batches(fp32, calib, data=data, samples=samples,
                                          batch_size=batch_size, seed=seed)
        say(f"data: {described}, {sum(len(next(iter(b.values()))) for b in batches)} samples")
    feed = _feed(fp32, batches, latency_batch, seed)
    conv = convert(fp32, precision, batches, target=target, calib_method=calib_method,
                   keep_fp32=keep_fp32, feed=feed, int8_form=int8_form, progress=say)
    verify_on = batches or [feed]
    err, metric = verify(fp32, conv.model, verify_on, _labels(labels, verify_on))
    lat = None
    if latency:
        from idap_onnx.deploy.latency import measure

        lat = measure({"source": fp32, "exported": conv.model}, feed, device="cpu").to_dict()
    written_engine = None
    if engine is not None:
        if not profile.shapes:
            profile = type(profile).of_feed(feed)
        written_engine = _build_engine(conv.model, Path(engine), profile, timing_cache, say)
    try:
        save_model(conv.model, out, input_path=None if source == "<in memory>" else source)
    except BaseException:
        if written_engine:  # no half of the pair left behind
            Path(written_engine).unlink(missing_ok=True)
        raise
    src_bytes = size_on_disk(source) if source != "<in memory>" else fp32.ByteSize()
    return ExportResult(
        precision=precision, applied=conv.applied, target=target, source=source,
        output=str(out), engine=written_engine, bytes={"source": src_bytes,
                                                       "exported": size_on_disk(out)},
        samples=sum(len(next(iter(b.values()))) for b in verify_on), max_rel_error=err,
        metric=metric, kept_fp32=conv.kept_fp32,
        int8=conv.int8.to_dict() if conv.int8 else None, latency=lat, note=conv.note,
        seconds=round(time.perf_counter() - started, 3),
    )


def _check_paths(source: str, out: Path, engine) -> None:
    same = source != "<in memory>" and Path(source).resolve() == out.resolve()
    if same:
        raise UsageError(f"-o {out} is the input model; give another path (the input is kept)")
    if not out.parent.is_dir():
        raise UsageError(f"cannot write {out}: folder {out.parent} does not exist")
    if engine is not None:
        e = Path(engine).resolve()
        if e in (out.resolve(), Path(source).resolve()):
            raise UsageError(f"--engine {engine} must differ from the input and -o")
        if not e.parent.is_dir():
            raise UsageError(f"cannot write {engine}: folder {e.parent} does not exist")


def _engine_ready(input_shapes, min_shapes, opt_shapes, max_shapes):
    """The engine's shape profile, after checking TensorRT and a GPU are here."""
    from idap_onnx.deploy.latency import LatencyUnavailable, tensorrt_available

    ok, why = tensorrt_available()
    if not ok:
        raise LatencyUnavailable(f"--engine needs TensorRT and a CUDA GPU: {why}")
    from idap_onnx.deploy.tensorrt import ShapeProfile

    return ShapeProfile.parse(tuple(input_shapes), tuple(min_shapes), tuple(opt_shapes),
                              tuple(max_shapes))


def _build_engine(model: onnx.ModelProto, engine: Path, profile, timing_cache, say) -> str:
    """The engine built from ``model`` (a temporary ONNX file), written by ``build_engine``."""
    from idap_onnx.deploy.tensorrt import build_engine
    from idap_onnx.model_io import save_model

    with tempfile.TemporaryDirectory(prefix="idap-engine-") as tmp:
        onnx_path = save_model(model, Path(tmp) / "model.onnx")
        say(f"building the TensorRT engine {engine}")
        return str(build_engine(onnx_path, engine, profile=profile, timing_cache=timing_cache))


def _feed(model: onnx.ModelProto, batches, latency_batch: int, seed: int) -> dict:
    """The timing inputs: ``latency_batch`` real samples, else random ones of the declared
    shapes (symbolic dims: batch ``latency_batch``, others 32)."""
    from idap_onnx.deploy.latency import example_feed

    if batches:
        return example_feed(batches, latency_batch)
    from idap_onnx.calib.data import model_inputs

    rng = np.random.default_rng(seed)
    feed = {}
    for spec in model_inputs(model):
        shape = [latency_batch if i == 0 and not isinstance(d, int) else
                 (d if isinstance(d, int) else 32) for i, d in enumerate(spec.shape)]
        if spec.dtype.kind in "iu":
            feed[spec.name] = rng.integers(0, 100, size=shape).astype(spec.dtype)
        else:
            feed[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
    return feed


def _labels(labels, batches) -> np.ndarray | None:
    if labels is None:
        return None
    if isinstance(labels, (str, os.PathLike)):
        from idap_onnx.optimize_api import _read_labels

        labels = _read_labels(labels)
    return np.asarray(labels).reshape(-1)
