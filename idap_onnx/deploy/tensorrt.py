"""TensorRT engines built from ONNX files as strongly typed networks.

Invariant: an engine's precision is the ONNX file's (an fp16 ONNX from ``deploy.fp16``, a QDQ
ONNX from the int8 export, or fp32); no builder precision flag is ever set. That is the one
build path that works on TensorRT 10 and 11 alike: TensorRT 11 removed the builder precision
flags, the explicit-batch creation flag and the INT8 calibrators, and a network created
without the strongly typed flag would silently build fp32 kernels from an fp16 file there.

NVIDIA's Polygraphy does the work where it is installed (``NetworkFromOnnxPath(...,
strongly_typed=True)``, ``CreateConfig(profiles=..., memory_pool_limits=...,
load_timing_cache=...)``, ``EngineFromNetwork``, ``SaveEngine``); without it the same steps
run on the TensorRT Python API (``create_network`` with ``STRONGLY_TYPED`` set, the ONNX
parser, ``build_serialized_network``). Engines and timing caches are written atomically.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from idap_onnx.errors import IdapError, UsageError

ENGINE_SUFFIXES = (".plan", ".engine", ".trt")
Dims = tuple[int, ...]


def is_engine(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a serialized TensorRT engine (by its suffix) rather than ONNX."""
    return Path(path).suffix.lower() in ENGINE_SUFFIXES


@dataclass(frozen=True)
class ShapeProfile:
    """One optimization profile: input name -> (min, opt, max) dims, with min <= opt <= max
    element-wise and the three of one rank. Empty for a model whose inputs are all static."""

    shapes: dict[str, tuple[Dims, Dims, Dims]]

    @staticmethod
    def parse(
        input_shape: Sequence[str] = (),
        min_shape: Sequence[str] = (),
        opt_shape: Sequence[str] = (),
        max_shape: Sequence[str] = (),
    ) -> ShapeProfile:
        """From ``NAME:DIMS`` strings (``images:1x3x224x224``): ``input_shape`` fixes an input
        (min = opt = max); ``min_shape``/``opt_shape``/``max_shape`` give a range and must name
        the same inputs. Raises :class:`UsageError` on bad text or inconsistent ranges."""
        fixed = _parse_specs(input_shape, "--input-shape")
        ranges = [_parse_specs(s, f"--{k}-shape") for s, k in
                  ((min_shape, "min"), (opt_shape, "opt"), (max_shape, "max"))]
        names = [set(r) for r in ranges]
        if names[0] != names[1] or names[1] != names[2]:
            every = sorted(names[0] | names[1] | names[2])
            missing = [f"{n} (no --{k}-shape)" for n in every
                       for k, got in zip(("min", "opt", "max"), names, strict=True) if n not in got]
            raise UsageError("--min-shape, --opt-shape and --max-shape must name the same "
                             f"inputs: missing {', '.join(missing)}")
        both = sorted(set(fixed) & names[0])
        if both:
            raise UsageError(f"input {both[0]} is given by --input-shape and by --min/opt/max-"
                             "shape; give it one way")
        shapes: dict[str, tuple[Dims, Dims, Dims]] = {n: (d, d, d) for n, d in fixed.items()}
        for name in ranges[0]:
            low, opt, high = (r[name] for r in ranges)
            if not len(low) == len(opt) == len(high):
                raise UsageError(f"input {name}: min, opt and max shapes have different ranks "
                                 f"({_dims(low)}, {_dims(opt)}, {_dims(high)})")
            if any(not a <= b <= c for a, b, c in zip(low, opt, high, strict=True)):
                raise UsageError(f"input {name}: needs min <= opt <= max in every dim, got "
                                 f"{_dims(low)}, {_dims(opt)}, {_dims(high)}")
            shapes[name] = (low, opt, high)
        return ShapeProfile(shapes)

    @staticmethod
    def of_feed(
        feed: Mapping[str, np.ndarray], names: Iterable[str] | None = None
    ) -> ShapeProfile:
        """A profile fixed to the shapes of ``feed`` (what a latency measurement runs), for
        the inputs ``names`` only when given (a build takes shapes of dynamic inputs only:
        trtexec refuses shapes for a static model)."""
        keep = set(feed) if names is None else set(names)
        return ShapeProfile({n: (tuple(a.shape),) * 3 for n, a in feed.items() if n in keep})

    def trtexec_args(self) -> list[str]:
        """The profile as trtexec options: ``--shapes`` when fixed, else the three ranges."""
        if not self.shapes:
            return []
        if all(lo == opt == hi for lo, opt, hi in self.shapes.values()):
            return ["--shapes=" + ",".join(f"{n}:{_dims(s[1])}" for n, s in self.shapes.items())]
        return [f"--{key}Shapes=" + ",".join(f"{n}:{_dims(s[i])}" for n, s in self.shapes.items())
                for i, key in enumerate(("min", "opt", "max"))]


