"""Latency of an optimized model next to its original, measured side by side.

Backends:

- ``onnxruntime``: an ``InferenceSession`` with ONNX Runtime's default optimizations
  (``ORT_ENABLE_ALL``, what a user deploys) on the CUDA provider when ONNX Runtime has it,
  else the CPU provider (``device`` overrides); wall time of ``session.run``, which includes
  the copies of inputs and outputs between host and device.
- ``tensorrt``: each ONNX file built into an engine as a strongly typed network (precision
  from the file; ``fp16=True`` first converts it with ``deploy.fp16.to_fp16``, the feed as its
  calibration batch), by ``deploy.tensorrt.build_engine`` with one optimization profile fixed
  to the feed's shapes; a ``.plan`` engine is loaded as it is. Run with ``execute_async_v3``
  on a CUDA stream and timed with CUDA events around the enqueue alone: inputs stay on the
  GPU, as in a deployed pipeline. Needs the ``tensorrt`` package and torch with CUDA (for the
  device buffers and the stream); where either is missing, :class:`LatencyUnavailable` says
  which.
- ``trtexec``: TensorRT's ``trtexec`` from the PATH (``deploy.trtexec``): engines built once
  (or ``.plan`` files loaded), each round one ``trtexec`` run of ``per_round`` iterations with
  CUDA graphs and without host/device copies; a sample is one iteration's GPU compute time
  from its ``--exportTimes`` JSON, and each run warms up for 200 ms itself.

ONNX files of any precision (fp32, fp16 with fp32 I/O, int8 QDQ or QOperator) can be mixed;
``.plan``/``.engine`` files only on the TensorRT backends.

Side by side: the models take turns, ``rounds`` times, each turn ``per_round`` timed runs
after ``warmup`` untimed ones (first turn only), so a drift of the machine (other load, clock
changes) reaches every model alike. A model's figure is the median of its runs; the
speed-up is ``median(original) / median(other)``. Each ONNX Runtime session stops its
threads' spinning when its run returns (``session.force_spinning_stop``): with spinning left
on, the idle sessions' workers spin on the CPUs while the next model takes its turn, and on
a 2-CPU machine a model timed in turns with three copies of itself measured 1.09-1.79x its
time alone (ResNet-18 8.8 vs 5.1 ms); with it, 0.93-1.01x for ResNet-18 and MiniLM, while a
sub-millisecond MobileNet v2 still measured 1.14-1.31x (docs/BENCHMARKS.md, "Timing in
turns"; ``tools/bench_timing_turns.py``). ``max_seconds`` ends the
rounds early (after the first) on slow models. Latency figures are measurements of this
machine at this time: compare ratios from one call, not figures from different calls.
"""

from __future__ import annotations

import abc
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from idap_onnx.deploy.tensorrt import is_engine, tensorrt_modules
from idap_onnx.deploy.trtexec import Trtexec, require_trtexec
from idap_onnx.errors import IdapError, UsageError

BACKENDS = ("onnxruntime", "tensorrt", "trtexec")


class LatencyUnavailable(IdapError):
    """The requested backend cannot run here (package or device missing)."""


