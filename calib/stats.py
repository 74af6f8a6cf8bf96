"""Calibration statistics measured inside the graph by ONNX Runtime.

The model is augmented with reduction nodes whose outputs are small: per-channel sums and
sums of squares of the tensors the scores need (over batch, spatial and token axes), total
output energies of the consumers, per-sample norms of block inputs/outputs. Sessions run with
the fusions that keep every probed tensor (see ``_session``). Each reduction runs in float32
within a sample (no probed activation is copied), its small partial result in float64 across
the batch, and batches accumulate in float64, so memory does not grow with the number of
samples or with activation sizes. Image tensors of a model with static image sizes are
reduced over each image row by ``AveragePool`` (``pooled``), an op that keeps ONNX Runtime's
NCHWc layout, so the convolutions run in it as in plain inference; other tensors are reduced
over one axis first (image rows, token features) by ``ReduceSum``.

What is measured (see ``calib.scores`` for the formulas that use it):

- ``channel[T]``: for a tensor T with channel axis a: ``sum``, ``sumsq`` per element of a,
  and ``count`` (positions per channel, summed over batches);
- ``energy[Y]``: ``sum(Y**2)`` of the flow tensor a consumer's output joins (``flow``),
  summed over batches;
- ``relu_norm[Y]``: ``sum_b ||ReLU(Y[b, c])||_2`` per channel (the released code's score);
- ``block[name]``: ``sum_b ||y_b - x_b||`` and ``sum_b ||y_b||`` (layer divergence);
- ``samples``: the number of samples seen.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import heapq
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from idap_onnx.blocks import Block, find_blocks, residual_flows
from idap_onnx.dependency import SLICE, DependencyGraph
from idap_onnx.graph import needed_indices
from idap_onnx.model_io import write_variant

WEIGHTED = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}


@dataclass(frozen=True)
class ChannelProbe:
    """Per-channel statistics of ``tensor`` along ``axis`` (``shape``: its analysis shape)."""

    tensor: str
    axis: int
    shape: tuple

    @property
    def rank(self) -> int:
        return len(self.shape)


@dataclass
class ProbePlan:
    """Which tensors to measure; built from the dependency graph and the blocks."""

    channels: dict[str, ChannelProbe] = field(default_factory=dict)
    energies: dict[str, tuple] = field(default_factory=dict)  # consumer output -> its shape
    relu_norms: dict[str, ChannelProbe] = field(default_factory=dict)
    blocks: dict[str, Block] = field(default_factory=dict)
    batch_axis: dict[str, int | None] = field(default_factory=dict)
    block_shape: dict[str, tuple] = field(default_factory=dict)  # of the block's output
    flow: dict[str, str] = field(default_factory=dict)  # consumer output -> its flow tensor
    pooled: bool = False  # 4-D tensors reduced by AveragePool over rows (see ``pooled``)


def pooled(plan: ProbePlan, shape: tuple, axis: int = 1) -> bool:
    """Whether a probe on a tensor of ``shape`` reduces its image rows with ``AveragePool``:
    a 4-D NCHW tensor (channel axis 1) in a model whose inputs have static non-batch dims
    (``plan.pooled``), so its width is the analysis shape's at run time. ONNX Runtime keeps
    ``AveragePool`` and ``Mul`` in its NCHWc layout, so such probes let the convolutions run
    in it (see ``_session``)."""
    return (plan.pooled and len(shape) == 4 and axis == 1
            and all(isinstance(d, int) and d > 0 for d in shape[2:]))


@dataclass
class CalibStats:
    """Accumulated statistics (float64); see the module docstring."""

    samples: int = 0
    channel_sum: dict[str, np.ndarray] = field(default_factory=dict)
    channel_sumsq: dict[str, np.ndarray] = field(default_factory=dict)
    channel_count: dict[str, float] = field(default_factory=dict)
    energy: dict[str, float] = field(default_factory=dict)
    relu_norm: dict[str, np.ndarray] = field(default_factory=dict)
    resolution: dict[str, float] = field(default_factory=dict)
    flow: dict[str, str] = field(default_factory=dict)  # see ``ProbePlan.flow``
    block_diff: dict[str, float] = field(default_factory=dict)
    block_out: dict[str, float] = field(default_factory=dict)
    provider: str = "CPUExecutionProvider"
    nchwc_nodes: int = 0  # ops the session runs in ONNX Runtime's NCHWc layout (``_session``)

    def mean(self, tensor: str) -> np.ndarray:
        return self.channel_sum[tensor] / max(self.channel_count[tensor], 1.0)

    def second_moment(self, tensor: str) -> np.ndarray:
        """E[a_c^2] = var_c + mu_c^2 per element of the channel axis."""
        return self.channel_sumsq[tensor] / max(self.channel_count[tensor], 1.0)

    def variance(self, tensor: str) -> np.ndarray:
        """var_c = E[a_c^2] - mu_c^2, taken as 0 below ``resolution[tensor]`` times E[a_c^2]:
        the partial sums within a sample are float32, so a smaller difference is rounding,
        not signal (a constant channel has variance exactly 0)."""
        m2 = self.second_moment(tensor)
        var = m2 - self.mean(tensor) ** 2
        return np.where(var > self.resolution.get(tensor, 0.0) * m2, var, 0.0)


#: Unit scores whose statistics ``plan_probes`` can add (``calib.scores.UNIT_SCORES`` less the
#: weight-only ones, which need no probes).
PROBED_SCORES = ("idap", "paper", "wanda")


def plan_probes(
    graph: DependencyGraph, blocks: Iterable[Block] = (), *, scores: Iterable[str] = PROBED_SCORES
) -> ProbePlan:
    """The tensors to measure: always every weighted consumer's input (its channel means are
    what mean compensation folds into biases), plus what each requested unit score reads:
    ``idap`` the energies of the flow tensors the consumers' outputs join (``flow``: the
    residual block's output for the last weighted node of a branch, else the output itself)
    and the per-channel moments of each consumer's output (its coherence, ``calib.scores``),
    ``paper`` the producers' ReLU norms, ``wanda`` the producers' input channels; and every
    block's input and output. Probing only what the chosen score needs keeps the calibration
    pass close to plain inference."""
    scores = set(scores)
    plan = ProbePlan()
    index = graph.index
    if "idap" in scores:
        plan.flow = residual_flows(index, find_blocks(graph.model, index))
    frozen = {gi for gi, g in enumerate(graph.groups) if g.frozen}
    for edit in graph.edits:
        if edit.kind != SLICE or edit.role not in ("producer", "consumer"):
            continue
        node = index.node_by_name[edit.node]
        if WEIGHTED.get(node.op_type) != edit.input:
            continue
        groups, _ = graph.element_units(edit.tensor)
        if not set(np.unique(groups[groups >= 0]).tolist()) - frozen:
            continue  # only frozen groups' channels: never removed, never scored
        lay = graph.layouts[edit.tensor]
        shape = index.shape(edit.tensor)
        if shape is None:
            continue
        if edit.role == "consumer":
            plan.channels[edit.tensor] = ChannelProbe(edit.tensor, lay.axis, tuple(shape))
            y = plan.flow.get(node.output[0], node.output[0])
            if "idap" in scores and index.shape(y) is not None:
                plan.energies[y] = tuple(index.shape(y))
            out = node.output[0]  # its per-channel moments give the consumer's coherence
            out_shape = index.shape(out)
            if "idap" in scores and out_shape and out not in plan.channels:
                axis = 1 if node.op_type in ("Conv", "ConvTranspose") else len(out_shape) - 1
                plan.channels[out] = ChannelProbe(out, axis, tuple(out_shape))
            continue
        if "paper" in scores:
            plan.relu_norms[edit.tensor] = ChannelProbe(edit.tensor, lay.axis, tuple(shape))
        x = node.input[0]
        x_shape = index.shape(x)
        if "wanda" in scores and x_shape is not None and x not in plan.channels:
            axis = len(x_shape) - 1 if node.op_type == "MatMul" else 1
            plan.channels[x] = ChannelProbe(x, axis, tuple(x_shape))
    plan.pooled = _static_inputs(graph.model)
    for block in blocks:
        plan.blocks[block.name] = block
        shape = index.shape(block.output)
        plan.batch_axis[block.name] = 0 if shape and shape[0] == 1 else None
        plan.block_shape[block.name] = tuple(shape or ())
    return plan


def _static_inputs(model: onnx.ModelProto) -> bool:
    """Every graph input (not an initializer) declares static dims after the batch dim."""
    inits = {i.name for i in model.graph.initializer}
    for value in model.graph.input:
        if value.name in inits:
            continue
        dims = value.type.tensor_type.shape.dim
        if not dims or any(not d.HasField("dim_value") or d.dim_value <= 0 for d in dims[1:]):
            return False
    return True


class _Builder:
    """Appends reduction nodes in two stages, the precision/cost trade-off of the pass: over
    the innermost reduced axis (image rows' pixels, a token's features; never the batch) in
    float32, so no probed activation is copied; then the partial result, smaller by that
    axis's length, is cast to float64 and reduced over the rest. Batches accumulate in
    float64. The float32 stage sums at most that axis's length n of terms, so its relative
    error is below n * 2**-24 (``resolution``). Pooled probes (``pooled``) do the same float32
    stage, one image row, with ``AveragePool``."""

    def __init__(self, opset: int) -> None:
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.squares: dict[str, str] = {}

    def node(self, op: str, inputs: list[str], out: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def reduce(self, op: str, x: str, axes: list[int], out: str) -> str:
        """``op(x, axes, keepdims=0)`` with the axes spelled as this opset wants."""
        if self.opset >= 18 or (op == "ReduceSum" and self.opset >= 13):
            name = f"{out}__axes"
            self.inits.append(helper.make_tensor(name, TensorProto.INT64, [len(axes)], axes))
            return self.node(op, [x, name], out, keepdims=0)
        return self.node(op, [x], out, axes=axes, keepdims=0)

    def total(self, op: str, x: str, shape: tuple, keep: set[int], out: str) -> str:
        """``op`` (``ReduceSum`` or ``ReduceSumSquare``) of float32 ``x`` over every axis not
        in ``keep``, as a float64 tensor named ``out`` whose axes are the kept ones in order."""
        rank = len(shape)
        rest = [a for a in range(rank) if a not in keep]
        inner = [a for a in rest if a != 0][-1:]
        if inner:
            part, op = self.reduce(op, x, inner, f"{out}::f32"), "ReduceSum"
        elif op == "ReduceSumSquare" and not rest:
            part = self.node("Mul", [x, x], f"{out}::sq")
        else:
            part = x
        cast = self.node("Cast", [part], f"{out}::f64", to=TensorProto.DOUBLE)
        left = [a for a in range(rank) if a not in inner]
        axes = [left.index(a) for a in rest if a not in inner]
        if axes:
            return self.reduce(op, cast, axes, out)
        return self.node("Identity", [cast], out)

    def square(self, x: str) -> str:
        """``x * x``, made once per tensor."""
        if x not in self.squares:
            self.squares[x] = self.node("Mul", [x, x], f"idap::sq::{x}")
        return self.squares[x]

    def pooled(self, x: str, width: int, axes: list[int], out: str) -> str:
        """``sum`` of float32 NCHW ``x`` over its image rows and ``axes`` of the row sums
        ``[N, C, H, 1]``: ``AveragePool`` over each row (kernel and stride ``1 x width``: the
        same float32 stage as the row-wise probes, in an op that keeps the NCHWc layout),
        cast to float64, summed over ``axes`` and times ``width``."""
        rows = self.node("AveragePool", [x], f"{out}::rows", kernel_shape=[1, width],
                         strides=[1, width])
        cast = self.node("Cast", [rows], f"{out}::f64", to=TensorProto.DOUBLE)
        total = self.reduce("ReduceSum", cast, axes, f"{out}::sum")
        name = f"{out}::w"
        self.inits.append(helper.make_tensor(name, TensorProto.DOUBLE, [], [float(width)]))
        return self.node("Mul", [total, name], out)


def resolution(shape: tuple, keep: set[int]) -> float:
    """``3 n 2**-24``: bounds the float32 stage's relative error in a variance
    ``E[a^2] - mu^2`` (n terms per float32 partial sum, see ``_Builder``; 1024 if unknown)."""
    inner = [a for a in range(1, len(shape)) if a not in keep][-1:]
    n = shape[inner[0]] if inner else 1
    return 3.0 * (n if isinstance(n, int) and n > 0 else 1024) * 2.0**-24


def augment(model: onnx.ModelProto, plan: ProbePlan) -> tuple[list[onnx.NodeProto],
                                                              list[onnx.TensorProto], list[str]]:
    """The reduction nodes of ``plan`` for ``model``: the graph's nodes with the probes
    interleaved (each right after what it reads), the probes' constants, and their outputs.

    Per channel probe on T (channel axis a): ``sum`` and ``sumsq`` over every other axis and
    ``Size(T)``; per energy probe on Y: ``sum(Y**2)``; per ReLU-norm probe:
    ``sum_b ||ReLU(T[b, c])||_2``; per block: ``sum_b ||y_b - x_b||`` (for a residual block
    ``y - x`` is its branch ``f(x)``, read directly) and ``sum_b ||y_b||``. A block output
    that is also an energy's flow tensor is squared once; the energy of a channel-probed
    tensor is the sum of its per-channel ``sumsq`` (the tensor is not read again).
    """
    opset = next(i.version for i in model.opset_import if i.domain in ("", "ai.onnx"))
    b = _Builder(opset)
    outputs: list[str] = []
    for t, p in plan.channels.items():
        if pooled(plan, p.shape, p.axis):
            w = p.shape[3]
            outputs.append(b.pooled(t, w, [0, 2, 3], f"idap::sum::{t}"))
            outputs.append(b.pooled(b.square(t), w, [0, 2, 3], f"idap::sumsq::{t}"))
            # N C H W from the row sums: Size of the probed tensor would copy it out of NCHWc
            size = b.node("Size", [f"idap::sum::{t}::rows"], f"idap::size::{t}::nch")
            name = f"idap::size::{t}::w"
            b.inits.append(helper.make_tensor(name, TensorProto.INT64, [], [w]))
            outputs.append(b.node("Mul", [size, name], f"idap::size::{t}"))
            continue
        for op, key in (("ReduceSum", "sum"), ("ReduceSumSquare", "sumsq")):
            outputs.append(b.total(op, t, p.shape, {p.axis}, f"idap::{key}::{t}"))
        outputs.append(b.node("Size", [t], f"idap::size::{t}"))
    for t, p in plan.relu_norms.items():
        relu = b.node("Relu", [t], f"idap::relu::{t}")
        sq = b.total("ReduceSumSquare", relu, p.shape, {0, p.axis}, f"idap::relusq::{t}")
        norm = b.node("Sqrt", [sq], f"idap::relunorm_b::{t}")
        outputs.append(b.reduce("ReduceSum", norm, [0], f"idap::relunorm::{t}"))
    per_sample_sq: dict[str, str] = {}  # block output -> its per-sample sums of squares
    for bname, block in plan.blocks.items():
        # y - x of a residual block is its branch f(x): no Sub, and no rounding of y - x
        diff = (block.branch if block.kind == "residual"
                else b.node("Sub", [block.output, block.input], f"idap::diff::{bname}"))
        shape = plan.block_shape[bname]
        per_sample = plan.batch_axis[bname] is not None and len(shape) > 0
        for src, key in ((diff, "bdiff"), (block.output, "bout")):
            name = f"idap::{key}::{bname}"
            if per_sample:
                if src not in per_sample_sq:
                    per_sample_sq[src] = (
                        b.pooled(b.square(src), shape[3], [1, 2, 3], f"{name}::sq")
                        if pooled(plan, shape)
                        else b.total("ReduceSumSquare", src, shape, {0}, f"{name}::sq"))
                norms = b.node("Sqrt", [per_sample_sq[src]], f"{name}::norms")
                outputs.append(b.reduce("ReduceSum", norms, [0], name))
            else:
                sq = b.total("ReduceSumSquare", src, shape, set(), f"{name}::sq")
                outputs.append(b.node("Sqrt", [sq], name))
    for y in sorted(plan.energies):
        name = f"idap::energy::{y}"
        shape = plan.energies[y]
        if y in per_sample_sq:  # a block output: its per-sample squares are there already
            outputs.append(b.reduce("ReduceSum", per_sample_sq[y], [0], name))
        elif y in plan.channels:  # a consumer's output: the sum of its channels' sumsq
            outputs.append(b.reduce("ReduceSum", f"idap::sumsq::{y}", [0], name))
        elif pooled(plan, shape):
            outputs.append(b.pooled(b.square(y), shape[3], [0, 1, 2, 3], name))
        else:
            outputs.append(b.total("ReduceSumSquare", y, plan.energies[y], set(), name))
    consts = {i.name for i in b.inits}
    return _interleave(model.graph, b.nodes, consts), b.inits, outputs


def _interleave(
    graph: onnx.GraphProto, probes: list[onnx.NodeProto], consts: set[str]
) -> list[onnx.NodeProto]:
    """The graph's nodes with each probe placed right after the last node it depends on, so
    that (with priority-based execution) a probed activation is reduced and freed as soon as
    it is made, instead of every probed tensor living until the network's last node has run.
    Probes that become ready together keep their list order; a probe whose inputs never
    appear goes last."""
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | consts
    missing: list[set[str]] = [{i for i in n.input if i and i not in ready} for n in probes]
    users: dict[str, list[int]] = {}
    for k, need in enumerate(missing):
        for name in need:
            users.setdefault(name, []).append(k)
    queue = [k for k, need in enumerate(missing) if not need]
    heapq.heapify(queue)
    placed = [False] * len(probes)
    ordered: list[onnx.NodeProto] = []

    def made(outputs) -> None:
        for name in outputs:
            for k in users.pop(name, ()):
                missing[k].discard(name)
                if not missing[k]:
                    heapq.heappush(queue, k)

    def flush() -> None:
        while queue:
            k = heapq.heappop(queue)
            if not placed[k]:
                placed[k] = True
                ordered.append(probes[k])
                made(probes[k].output)

    flush()
    for node in graph.node:
        ordered.append(node)
        made(node.output)
        flush()
    return ordered + [n for k, n in enumerate(probes) if not placed[k]]


def providers(device: str = "auto") -> list[str]:
    """``cuda`` when the CUDA provider is available (or asked for), else ``cpu``."""
    available = ort.get_available_providers()
    if device in ("auto", "cuda") and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        from idap_onnx.errors import UsageError

        raise UsageError("--device cuda: ONNX Runtime has no CUDA provider here; use cpu")
    return ["CPUExecutionProvider"]


def collect(
    model: onnx.ModelProto,
    plan: ProbePlan,
    batches: Iterable[Mapping[str, np.ndarray]],
    *,
    device: str = "auto",
    progress: bool = False,
    total: int | None = None,
) -> CalibStats:
    """Run the augmented model over ``batches`` and accumulate the statistics."""
    sess, names, nchwc = _session(model, plan, device)
    stats = CalibStats(provider=sess.get_providers()[0], nchwc_nodes=nchwc)
    stats.resolution = {t: resolution(p.shape, {p.axis}) for t, p in plan.channels.items()}
    stats.flow = dict(plan.flow)
    iterator = batches
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="sample", desc="calibrate")
    for feed in iterator:
        n = len(next(iter(feed.values())))
        # ONNX Runtime reads an empty output list as "all outputs": an empty plan runs nothing
        values = dict(zip(names, sess.run(names, dict(feed)), strict=True)) if names else {}
        _accumulate(stats, plan, values)
        stats.samples += n
        if bar is not None:
            bar.update(n)
    if bar is not None:
        bar.close()
    return stats


def _session(model: onnx.ModelProto, plan: ProbePlan, device: str):
    """An ONNX Runtime session of the augmented model. It is written to a temporary file with
    its weights as external data (``model_io.write_variant``), so building it holds neither a
    copy of the model nor its serialized bytes. Priority-based order runs each probe right
    after its producer (see ``_interleave``). The memory pattern (one block planned for all of
    a run's activations) is off: with the probes' many small outputs it costs ~100 MiB on
    ResNet-50 (``tools/bench_calib.py``).

    Optimization level: a fusion never removes a tensor another node reads, so every probed
    name survives any level. With pooled probes on the CPU (``pooled``) the session runs at
    ``ORT_ENABLE_ALL``: convolutions in ONNX Runtime's NCHWc layout, which ``Mul`` and
    ``AveragePool`` keep, so only the row sums (1/W of a tensor) are reordered back. ONNX
    Runtime appends the nodes it creates there, and priority-based order would then run them
    after the whole network, holding every probed tensor; so the optimized graph is saved
    (weights external), its nodes put back in probe-after-producer order (``_reordered``), and
    that file is loaded with optimizations off. Otherwise the level is
    ``ORT_ENABLE_EXTENDED`` (the NCHWc level would reorder every probed tensor back: 3x the
    memory)."""
    _trim_heap()
    nodes, inits, names = augment(model, plan)
    use = providers(device)
    layout = use[0] == "CPUExecutionProvider" and any(n.op_type == "AveragePool"
                                                       and n.name.startswith("idap::")
                                                       for n in nodes)
    with tempfile.TemporaryDirectory(prefix="idap-calib-") as tmp:
        path = write_variant(model, Path(tmp) / "calib.onnx", nodes=nodes, initializers=inits,
                             outputs=names)
        del nodes, inits
        _trim_heap()
        if layout:
            saved = Path(tmp) / "layout.onnx"
            opts = _options(ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
            opts.optimized_model_filepath = str(saved)
            opts.add_session_config_entry("session.disable_prepacking", "1")  # never runs
            opts.add_session_config_entry(
                "session.optimized_model_external_initializers_file_name", "layout.onnx.data")
            opts.add_session_config_entry(
                "session.optimized_model_external_initializers_min_size_in_bytes", "1024")
            ort.InferenceSession(str(path), opts, providers=use)  # writes ``saved``; freed
            _trim_heap()
            path, nchwc = _reordered(saved, [o.name for o in model.graph.output])
            sess = ort.InferenceSession(
                str(path), _options(ort.GraphOptimizationLevel.ORT_DISABLE_ALL), providers=use)
        else:
            nchwc = 0
            sess = ort.InferenceSession(
                str(path), _options(ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED),
                providers=use)
    return sess, names, nchwc


def _options(level) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    opts.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    opts.enable_mem_pattern = False
    opts.log_severity_level = 3
    return opts


def _reordered(path: Path, outputs: list[str]) -> tuple[Path, int]:
    """``path``'s graph (as ONNX Runtime saved it, weights external) with the nodes the model's
    ``outputs`` need kept in their order and every other node (the probes, and the reorders
    ONNX Runtime added for them) placed right after what it reads, written beside it; and the
    number of its NCHWc-domain nodes."""
    model = onnx.load(str(path), load_external_data=False)
    nodes = list(model.graph.node)
    need = needed_indices(model.graph, outputs)
    keep = set(range(len(nodes)) if need is None else need)
    main = onnx.GraphProto()
    main.input.extend(model.graph.input)
    main.initializer.extend(model.graph.initializer)
    main.node.extend(n for i, n in enumerate(nodes) if i in keep)
    ordered = _interleave(main, [n for i, n in enumerate(nodes) if i not in keep], set())
    del model.graph.node[:]
    model.graph.node.extend(ordered)
    out = path.with_name("layout.ordered.onnx")
    out.write_bytes(model.SerializeToString())
    return out, sum(1 for n in ordered if n.domain == "com.microsoft.nchwc")


def _trim_heap() -> None:
    """Hands freed heap pages back to the OS before the session is built (glibc's
    ``malloc_trim``; a no-op elsewhere), so the memory the model's analysis used and freed
    does not stay in the process's resident set for the whole pass."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _add(store: dict, key: str, value) -> None:
    value = np.asarray(value, dtype=np.float64)
    store[key] = store[key] + value if key in store else value.copy()


def _accumulate(stats: CalibStats, plan: ProbePlan, v: dict[str, np.ndarray]) -> None:
    for t in plan.channels:
        s = v[f"idap::sum::{t}"]
        _add(stats.channel_sum, t, s)
        _add(stats.channel_sumsq, t, v[f"idap::sumsq::{t}"])
        stats.channel_count[t] = stats.channel_count.get(t, 0.0) + float(
            v[f"idap::size::{t}"]
        ) / max(len(s), 1)
    for y in plan.energies:
        stats.energy[y] = stats.energy.get(y, 0.0) + float(v[f"idap::energy::{y}"])
    for t in plan.relu_norms:
        _add(stats.relu_norm, t, v[f"idap::relunorm::{t}"])
    for b in plan.blocks:
        stats.block_diff[b] = stats.block_diff.get(b, 0.0) + float(v[f"idap::bdiff::{b}"])
        stats.block_out[b] = stats.block_out.get(b, 0.0) + float(v[f"idap::bout::{b}"])