def dynamic_inputs(onnx_path: str | os.PathLike) -> list[str]:
    """Graph inputs of the ONNX file with a dim that is not a fixed positive number (the
    inputs an optimization profile must cover); weights are not read."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    weights = {t.name for t in model.graph.initializer}
    return [v.name for v in model.graph.input if v.name not in weights and any(
        d.dim_value <= 0 for d in v.type.tensor_type.shape.dim)]


def _dims(dims: Dims) -> str:
    return "x".join(map(str, dims))


def _parse_specs(specs: Sequence[str], flag: str) -> dict[str, Dims]:
    """``NAME:DxDxD`` strings (a name may itself hold ':'), each name once."""
    out: dict[str, Dims] = {}
    for spec in specs:
        name, sep, text = spec.rpartition(":")
        try:
            dims = tuple(int(d) for d in text.split("x")) if text else ()
        except ValueError:
            dims = (0,)
        if not sep or not name or not dims or any(d < 1 for d in dims):
            raise UsageError(f"{flag} '{spec}' is not NAME:DIMS with positive dims, "
                             "e.g. images:1x3x224x224")
        if name in out:
            raise UsageError(f"{flag} names input {name} twice")
        out[name] = dims
    return out


def tensorrt_modules():
    """``tensorrt`` and ``torch`` with CUDA, or :class:`LatencyUnavailable` saying which is
    missing."""
    from idap_onnx.deploy.latency import LatencyUnavailable

    try:
        import tensorrt as trt
    except ImportError as exc:
        raise LatencyUnavailable(
            "TensorRT needs the 'tensorrt' Python package (pip install 'idap-onnx[tensorrt]' "
            "on a machine with an NVIDIA GPU), which is not installed here"
        ) from exc
    import torch

    if not torch.cuda.is_available():
        raise LatencyUnavailable("TensorRT needs a CUDA GPU; torch sees none here")
    return trt, torch


def build_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    *,
    profile: ShapeProfile | None = None,
    timing_cache: str | Path | None = None,
    workspace_bytes: int | None = None,
) -> Path:
    """Build ``onnx_path`` into a serialized engine at ``engine_path`` (written atomically).

    The network is strongly typed (module docstring). ``profile`` gives the shapes of dynamic
    inputs; ``timing_cache`` is read when it exists and updated after the build.

    Raises:
        LatencyUnavailable: ``tensorrt`` or a CUDA GPU is missing.
        UsageError: ``onnx_path`` is missing or ``engine_path`` cannot be written.
        IdapError: the parse or the build failed (each parser error on its own line).
    """
    source, target = Path(onnx_path), Path(engine_path)
    if not source.is_file():
        raise UsageError(f"cannot build an engine: '{source}' does not exist")
    if target.resolve() == source.resolve():
        raise UsageError(f"engine path '{target}' is the ONNX input; choose another path")
    if not target.parent.is_dir():
        raise UsageError(f"cannot write '{target}': directory '{target.parent}' does not exist")
    profile = profile or ShapeProfile({})
    _check_profile(source, profile)
    trt, _ = tensorrt_modules()
    cache = Path(timing_cache) if timing_cache is not None else None
    try:
        import polygraphy.backend.trt  # noqa: F401
    except ImportError:
        plan = _build_with_tensorrt(trt, source, profile, cache, workspace_bytes)
        _write_atomic(target, lambda f: f.write(plan))
    else:
        _build_with_polygraphy(trt, source, target, profile, cache, workspace_bytes)
    return target


def _check_profile(source: Path, profile: ShapeProfile) -> None:
    """Every dynamic input of ``source`` has shapes and every profiled name is an input."""
    import onnx

    try:
        graph = onnx.load(str(source), load_external_data=False).graph
    except Exception as exc:  # protobuf's DecodeError and friends
        raise UsageError(f"cannot build an engine: '{source}' is not an ONNX file "
                         f"({type(exc).__name__})") from exc
    inputs = {v.name: v for v in graph.input}
    unknown = sorted(set(profile.shapes) - set(inputs))
    if unknown:
        raise UsageError(f"{source.name} has no input {unknown[0]} (inputs: "
                         f"{', '.join(inputs)}); check the shape flags' names")
    missing = [n for n in dynamic_inputs(source) if n not in profile.shapes]
    if missing:
        dims = [d.dim_value or d.dim_param or "?" for d in
                inputs[missing[0]].type.tensor_type.shape.dim]
        raise UsageError(f"input {missing[0]} of {source.name} has dynamic dims "
                         f"[{', '.join(map(str, dims))}]; give its shapes with --input-shape "
                         f"{missing[0]}:DIMS or --min-shape/--opt-shape/--max-shape")


def _build_with_polygraphy(
    trt, source: Path, target: Path, profile: ShapeProfile, cache: Path | None,
    workspace_bytes: int | None,
) -> None:
    from polygraphy.backend.trt import (
        CreateConfig,
        EngineFromNetwork,
        NetworkFromOnnxPath,
        Profile,
        SaveEngine,
    )
    from polygraphy.exception import PolygraphyException

    profiles = []
    if profile.shapes:
        p = Profile()
        for name, (low, opt, high) in profile.shapes.items():
            p.add(name, min=low, opt=opt, max=high)
        profiles.append(p)
    config = CreateConfig(
        profiles=profiles or None,
        memory_pool_limits=({trt.MemoryPoolType.WORKSPACE: workspace_bytes}
                            if workspace_bytes else None),
        load_timing_cache=str(cache) if cache is not None and cache.is_file() else None,
    )
    network = NetworkFromOnnxPath(str(source), strongly_typed=True)
    build = EngineFromNetwork(network, config=config,
                              save_timing_cache=str(cache) if cache is not None else None)
    with _polygraphy_errors() as errors, _temporary_beside(target) as tmp:
        try:
            SaveEngine(build, path=str(tmp))()
        except PolygraphyException as exc:
            lines = errors or [str(exc)]
            raise IdapError(f"TensorRT could not build an engine from {source.name}:\n  "
                            + "\n  ".join(lines)) from exc
        os.replace(tmp, target)


@contextlib.contextmanager
def _polygraphy_errors() -> Iterator[list[str]]:
    """Polygraphy's ERROR lines (parser errors among them) while the block runs: its logger is
    routed through Python's ``logging`` for the duration, then restored."""
    from polygraphy.logger import G_LOGGER

    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.ERROR:
                lines.append(re.sub(r"^\[[E!]\]\s*", "", record.getMessage()).strip())

    handler = Collect()
    before = G_LOGGER.use_python_logging_system
    G_LOGGER.use_python_logging_system = True
    logging.getLogger("Polygraphy").addHandler(handler)
    try:
        yield lines
    finally:
        logging.getLogger("Polygraphy").removeHandler(handler)
        G_LOGGER.use_python_logging_system = before


