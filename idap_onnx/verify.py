"""Run models in ONNX Runtime and check that a rewrite kept the graph's contract.

This is where sessions run for surgery checks (surgery itself never runs one): same graph
input and output names, element types and ranks; the rewritten model runs; and the relative
L2 error of its outputs, ``||y' - y|| / ||y||``, measured on given feeds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from idap_onnx.errors import SurgeryError


def session(model: onnx.ModelProto, threads: int = 0) -> ort.InferenceSession:
    """A CPU session on ``model`` (the CUDA provider is for calibration, not checks)."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def run_model(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs of ``model`` on ``feeds``, in graph-output order."""
    return session(model).run(None, dict(feeds))


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / ||b|| in float64 (0 when both are zero)."""
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    den = float(np.linalg.norm(b64))
    num = float(np.linalg.norm(a64 - b64))
    return num / den if den > 0 else num


def io_signature(model: onnx.ModelProto) -> list[tuple[str, str, int, int]]:
    """(kind, name, elem type, rank) of every graph input and output."""
    inits = {t.name for t in model.graph.initializer}
    sig = []
    for kind, values in (("input", model.graph.input), ("output", model.graph.output)):
        for v in values:
            if v.name in inits:
                continue
            tt = v.type.tensor_type
            sig.append((kind, v.name, tt.elem_type, len(tt.shape.dim)))
    return sig


def random_feeds(
    model: onnx.ModelProto, shapes: Mapping[str, list[int]], seed: int = 0
) -> dict[str, np.ndarray]:
    """Feeds for every graph input: N(0, 1) floats, zeros for integer inputs."""
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for v in model.graph.input:
        if v.name in inits:
            continue
        dtype = onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)
        shape = shapes[v.name]
        if np.issubdtype(dtype, np.floating):
            feeds[v.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[v.name] = np.zeros(shape, dtype=dtype)
    return feeds


@dataclass(frozen=True)
class RewriteCheck:
    """The result of ``check_rewrite``: the largest output error over all graph outputs."""

    max_rel_err: float
    output_shapes: tuple[tuple[int, ...], ...]


def check_rewrite(
    original: onnx.ModelProto, rewritten: onnx.ModelProto, feeds: Mapping[str, np.ndarray]
) -> RewriteCheck:
    """Check the contract of a rewrite and measure its output error on ``feeds``.

    Raises:
        SurgeryError: the inputs/outputs differ, the rewritten model fails to run, or its
            output shapes differ from the original's.
    """
    if io_signature(original) != io_signature(rewritten):
        raise SurgeryError("rewrite changed the graph inputs or outputs (names, types, ranks)")
    want = run_model(original, feeds)
    try:
        got = run_model(rewritten, feeds)
    except Exception as exc:  # ORT raises its own exception types
        line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SurgeryError(f"rewritten model fails in ONNX Runtime: {line}") from exc
    for w, g in zip(want, got, strict=True):
        if w.shape != g.shape:
            raise SurgeryError(f"rewrite changed an output shape: {w.shape} -> {g.shape}")
    errs = [rel_l2(g, w) for w, g in zip(want, got, strict=True)]
    return RewriteCheck(max(errs) if errs else 0.0, tuple(tuple(w.shape) for w in want))