@dataclass(frozen=True)
class Timing:
    """One model's timed runs, in milliseconds."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int

    @staticmethod
    def of(samples_ms: list[float]) -> Timing:
        a = np.asarray(samples_ms, dtype=np.float64)
        return Timing(
            round(float(np.median(a)), 4),
            round(float(np.percentile(a, 10)), 4),
            round(float(np.percentile(a, 90)), 4),
            len(a),
        )


@dataclass
class LatencyReport:
    """What :func:`measure` found; ``speedup[name] = median(first) / median(name)``."""

    backend: str
    device: str
    batch: int
    inputs: dict[str, list[int]]
    timings: dict[str, Timing] = field(default_factory=dict)
    speedup: dict[str, float] = field(default_factory=dict)
    rounds: int = 0
    note: str = ""

    def to_dict(self) -> dict:
        out = asdict(self)
        out["timings"] = {k: asdict(v) for k, v in self.timings.items()}
        return out


def example_feed(
    batches: list[Mapping[str, np.ndarray]], batch: int = 1
) -> dict[str, np.ndarray]:
    """The first ``batch`` samples (axis 0) of real data, taken from the batches in order."""
    taken: dict[str, list[np.ndarray]] = {}
    count = 0
    for b in batches:
        if count >= batch:
            break
        if taken and {k: v[0].shape[1:] for k, v in taken.items()} != {
            k: np.asarray(v).shape[1:] for k, v in b.items()
        }:
            break  # samples of another shape (text of another length): stop here
        n = min(batch - count, len(next(iter(b.values()))))
        for name, a in b.items():
            taken.setdefault(name, []).append(np.asarray(a)[:n])
        count += n
    if count < batch:
        raise IdapError(
            f"latency batch {batch} needs {batch} samples of one shape; the data has {count}"
        )
    return {name: np.ascontiguousarray(np.concatenate(parts)) for name, parts in taken.items()}


def measure(
    models: Mapping[str, onnx.ModelProto | str | os.PathLike],
    feed: Mapping[str, np.ndarray],
    *,
    backend: str = "onnxruntime",
    device: str = "auto",
    rounds: int = 5,
    per_round: int = 10,
    warmup: int = 3,
    max_seconds: float = 30.0,
    fp16: bool = False,
    threads: int = 0,
    progress: Callable[[str], None] | None = None,
) -> LatencyReport:
    """Time each model on ``feed``, taking turns (module docstring); the first model is the
    reference of the speed-ups. ``threads``: ONNX Runtime's intra-op threads (0: its
    default, one per physical core)."""
    if backend not in BACKENDS:
        raise IdapError(f"unknown latency backend '{backend}'; choose one of {', '.join(BACKENDS)}")
    if not models:
        raise IdapError("latency needs at least one model")
    if rounds < 1 or per_round < 1 or warmup < 0:
        raise IdapError("latency: rounds and runs per round must be >= 1, warm-up >= 0")
    feed = {k: np.ascontiguousarray(v) for k, v in feed.items()}
    batch = int(next(iter(feed.values())).shape[0]) if feed else 1
    engines = [m for m in models.values() if isinstance(m, (str, os.PathLike)) and is_engine(m)]
    if engines and backend == "onnxruntime":
        raise UsageError(f"latency: {engines[0]} is a TensorRT engine; time it with the "
                         "tensorrt or trtexec backend")
    tool = require_trtexec() if backend == "trtexec" else None
    with tempfile.TemporaryDirectory(prefix="idap-latency-") as tmp:
        runners: dict[str, _Runner] = {}
        for i, (name, model) in enumerate(models.items()):
            path = _as_file(model, Path(tmp) / f"m{i}.onnx")
            runners[name] = _runner(backend, tool, path, feed, device, fp16, Path(tmp) / f"m{i}",
                                    threads)
            if progress:
                progress(f"latency: {name} ready on {runners[name].device}")
        samples: dict[str, list[float]] = {name: [] for name in runners}
        start = time.perf_counter()
        done = 0
        for r in range(rounds):
            for name, runner in runners.items():
                if r == 0:
                    _first_run(name, runner, batch, warmup)
                samples[name] += runner.run_many(per_round)
            done = r + 1
            if time.perf_counter() - start > max_seconds:
                break
        devices = {runner.device for runner in runners.values()}
        for runner in runners.values():
            runner.close()
    report = LatencyReport(
        backend=backend,
        device=", ".join(sorted(devices)),
        batch=batch,
        inputs={k: list(v.shape) for k, v in feed.items()},
        rounds=done,
        note="median of the timed runs; models measured in turns in one call"
        + (f"; stopped after {done} of {rounds} rounds (max_seconds {max_seconds:g})"
           if done < rounds else ""),
    )
    report.timings = {name: Timing.of(s) for name, s in samples.items()}
    first = next(iter(report.timings.values())).median_ms
    report.speedup = {
        name: round(first / t.median_ms, 4) if t.median_ms > 0 else float("nan")
        for name, t in report.timings.items()
    }
    return report


def _runner(backend: str, tool: Trtexec | None, path: Path, feed: Mapping[str, np.ndarray],
            device: str, fp16: bool, stem: Path, threads: int = 0) -> _Runner:
    """The model at ``path`` ready to run on ``backend`` (temporary files start with ``stem``)."""
    if backend == "onnxruntime":
        return _OrtRunner(path, feed, device, threads)
    source = tensorrt_source(path, feed, fp16, stem.with_suffix(".fp16.onnx"))
    if tool is not None:
        return _TrtexecRunner(tool, source, feed, stem)
    return _TensorRTRunner(source, feed, stem.with_suffix(".plan"), fp16)


def _first_run(name: str, runner: _Runner, batch: int, warmup: int) -> None:
    """The warm-up runs; a model that cannot run on the feed is the user's error, in one line."""
    try:
        runner.warm(warmup)
    except IdapError:
        raise
    except Exception as exc:  # ONNX Runtime / TensorRT raise their own types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise IdapError(
            f"latency: {name} does not run on the {batch}-sample feed ({first}); "
            "a model with a fixed batch size needs --latency-batch equal to it"
        ) from exc