def _build_with_tensorrt(
    trt, source: Path, profile: ShapeProfile, cache: Path | None, workspace_bytes: int | None,
) -> bytes:
    """The Polygraphy steps on TensorRT's own API; the serialized engine."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    parsed = parser.parse_from_file(str(source))  # keeps external weights beside the file
    if not parsed or parser.num_errors:
        lines = [str(parser.get_error(i)) for i in range(parser.num_errors)] or ["parse failed"]
        raise IdapError(f"TensorRT cannot parse {source.name}:\n  " + "\n  ".join(lines))
    config = builder.create_builder_config()
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    if profile.shapes:
        p = builder.create_optimization_profile()
        for name, (low, opt, high) in profile.shapes.items():
            p.set_shape(name, low, opt, high)
        config.add_optimization_profile(p)
    if cache is not None:
        old = cache.read_bytes() if cache.is_file() else b""
        config.set_timing_cache(config.create_timing_cache(old), False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise IdapError(f"TensorRT could not build an engine from {source.name} (see its log)")
    if cache is not None:
        data = bytes(memoryview(config.get_timing_cache().serialize()))
        _write_atomic(cache, lambda f: f.write(data))
    return bytes(memoryview(plan))


@contextlib.contextmanager
def _temporary_beside(target: Path) -> Iterator[Path]:
    """A temporary path in ``target``'s folder, removed unless renamed away."""
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(name)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)


def _write_atomic(target: Path, write) -> None:
    with _temporary_beside(target) as tmp:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, target)


def load_engine(trt, path: str | os.PathLike):
    """A deserialized engine from a ``.plan`` file; IdapError when TensorRT rejects it."""
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(Path(path).read_bytes())
    if engine is None:
        raise IdapError(f"TensorRT cannot load the engine {Path(path).name}: built by another "
                        "TensorRT version or for another GPU? Rebuild it here")
    return runtime, engine
