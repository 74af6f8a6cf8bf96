"""Least-squares refit of pruned consumers on calibration data (ThiNet / channel-pruning style).

After pruning, consumer k reads fewer input channels X' (``n x K'`` rows: batch x positions)
than in the original model. Its remaining input weights and bias are re-solved in closed form
so that it reconstructs the *original* model's output Y of the same node (pre-activation,
bias included) from the *pruned* model's inputs:

    min_{W', b'}  ||X' W' + b' - Y||^2 + lambda ||W'||^2

solved on centred float64 normal equations: ``W' = (Xc'Xc + lambda I)^-1 Xc'Yc``,
``b' = mean(Y) - mean(X') W'``, with ``lambda = ridge * trace(Xc'Xc) / K'`` (the ridge is
relative, so it does not depend on the activation scale). Because the target is the original
model's output, a refit also corrects the error that earlier pruned layers pass down.

What is refitted: a node of ``pruned`` that exists in ``original`` under the same name and op,
with a constant weight, that reads fewer input channels than in ``original``:

- Conv with group 1: a 1x1 kernel without padding reads one input position per output row
  (strides subsample the input positions); a 2-D k x k kernel reads the patch of ``K' k k``
  values under it (im2col, zero padding included, gathered only for the sampled rows), up
  to ``max_width`` columns (4096: a 128 MiB Gram matrix); wider ones are skipped;
- Gemm with a constant B and a constant (or absent) C of ``[N]``, ``[1, N]`` or scalar shape;
- MatMul ``X W`` with a constant 2-D W; the bias is the following ``Add`` with a constant
  ``[N]`` vector (the target is then that Add's output in ``original``), inserted when absent.

Only consumers whose output width is unchanged are refitted, unless ``removal`` (the units
removed from ``original``, by ``original``'s group ids) is given: then the kept output channels
are found through ``original``'s layout keep masks and the target is Y restricted to them.

Layers are refitted one after another in graph order (``sequential=True``, the default): each
against the inputs that the refits before it produce. All at once (``sequential=False``: one
pass, every layer against the inputs *before* any refit) corrects an upstream error twice in a
deep stack: a layer learns to undo the error that the refit above it then removes
(all-MiniLM-L6-v2 pruned to 50 % of its MACs: test cosine 0.675 pruned, 0.731 refitted at
once, 0.829 refitted in sequence). A layer keeps its pruned weights when the refit does not
lower its reconstruction error on the sampled rows, or when it has fewer than
``ROWS_PER_UNKNOWN`` (2) sampled rows per input column: a fit with about as many rows as
unknowns matches its rows exactly and nothing else.

How the data is run (what makes the sequential refit cheap enough to be ``optimize``'s
default; ``tools/bench_refit.py``):

- the batches are joined into batches of up to 64 samples (``merge_batches``) and at most
  about ``max_samples`` (1024) samples are read, whole batches evenly spaced (``_spread``);
- the original's sampled target rows of every layer are drawn in one pass and kept
  (``cache_bytes``, 512 MiB), in torch on one thread (``refit_stream.pulled``), or read from
  a ``TargetCache`` that the previous refit filled when ``original`` is the model it
  returned (``optimize`` passes one per run);
- the pruned model then runs once, node by node in torch, every batch's live tensors held
  between layers (``refit_stream.Stream``, up to ``frontier_bytes``, 1 GiB): the batches stop
  before each layer to refit, its rows are taken and solved, and they go on with the new
  weights. Where torch is missing, the model has an op the torch executor lacks, or the
  live tensors would not fit, one ONNX Runtime pass per layer computes the graph up to it
  (graph optimizations off, so the names survive), as before.

Rows: each layer draws a seeded uniform subsample of at most ``ceil(max_rows / number of
batches)`` rows from every batch (at most ``max_rows`` rows per layer, spread over all
batches). They are summed into ``K' x K'`` and ``K' x N`` Gram matrices ``FLUSH_ROWS`` rows
at a time: one float32 BLAS product per block of rows shifted by the first block's means
(so the centring is free of cancellation), added up in float64; ``K' k k`` wide for a k x k
conv. Memory does not grow with the data beyond the sampled rows; in sequence one layer's
sums are held at a time, at once all of them. The solve is a Cholesky factorization (torch,
one thread, where it imports). ``batches`` that is not a sequence is materialized into a
list (the inputs only) to count the batches.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from idap_onnx.calib.stats import providers
from idap_onnx.conv_taps import conv_pads
from idap_onnx.graph import GraphIndex, attr, needed_indices
from idap_onnx.model_io import write_variant
from idap_onnx.passes.cleanup import finalize
from idap_onnx.passes.compensate import Params, bias_add, insert_bias_add

REFIT_OPS = ("Conv", "Gemm", "MatMul")
#: In sequence, the original's sampled targets of all layers are kept when they fit in this.
TARGET_CACHE_BYTES = 512 * 2**20
#: In sequence, with the targets kept, the pruned model runs once in torch when the live tensors
#: of all batches fit in this (``refit_stream``); else one ONNX Runtime pass per layer.
FRONTIER_BYTES = 1024 * 2**20
#: Calibration batches are joined up to this many samples or input bytes for the refit.
MERGE_SAMPLES, MERGE_BYTES = 64, 4 * 2**20
#: The refit reads about this many calibration samples at most (``refit(max_samples=)``).
MAX_SAMPLES = 1024
#: Rows queued per layer before they are folded into the float64 sums (one BLAS call).
FLUSH_ROWS = 4096


@dataclass
class LayerRefit:
    """What ``refit`` did for one consumer: rows used, relative reconstruction errors
    ``||X'W + b - Y||^2 / ||Y - mean(Y)||^2`` of the pruned and the refitted weights on those
    rows, and whether the refit was written (``applied``) or why the layer was skipped."""

    node: str
    rows: int = 0
    err_before: float = float("nan")
    err_after: float = float("nan")
    applied: bool = False
    skipped: str = ""


#: Rows a layer needs per input column (``K'``, or ``K' k k`` for a k x k Conv) to be
#: refitted. Its fit is judged on the rows it was fitted to; with about as many rows as
#: unknowns it fits them exactly and its error on other data grows without bound (ResNet-50
#: at 224 x 224 calibrated on 32 images: 1,568 rows for a 2,048-wide 1x1 conv of its last
#: stage, and a relative output error of 9e6 after half its MACs were removed).
ROWS_PER_UNKNOWN = 2


@dataclass
class _Layer:
    """One consumer to refit: tensors to pull and the accumulated normal equations."""

    node: str
    op: str
    x: str  # pruned model's input tensor
    y: str  # original model's target tensor
    k: int  # input width in pruned
    width: int  # output width in pruned (the target's columns)
    out_keep: np.ndarray | None  # original output channels kept (None: all)
    strides: tuple[int, ...] = ()
    trans_a: bool = False
    conv: onnx.NodeProto | None = None  # a k x k Conv: its rows are the patches under the kernel
    kernel: tuple[int, ...] = ()
    n: int = 0
    sx: np.ndarray | None = None
    sy: np.ndarray | None = None
    syy: np.ndarray | None = None
    gxx: np.ndarray | None = None
    gxy: np.ndarray | None = None
    x0: np.ndarray | None = None  # the shift of the sums (first flush's means)
    y0: np.ndarray | None = None
    pending: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        """Queue rows ``x`` (inputs) and ``y`` (targets); the sums take them ``FLUSH_ROWS`` at
        a time, so the float64 products are few large BLAS calls, not one per batch."""
        self.pending.append((x, y))
        if sum(len(p[0]) for p in self.pending) >= FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        """Fold the queued rows into the sums ``n, sum x, sum y, sum y^2, X'X, X'Y`` of the
        rows shifted by the first flush's means (``x0``, ``y0``): each product is one float32
        BLAS call over at most ``FLUSH_ROWS`` near-centred rows, added up in float64 (the
        shift keeps the later centring free of cancellation)."""
        if not self.pending:
            return
        x = np.concatenate([p[0] for p in self.pending]).astype(np.float32, copy=False)
        y = np.concatenate([p[1] for p in self.pending]).astype(np.float32, copy=False)
        self.pending = []
        if self.gxx is None:
            self.x0, self.y0 = x.mean(0, dtype=np.float64), y.mean(0, dtype=np.float64)
            self.sx, self.sy = np.zeros(x.shape[1]), np.zeros(y.shape[1])
            self.syy = np.zeros(y.shape[1])
            self.gxx = np.zeros((x.shape[1], x.shape[1]))
            self.gxy = np.zeros((x.shape[1], y.shape[1]))
        x = x - self.x0.astype(np.float32)
        y = y - self.y0.astype(np.float32)
        self.n += x.shape[0]
        self.sx += x.sum(0, dtype=np.float64)
        self.sy += y.sum(0, dtype=np.float64)
        self.syy += np.square(y, dtype=np.float64).sum(0)
        self.gxx += x.T @ x
        self.gxy += x.T @ y

    @property
    def rows(self) -> int:
        """Rows taken so far (summed and queued)."""
        return self.n + sum(len(p[0]) for p in self.pending)


def refit(
    original: onnx.ModelProto,
    pruned: onnx.ModelProto,
    batches: Iterable[Mapping[str, np.ndarray]],
    *,
    max_rows: int = 20000,
    max_width: int = 4096,
    ridge: float = 1e-6,
    seed: int = 0,
    removal: Mapping[str, Iterable[int]] | None = None,
    device: str = "cpu",
    details: list[LayerRefit] | None = None,
    sequential: bool = True,
    cache_bytes: int = TARGET_CACHE_BYTES,
    frontier_bytes: int | None = None,
    max_samples: int | None = MAX_SAMPLES,
    cache: TargetCache | None = None,
) -> onnx.ModelProto:
    """Return a copy of ``pruned`` whose pruned consumers are refitted to ``original``'s
    outputs on ``batches`` (see the module docstring).

    Args:
        original: the model before pruning (the targets come from it; not modified).
        pruned: the pruned model (node names as in ``original``; not modified).
        batches: model-ready ``{input: array}`` batches (calibration data).
        max_rows: at most this many rows (positions) per layer, spread over the batches.
        max_width: a k x k Conv whose patches are wider (``K' k k``) is skipped.
        ridge: relative Tikhonov weight (times the mean diagonal of the centred Gram matrix).
        seed: seed of the row subsample.
        removal: group id -> units removed from ``original``; lets consumers whose output
            channels were pruned too be refitted (matched through ``original``'s layouts).
        device: ``cpu``, ``cuda`` or ``auto`` for the ONNX Runtime sessions.
        details: when given, one ``LayerRefit`` per candidate consumer is appended.
        sequential: refit layer by layer on the inputs earlier refits produce (one pass over
            ``batches`` per layer); False: all layers in one pass (module docstring).
        cache_bytes: in sequence, the original model's sampled target rows of every layer are
            drawn in one pass over ``batches`` and kept, when they fit in this many bytes
            (float32); each layer's pass then runs only the pruned model. The rows drawn are
            the same either way, so is the result.
        frontier_bytes: with the targets kept, the pruned model runs once, node by node in
            torch, every batch's live tensors held between layers (``refit_stream``) when they
            fit in this many bytes (default ``FRONTIER_BYTES``; 0: never); else
            one ONNX Runtime pass per layer. With it, the targets are computed in torch too.
        max_samples: read at most about this many samples of ``batches``: whole batches,
            evenly spaced (``_spread``); None: all. The rows are a sample anyway
            (``max_rows``), and every pass costs in proportion to the samples.
        cache: targets kept between calls (``TargetCache``): read when ``original`` is a
            model a refit with this cache returned, and filled with the returned model's.
    """
    out = onnx.ModelProto()
    out.CopyFrom(pruned)
    feeds = _spread(merge_batches(batches if isinstance(batches, Sequence) else list(batches)),
                    max_samples)
    layers, skipped = _plan(original, out, removal, max_width)
    if details is not None:
        details.extend(skipped)
    if not layers or not feeds:
        if details is not None:
            details.extend(LayerRefit(lay.node, skipped="no calibration data") for lay in layers)
        return out
    params = Params(out)
    waves = [[lay] for lay in layers] if sequential else [layers]
    targets = None
    frontier_bytes = FRONTIER_BYTES if frontier_bytes is None else frontier_bytes
    if sequential and 4 * max_rows * sum(lay.width for lay in layers) <= cache_bytes:
        targets = _cached_targets(layers, cache.get(original)) if cache is not None else None
        if targets is None:
            try:
                targets = _targets(original, layers, feeds, max_rows, seed, device,
                                   torch_ok=frontier_bytes > 0)
            except RuntimeError:  # a node torch could not run after all: ONNX Runtime's
                targets = _targets(original, layers, feeds, max_rows, seed, device, False)
    capture = None if cache is None else _Capture(pruned, len(feeds), max_rows, seed,
                                                  cache.max_bytes, max_width)
    if targets is not None and frontier_bytes > 0:
        found: list[LayerRefit] = []
        try:
            streamed = _streamed(pruned, params, layers, feeds, targets, ridge, device, found,
                                 frontier_bytes, capture)
        except RuntimeError:  # as above: start again with the per-layer passes
            streamed = False
            out.CopyFrom(pruned)
            params = Params(out)
            layers = _plan(original, out, removal, max_width)[0]
            waves = [[lay] for lay in layers]
        if streamed:
            if details is not None:
                details.extend(found)
            done = _finished(out, pruned)
            if capture is not None and capture.rows is not None:
                cache.put(done, capture.rows, keep=original)
            return done
    for wave in waves:  # graph order: _plan walks the (topologically sorted) nodes
        _accumulate(original, out, wave, feeds, max_rows, seed, device, targets)
        for lay in wave:
            info = _solve_and_write(params, lay, ridge)
            if details is not None:
                details.append(info)
    return _finished(out, pruned)


def _finished(out: onnx.ModelProto, pruned: onnx.ModelProto) -> onnx.ModelProto:
    """``out`` through ``cleanup.finalize`` (shapes, full checker) when the refit inserted
    nodes (a MatMul's bias ``Add``); a refit that only rewrote constants in place leaves the
    checked graph of ``pruned`` as it was, and is returned as is."""
    return finalize(out) if len(out.graph.node) != len(pruned.graph.node) else out


def _streamed(pruned, params, layers, feeds, targets, ridge, device, details, max_bytes,
              capture: _Capture | None = None) -> bool:
    """The sequential refit with the pruned graph run once, node by node, in torch
    (``refit_stream``); False, with nothing written, where it cannot run (no torch, say).
    ``capture`` also draws the refitted model's targets for the next refit, on the way."""
    try:
        from idap_onnx.calib.refit_stream import Stream
    except ImportError:  # torch is an optional dependency
        return False

    stream = Stream.open(pruned, feeds, device, max_bytes)
    if stream is None:
        return False
    events = [(stream.index[lay.node], 1, lay) for lay in layers]
    if capture is not None:
        events += [(k + 1, 0, name) for name, k in capture.producers.items()]
    for stop, kind, what in sorted(events, key=lambda e: (e[0], e[1])):
        envs = stream.advance(stop)
        if kind == 0:  # after the node that writes target ``what``: draw it
            capture.draw(what, [env[what].cpu().numpy() for env in envs])
            continue
        lay = what
        for b, env in enumerate(envs):
            sample = targets[lay.node][b]
            if sample is not None:
                _take(lay, env[lay.x].cpu().numpy(), sample)
        writes: list[Write] = []
        info = _solve_and_write(params, lay, ridge, writes)
        stream.write(writes)
        if details is not None:
            details.append(info)
    return True


class TargetCache:
    """The refitted models' own sampled targets, kept for the next refit.

    In ``optimize`` the model a step's refit returns is, when accepted, the ``original`` of
    the next step's refit: its targets are that model's outputs at the next step's pruned
    consumers. The one-pass refit (``refit_stream``) computes that model anyway, so it also
    draws, on the way, the rows of every node the next refit could read (every refittable
    Conv, Gemm and MatMul output, at full width) and keeps them here under the model it
    returned; a refit whose ``original`` is that very object takes its targets from here and
    skips the pass over it. The rows drawn are the same (same seed, same draws), the values
    are the torch run's. At most two models are held (the last ``original`` and the last
    result, so an undone step's retry finds its targets too), within ``max_bytes`` each.
    """

    def __init__(self, max_bytes: int = TARGET_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.entries: list[tuple[onnx.ModelProto, dict[str, list[_Sample | None]]]] = []

    def get(self, model: onnx.ModelProto) -> dict[str, list[_Sample | None]] | None:
        return next((rows for m, rows in self.entries if m is model), None)

    def put(self, model: onnx.ModelProto, rows, keep: onnx.ModelProto) -> None:
        self.entries = [e for e in self.entries if e[0] is keep] + [(model, rows)]


class _Capture:
    """Draws the rows a later ``_targets`` would draw, from tensors computed elsewhere:
    ``producers`` maps each target tensor to the index of the node that writes it."""

    def __init__(self, pruned: onnx.ModelProto, batches: int, max_rows: int, seed: int,
                 max_bytes: int, max_width: int) -> None:
        index = GraphIndex(pruned)
        position = {node.name: k for k, node in enumerate(pruned.graph.node)}
        self.producers: dict[str, int] = {}
        self.ops: dict[str, str] = {}
        for node in pruned.graph.node:
            w = _weight(index, node)
            if w is None or _unsupported(node.op_type, node, index, w, max_width):
                continue
            target, writer = _target(pruned, index, node)
            self.producers[target] = position[writer]
            self.ops[target] = node.op_type
        self.batches, self.max_rows, self.seed = batches, max_rows, seed
        self.max_bytes = max_bytes
        self.rows: dict[str, list[_Sample | None]] | None = {}
        self.bytes = 0

    def draw(self, name: str, outputs: list[np.ndarray]) -> None:
        """Draw ``name``'s rows from its value in every batch (``_targets``' draws)."""
        if self.rows is None:
            return
        lay = _Layer(name, self.ops[name], "", name, 0, 0, None)
        draw = _Drawer(lay, self.batches, self.max_rows, self.seed)
        found = [draw(out) for out in outputs]
        self.bytes += sum(s.y.nbytes for s in found if s is not None)
        self.rows[name] = found
        if self.bytes > self.max_bytes:  # too many to keep: the next refit makes its pass
            self.rows = None


def _cached_targets(layers, rows) -> dict[str, list[_Sample | None]] | None:
    """``_targets`` from a ``TargetCache`` entry (None when a layer's target is missing)."""
    if rows is None or any(lay.y not in rows for lay in layers):
        return None
    return {
        lay.node: [
            s if s is None or lay.out_keep is None else replace(s, y=s.y[:, lay.out_keep])
            for s in rows[lay.y]
        ]
        for lay in layers
    }


def _spread(feeds: list[dict[str, np.ndarray]], max_samples: int | None) -> list[dict]:
    """Every k-th batch, the smallest k that leaves at most ``max_samples`` samples (all of
    them when None or already fewer)."""
    sizes = [len(next(iter(f.values()))) if f else 0 for f in feeds]
    if max_samples is None or sum(sizes) <= max_samples:
        return feeds
    k = 2
    while sum(sizes[::k]) > max_samples and k < len(feeds):
        k += 1
    return feeds[::k]


def merge_batches(
    feeds: Sequence[Mapping[str, np.ndarray]],
    samples: int = MERGE_SAMPLES,
    max_bytes: int = MERGE_BYTES,
) -> list[dict[str, np.ndarray]]:
    """Consecutive batches joined along the batch axis while every input keeps its trailing
    shape and dtype, up to ``samples`` samples or ``max_bytes`` of inputs a batch (a batch is
    never split): the same data in fewer, larger runs (a run's fixed cost dominates small
    batches)."""

    def size(feed) -> int:
        return len(next(iter(feed.values())))

    def key(feed) -> tuple:
        return tuple((k, v.shape[1:], v.dtype) for k, v in sorted(feed.items()))

    out: list[list[Mapping[str, np.ndarray]]] = []
    for feed in feeds:
        if not feed or any(np.ndim(v) == 0 for v in feed.values()):
            out.append([feed])
            continue
        last = out[-1] if out else None
        if (last is not None and len(last[0]) and key(last[0]) == key(feed)
                and sum(size(f) for f in last) + size(feed) <= samples
                and sum(v.nbytes for f in [*last, feed] for v in f.values()) <= max_bytes):
            last.append(feed)
        else:
            out.append([feed])
    return [dict(group[0]) if len(group) == 1 else
            {k: np.concatenate([f[k] for f in group]) for k in group[0]} for group in out]


# -- which layers -------------------------------------------------------------------------------


def _widths(op: str, node: onnx.NodeProto, w: np.ndarray) -> tuple[int, int]:
    """(input width K, output width N) of a consumer's weight."""
    if op == "Conv":
        return int(w.shape[1]), int(w.shape[0])
    if op == "Gemm" and int(attr(node, "transB", 0)):
        return int(w.shape[1]), int(w.shape[0])
    return int(w.shape[0]), int(w.shape[1])


def _is_patch_conv(node: onnx.NodeProto, w: np.ndarray) -> bool:
    """A Conv whose rows are patches: a kernel larger than 1x1, or explicit padding (``auto_pad``
    SAME never pads a 1x1 kernel: ``(ceil(n / s) - 1) s + 1 <= n``)."""
    padded = any(int(p) != 0 for p in (attr(node, "pads", None) or []))
    return padded or any(int(d) != 1 for d in w.shape[2:])


def _unsupported(
    op: str, node: onnx.NodeProto, index: GraphIndex, w: np.ndarray, max_width: int = 4096
) -> str:
    """Why ``node`` cannot be refitted in closed form ('' when it can)."""
    if op == "Conv":
        if int(attr(node, "group", 1)) != 1:
            return "grouped Conv"
        if w.ndim < 3:
            return "Conv weight without spatial axes"
        if _is_patch_conv(node, w):
            if w.ndim != 4:
                return "k x k Conv that is not 2-D"
            width = int(np.prod(w.shape[1:]))
            if width > max_width:
                return f"k x k Conv too wide to refit ({width} > max_width {max_width})"
    elif op == "Gemm":
        if w.ndim != 2:
            return "Gemm B is not a matrix"
        if len(node.input) > 2 and node.input[2]:
            c = index.constant(node.input[2])
            n = _widths(op, node, w)[1]
            if c is None:
                return "Gemm C is not a constant"
            if not (c.size in (1, n) and (c.ndim <= 1 or c.shape[0] == 1)):
                return "Gemm C is not a per-output vector"
        if float(attr(node, "beta", 1.0)) == 0.0 or float(attr(node, "alpha", 1.0)) == 0.0:
            return "Gemm alpha or beta is 0"
    elif w.ndim != 2:
        return "MatMul weight is not 2-D"
    return ""


def _weight(index: GraphIndex, node: onnx.NodeProto) -> np.ndarray | None:
    """The constant weight (an initializer, at least 2-D) of a ``REFIT_OPS`` node; None for
    any other node."""
    if node.op_type not in REFIT_OPS or len(node.input) < 2:
        return None
    if index.initializer_name(node.input[1]) is None:
        return None
    w = index.constant(node.input[1])
    return w if w is not None and w.ndim >= 2 else None


def _target(model: onnx.ModelProto, index: GraphIndex, node: onnx.NodeProto) -> tuple[str, str]:
    """(tensor, name of the node writing it) that a refit of ``node`` reconstructs: its
    output, or for a MatMul the output of the ``Add`` holding its bias."""
    if node.op_type == "MatMul":
        found = bias_add(model, index, node)
        if found is not None:
            return found[0].output[0], found[0].name
    return node.output[0], node.name


def _plan(
    original: onnx.ModelProto, pruned: onnx.ModelProto, removal, max_width: int = 4096
) -> tuple[list[_Layer], list[LayerRefit]]:
    oidx, pidx = GraphIndex(original), GraphIndex(pruned)
    layers: list[_Layer] = []
    skipped: list[LayerRefit] = []
    dead = None
    ograph = None
    for node in pruned.graph.node:
        onode = oidx.node_by_name.get(node.name)
        if onode is None or onode.op_type != node.op_type:
            continue
        w, wo = _weight(pidx, node), _weight(oidx, onode)
        if w is None or wo is None or w.ndim != wo.ndim:
            continue
        (k, n), (ko, no) = _widths(node.op_type, node, w), _widths(onode.op_type, onode, wo)
        if k >= ko:
            continue
        why = _unsupported(node.op_type, node, pidx, w, max_width)
        if why:
            skipped.append(LayerRefit(node.name, skipped=why))
            continue
        keep = None
        if n != no:
            if removal is None:
                skipped.append(LayerRefit(node.name, skipped="output width changed"))
                continue
            if ograph is None:
                from idap_onnx.dependency import analyze_model

                ograph = analyze_model(original)
                dead = ograph.removed_channels({g: list(u) for g, u in removal.items()})
            lay = ograph.layouts.get(onode.output[0])
            keep = None if lay is None else lay.keep_mask(dead)
            if keep is None or len(keep) != no or int(keep.sum()) != n:
                skipped.append(LayerRefit(node.name, skipped="output channels cannot be mapped"))
                continue
        layers.append(
            _Layer(
                node.name,
                node.op_type,
                node.input[0],
                _target(original, oidx, onode)[0],
                k,
                n,
                keep,
                strides=tuple(int(s) for s in (attr(node, "strides", None) or [])),
                trans_a=bool(int(attr(node, "transA", 0))),
                conv=node if node.op_type == "Conv" and _is_patch_conv(node, w) else None,
                kernel=tuple(int(d) for d in w.shape[2:]),
            )
        )
    return layers, skipped


# -- collecting rows ----------------------------------------------------------------------------


def _session(model: onnx.ModelProto, names: list[str], device: str) -> ort.InferenceSession:
    """A session whose outputs are ``names`` (distinct), computing only the nodes they depend
    on (a sequential refit's early layers need a prefix of the graph), built from a temporary
    file that streams the weights (``model_io.write_variant``): no in-memory copy of the
    model."""
    need = needed_indices(model.graph, names)
    nodes = None if need is None else [model.graph.node[i] for i in need]
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    with tempfile.TemporaryDirectory(prefix="idap-refit-") as tmp:
        path = write_variant(model, Path(tmp) / "refit.onnx",
                             nodes=model.graph.node if nodes is None else nodes,
                             outputs=names, only_outputs=True)
        return ort.InferenceSession(str(path), opts, providers=providers(device))


def _rows(lay: _Layer, a: np.ndarray, is_input: bool) -> np.ndarray:
    """The ``[rows, features]`` view of a node input (``is_input``) or output tensor."""
    if lay.op == "Conv":
        if is_input and lay.strides:
            a = a[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in lay.strides)]
        return np.moveaxis(a, 1, -1).reshape(-1, a.shape[1])
    if lay.op == "Gemm" and is_input and lay.trans_a:
        return a.T
    return a.reshape(-1, a.shape[-1])


@dataclass(frozen=True)
class _Sample:
    """The target rows one layer draws from one batch: ``pick`` of its ``total`` rows, their
    values ``y`` (``out_keep`` applied) and the original output's shape (for conv patches)."""

    pick: np.ndarray
    y: np.ndarray
    shape: tuple[int, ...]
    total: int


def _draw(lay: _Layer, out: np.ndarray, quota: int, max_rows: int, n: int, rng) -> _Sample | None:
    """Up to ``quota`` rows of output ``out``, uniformly without replacement, while the layer
    has fewer than ``max_rows`` (``n`` so far); None when it has them all."""
    y = _rows(lay, out, False)
    if lay.out_keep is not None:
        y = y[:, lay.out_keep]
    take = min(y.shape[0], quota, max_rows - n)
    if take <= 0:
        return None
    pick = np.sort(rng.choice(y.shape[0], take, replace=False))
    return _Sample(pick, y[pick], tuple(out.shape), y.shape[0])


def _targets(original, layers, feeds, max_rows: int, seed: int, device: str, torch_ok: bool):
    """Every layer's samples, per batch, from one pass of ``original`` (``_pulled``): each
    layer draws with its own generator seeded ``seed``, as a wave of that layer alone does in
    ``_accumulate``."""
    ys = list(dict.fromkeys(lay.y for lay in layers))
    draws = {lay.node: _Drawer(lay, len(feeds), max_rows, seed) for lay in layers}
    samples: dict[str, list[_Sample | None]] = {lay.node: [] for lay in layers}
    for got in _pulled(original, feeds, ys, device, torch_ok):
        for lay in layers:
            samples[lay.node].append(draws[lay.node](got[lay.y]))
    return samples


class _Drawer:
    """One layer's draws over the batches in turn: its own generator seeded ``seed``, a quota
    of ``ceil(max_rows / batches)`` rows a batch, at most ``max_rows`` in all (``_draw``)."""

    def __init__(self, lay: _Layer, batches: int, max_rows: int, seed: int) -> None:
        self.lay, self.max_rows = lay, max_rows
        self.quota = max(1, math.ceil(max_rows / batches))
        self.rng = np.random.default_rng(seed)
        self.drawn = 0

    def __call__(self, out: np.ndarray) -> _Sample | None:
        sample = _draw(self.lay, out, self.quota, self.max_rows, self.drawn, self.rng)
        self.drawn += 0 if sample is None else len(sample.pick)
        return sample


def _pulled(model, feeds, names: list[str], device: str, torch_ok: bool):
    """Tensors ``names`` of ``model`` on each feed in turn: computed in torch on one thread
    when ``torch_ok`` and the model runs there (``refit_stream.pulled``; a CNN's pass took
    about half the time of ONNX Runtime's with graph optimizations off), else by ONNX
    Runtime."""
    if torch_ok:
        try:
            from idap_onnx.calib.refit_stream import pulled
        except ImportError:  # torch is an optional dependency
            pulled = None
        found = None if pulled is None else pulled(model, feeds, names, device)
        if found is not None:
            return found
    sess = _session(model, names, device)
    return (dict(zip(names, sess.run(names, dict(feed)), strict=True)) for feed in feeds)


def _accumulate(
    original, pruned, layers, feeds, max_rows: int, seed: int, device: str, targets=None
) -> None:
    """Add the rows of ``layers`` from every batch: inputs from ``pruned``, targets from
    ``original`` (or from ``targets``, drawn beforehand by ``_targets``)."""
    xs = list(dict.fromkeys(lay.x for lay in layers))
    sess_x = _session(pruned, xs, device)
    if targets is None:
        ys = list(dict.fromkeys(lay.y for lay in layers))
        sess_y = _session(original, ys, device)
    quota = max(1, math.ceil(max_rows / len(feeds)))
    rng = np.random.default_rng(seed)
    for b, feed in enumerate(feeds):
        got_x = dict(zip(xs, sess_x.run(xs, dict(feed)), strict=True))
        if targets is None:
            got_y = dict(zip(ys, sess_y.run(ys, dict(feed)), strict=True))
        for lay in layers:
            if targets is None:
                sample = _draw(lay, got_y[lay.y], quota, max_rows, lay.rows, rng)
            else:
                sample = targets[lay.node][b]
            if sample is not None:
                _take(lay, got_x[lay.x], sample)


def _take(lay: _Layer, a: np.ndarray, sample: _Sample) -> None:
    """Add to ``lay`` the rows of its input tensor ``a`` at the target rows of ``sample``."""
    if lay.conv is not None:
        rows = _patches(lay.conv, lay.kernel, a, sample.shape, sample.pick)
    else:
        x = _rows(lay, a, True)
        if x.shape[0] != sample.total:
            raise ValueError(f"refit of '{lay.node}': {x.shape[0]} input rows but "
                             f"{sample.total} output rows")
        rows = x[sample.pick]
    lay.add(rows, sample.y)


def _patches(node: onnx.NodeProto, kernel, a: np.ndarray, y_shape, pick: np.ndarray) -> np.ndarray:
    """The input patches ``[rows, C k_h k_w]`` (channel-major, the weight's flattened order)
    under 2-D Conv ``node``'s kernel at output rows ``pick`` (``(n, i, j)`` flattened over the
    output ``y_shape``), zero where the kernel reads padding."""
    strides = list(attr(node, "strides", None) or [1, 1])
    dilations = list(attr(node, "dilations", None) or [1, 1])
    pads = conv_pads(node, a.shape[2:], kernel, strides, dilations)
    padded = np.pad(a, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    n, i, j = np.unravel_index(pick, (y_shape[0], y_shape[2], y_shape[3]))
    kh, kw = np.meshgrid(np.arange(kernel[0]), np.arange(kernel[1]), indexing="ij")
    rows = i[:, None] * strides[0] + kh.reshape(1, -1) * dilations[0]  # [picked, taps]
    cols = j[:, None] * strides[1] + kw.reshape(1, -1) * dilations[1]
    patches = padded[n[:, None], :, rows, cols]  # [picked, taps, C]
    return np.swapaxes(patches, 1, 2).reshape(len(pick), -1)


# -- solving and writing ------------------------------------------------------------------------


def _current(params: Params, node: onnx.NodeProto, op: str) -> tuple[np.ndarray, np.ndarray]:
    """The pruned node as ``X W + b`` (W ``[K', N]``, b ``[N]``, float64)."""
    w = params.get(node, 1).astype(np.float64)
    if op == "Conv":
        wm = w.reshape(w.shape[0], -1).T
        b = params.get(node, 2)
        return wm, np.zeros(wm.shape[1]) if b is None else b.astype(np.float64).reshape(-1)
    if op == "Gemm":
        alpha, beta = float(attr(node, "alpha", 1.0)), float(attr(node, "beta", 1.0))
        wm = alpha * (w.T if int(attr(node, "transB", 0)) else w)
        c = params.get(node, 2)
        b = np.zeros(wm.shape[1]) if c is None else beta * c.astype(np.float64).reshape(-1)
        return wm, np.broadcast_to(b, (wm.shape[1],)).copy()
    found = bias_add(params.model, GraphIndex(params.model), node)
    b = np.zeros(w.shape[1])
    if found is not None:
        b = params.get(params.nodes[found[0].name], found[1]).astype(np.float64).reshape(-1)
    return w, b


def _sse(lay: _Layer, w: np.ndarray, b: np.ndarray) -> float:
    """sum ||X W + b - Y||^2 over the accumulated rows, from the normal-equation sums (of
    the shifted rows: ``X W + b - Y = Xs W + (b + x0 W - y0) - Ys``)."""
    b = b + lay.x0 @ w - lay.y0
    quad = float(np.sum(w * (lay.gxx @ w)))  # trace(W^T G W), by BLAS (einsum loops in C)
    cross = 2 * float(b @ (w.T @ lay.sx)) + lay.n * float(b @ b)
    lin = 2 * float(np.sum(w * lay.gxy)) + 2 * float(b @ lay.sy)
    return float(quad + cross - lin + lay.syy.sum())


def _solve(a: np.ndarray, h: np.ndarray) -> np.ndarray:
    """``a^-1 h`` for the symmetric positive definite ``a`` (float64): Cholesky in torch on
    one thread where torch imports (3-6x faster than numpy's LU on the 2-core machines, a
    1400-wide system in 0.05 s against 0.2-0.3 s), else numpy's LU; least squares when ``a``
    is singular."""
    try:
        import torch

        from idap_onnx.calib.refit_stream import single_thread
    except ImportError:
        torch = None
    if torch is not None:
        with single_thread():
            ta, th = torch.from_numpy(a), torch.from_numpy(np.ascontiguousarray(h))
            factor, info = torch.linalg.cholesky_ex(ta)
            if int(info) == 0:
                return torch.cholesky_solve(th, factor).numpy()
    try:
        return np.linalg.solve(a, h)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(a, h, rcond=None)[0]


def _solve_and_write(
    params: Params, lay: _Layer, ridge: float, writes: list[Write] | None = None
) -> LayerRefit:
    """Solve ``lay``'s normal equations and write the weights into ``params`` when they lower
    the reconstruction error; the values written are appended to ``writes`` when given."""
    lay.flush()
    info = LayerRefit(lay.node, rows=lay.n)
    if lay.n < 2 or lay.gxx is None:
        info.skipped = "too few rows"
        return info
    if lay.n < ROWS_PER_UNKNOWN * lay.gxx.shape[0]:
        info.skipped = (f"too few rows: {lay.n} for {lay.gxx.shape[0]} inputs (needs "
                        f"{ROWS_PER_UNKNOWN} per input; more calibration samples)")
        return info
    node = params.nodes[lay.node]
    mx, my = lay.sx / lay.n, lay.sy / lay.n
    gc = lay.gxx - lay.n * np.outer(mx, mx)
    hc = lay.gxy - lay.n * np.outer(mx, my)
    lam = ridge * max(float(np.trace(gc)) / gc.shape[0], 1e-12)
    w_new = _solve(gc + lam * np.eye(gc.shape[0]), hc)
    b_new = my - mx @ w_new + lay.y0 - lay.x0 @ w_new  # back from the shifted rows
    w_old, b_old = _current(params, node, lay.op)
    total = max(float(lay.syy.sum() - lay.n * float(my @ my)), 1e-30)
    info.err_before = _sse(lay, w_old, b_old) / total
    # At the solution (Gc + lam I) W = Hc, so the centred residual is syy_c - tr(W'Hc) - lam |W|^2
    fitted = float(np.sum(w_new * hc)) + lam * float(np.sum(w_new * w_new))
    info.err_after = (total - fitted) / total
    if not np.all(np.isfinite(w_new)) or not info.err_after < info.err_before:
        info.skipped = "refit does not lower the reconstruction error"
        return info
    done = _write(params, node, lay.op, w_new, b_new)
    if writes is not None:
        writes.extend(done)
    info.applied = True
    return info


#: A value a refit wrote: (node name, input index, value); input index -1 is a bias added
#: to output 0 by an inserted ``Add`` (a MatMul that had none).
Write = tuple[str, int, np.ndarray]


def _write(
    params: Params, node: onnx.NodeProto, op: str, w: np.ndarray, b: np.ndarray
) -> list[Write]:
    """Write ``X W + b`` into ``node``'s constants (module docstring); the values written, as
    the node inputs that read them."""
    old = params.get(node, 1)
    dtype = old.dtype
    if op == "Conv":
        bias = params.get(node, 2)
        done = [(node.name, 1, w.T.reshape(old.shape).astype(dtype)),
                (node.name, 2, b.astype(dtype if bias is None else bias.dtype))]
    elif op == "Gemm":
        alpha, beta = float(attr(node, "alpha", 1.0)), float(attr(node, "beta", 1.0))
        wm = w / alpha
        c = params.get(node, 2)
        shape = (b.shape[0],) if c is None or c.ndim <= 1 else (1, b.shape[0])
        done = [(node.name, 1, (wm.T if int(attr(node, "transB", 0)) else wm).astype(dtype)),
                (node.name, 2, (b / beta).reshape(shape).astype(dtype if c is None else c.dtype))]
    else:
        found = bias_add(params.model, GraphIndex(params.model), node)
        if found is None:
            params.set(node, 1, w.astype(dtype))
            insert_bias_add(params, node, b.astype(dtype))
            return [(node.name, 1, w.astype(dtype)), (node.name, -1, b.astype(dtype))]
        add, j = found
        bias = params.get(params.nodes[add.name], j)
        done = [(node.name, 1, w.astype(dtype)),
                (add.name, j, b.reshape(bias.shape).astype(bias.dtype))]
    for name, i, value in done:
        params.set(params.nodes[name], i, value)
    return done