def tensorrt_source(
    path: Path, feed: Mapping[str, np.ndarray], fp16: bool, fp16_path: Path
) -> Path:
    """The file a TensorRT backend builds or loads: ``path`` itself (fp32, a converted fp16
    or QDQ ONNX, or a ``.plan`` engine, timed as built), or with ``fp16`` an ONNX file the
    fp16 conversion of ``path`` (``to_fp16`` with the feed as calibration batch) written to
    ``fp16_path``; TensorRT then builds the strongly typed network in that precision."""
    if not fp16 or is_engine(path):
        return path
    from idap_onnx.deploy.fp16 import to_fp16
    from idap_onnx.model_io import load_model, write_variant

    converted = to_fp16(load_model(path), [feed]).model
    return write_variant(converted, fp16_path, nodes=converted.graph.node)


def _as_file(model: onnx.ModelProto | str | os.PathLike, path: Path) -> Path:
    """A model file both backends can open: the given path, or ``model`` written with its
    weights as external data (``model_io.write_variant``: no serialized copy in memory)."""
    if isinstance(model, (str, os.PathLike)):
        return Path(model)
    from idap_onnx.model_io import write_variant

    return write_variant(model, path, nodes=model.graph.node)


class _Runner(abc.ABC):
    """One model ready to run on the feed, on one backend (``device`` says which)."""

    device = ""

    @abc.abstractmethod
    def run(self) -> float:
        """One inference; its time in milliseconds."""

    def run_many(self, n: int) -> list[float]:
        """``n`` inferences; their times in milliseconds."""
        return [self.run() for _ in range(n)]

    def warm(self, n: int) -> None:
        """Untimed inferences before the first turn (at least one: it proves the model runs)."""
        for _ in range(max(n, 1)):
            self.run()

    def close(self) -> None:  # noqa: B027 (optional: most backends hold nothing to release)
        """Release device buffers; nothing by default."""


SPIN_STOP = "session.force_spinning_stop"  # ONNX Runtime's key (module docstring)


class _OrtRunner(_Runner):
    def __init__(self, path: Path, feed: Mapping[str, np.ndarray], device: str,
                 threads: int = 0) -> None:
        import onnxruntime as ort

        from idap_onnx.calib.stats import providers

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.intra_op_num_threads = threads
        opts.add_session_config_entry(SPIN_STOP, "1")
        self.session = ort.InferenceSession(str(path), opts, providers=providers(device))
        self.device = f"onnxruntime {self.session.get_providers()[0]}"
        wanted = {i.name for i in self.session.get_inputs()}
        missing = wanted - set(feed)
        if missing:
            raise IdapError(f"latency: the feed lacks input(s) {', '.join(sorted(missing))}")
        self.feed = {k: v for k, v in feed.items() if k in wanted}

    def run(self) -> float:
        t = time.perf_counter()
        self.session.run(None, self.feed)
        return (time.perf_counter() - t) * 1e3


class _TensorRTRunner(_Runner):
    """An engine (``.plan``, or built from the ONNX file by ``build_engine`` into
    ``plan_path`` with a profile fixed to the feed) run with ``execute_async_v3``."""

    def __init__(
        self, path: Path, feed: Mapping[str, np.ndarray], plan_path: Path, fp16: bool
    ) -> None:
        from idap_onnx.deploy.tensorrt import (
            ShapeProfile,
            build_engine,
            dynamic_inputs,
            load_engine,
        )

        trt, torch = tensorrt_modules()
        if not is_engine(path):
            profile = ShapeProfile.of_feed(feed, dynamic_inputs(path))
            path = build_engine(path, plan_path, profile=profile)
        self.runtime, self.engine = load_engine(trt, path)
        self.context = self.engine.create_execution_context()
        self.torch = torch
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        missing = sorted(set(inputs) - set(feed))
        if missing:
            raise IdapError(f"latency: the feed lacks input(s) {', '.join(missing)}")
        self.buffers = []
        for name in inputs:  # every input shape first: output shapes depend on them
            host = feed[name].astype(trt.nptype(self.engine.get_tensor_dtype(name)))
            self.context.set_input_shape(name, host.shape)
            self.buffers.append(torch.from_numpy(np.ascontiguousarray(host)).cuda())
            self.context.set_tensor_address(name, self.buffers[-1].data_ptr())
        for name in names:
            if name in inputs:
                continue
            dtype = torch.from_numpy(np.zeros(0, trt.nptype(self.engine.get_tensor_dtype(name))))
            shape = tuple(self.context.get_tensor_shape(name))
            self.buffers.append(torch.empty(shape, dtype=dtype.dtype, device="cuda"))
            self.context.set_tensor_address(name, self.buffers[-1].data_ptr())
        self.stream = torch.cuda.Stream()
        self.device = f"tensorrt {trt.__version__} {torch.cuda.get_device_name()}" + (
            " (fp16 ONNX)" if fp16 else "")

    def run(self) -> float:
        start = self.torch.cuda.Event(enable_timing=True)
        end = self.torch.cuda.Event(enable_timing=True)
        start.record(self.stream)
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise IdapError("TensorRT execute_async_v3 failed")
        end.record(self.stream)
        end.synchronize()
        return float(start.elapsed_time(end))

    def close(self) -> None:
        self.buffers.clear()


class _TrtexecRunner(_Runner):
    """An engine built once by ``trtexec`` (or a ``.plan`` as it is), timed by one trtexec run
    a round (``deploy.trtexec``)."""

    def __init__(self, tool: Trtexec, path: Path, feed: Mapping[str, np.ndarray],
                 stem: Path) -> None:
        from idap_onnx.deploy import trtexec
        from idap_onnx.deploy.tensorrt import ShapeProfile, dynamic_inputs

        self.tool, self.times = tool, stem.with_suffix(".times.json")
        self.shapes = ShapeProfile.of_feed(feed)  # at run time static shapes may be given
        self.plan = path if is_engine(path) else trtexec.build(
            tool, path, stem.with_suffix(".plan"), ShapeProfile.of_feed(feed, dynamic_inputs(path)))
        self.device = f"trtexec (TensorRT {'.'.join(map(str, tool.version))})"

    def run_many(self, n: int) -> list[float]:
        from idap_onnx.deploy.trtexec import time_engine

        return time_engine(self.tool, self.plan, self.times, self.shapes, iterations=n)

    def run(self) -> float:
        return self.run_many(1)[0]

    def warm(self, n: int) -> None:
        """One short trtexec run (each run warms up itself): it proves the engine runs."""
        self.run_many(1)


def backend_available(backend: str) -> tuple[bool, str]:
    """(True, "") when ``backend`` can run here, else (False, the reason): TensorRT and CUDA
    for ``tensorrt``, a TensorRT 10+ ``trtexec`` on the PATH for ``trtexec``."""
    try:
        if backend == "tensorrt":
            tensorrt_modules()
        elif backend == "trtexec":
            require_trtexec()
    except LatencyUnavailable as exc:
        return False, str(exc)
    return True, ""


def tensorrt_available() -> tuple[bool, str]:
    """(True, "") when the TensorRT backend can run here, else (False, the reason)."""
    try:
        tensorrt_modules()
    except LatencyUnavailable as exc:
        return False, str(exc)
    return True, ""
