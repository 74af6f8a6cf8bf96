"""Calibration statistics measured inside the graph by ONNX Runtime.

The model is augmented with reduction nodes whose outputs are small: per-channel sums and
sums of squares of the tensors the scores need (over batch, spatial and token axes), total
output energies of the consumers, per-sample norms of block inputs/outputs. Sessions run with
graph optimizations off so the tensor names survive (the pattern of ORT's own quantization
calibrators). Results are accumulated in float64 across batches, so memory does not grow
with the number of samples or with activation sizes.

What is measured (see ``calib.scores`` for the formulas that use it):

- ``channel[T]``: for a tensor T with channel axis a: ``sum``, ``sumsq`` per element of a,
  and ``count`` (positions per channel, summed over batches);
- ``energy[Y]``: ``sum(Y**2)`` of a consumer's output, summed over batches;
- ``relu_norm[Y]``: ``sum_b ||ReLU(Y[b, c])||_2`` per channel (the released code's score);
- ``block[name]``: ``sum_b ||y_b - x_b||`` and ``sum_b ||y_b||`` (layer divergence);
- ``samples``: the number of samples seen.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from idap_onnx.blocks import Block
from idap_onnx.dependency import SLICE, DependencyGraph

WEIGHTED = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}


@dataclass(frozen=True)
class ChannelProbe:
    """Per-channel statistics of ``tensor`` along ``axis`` (rank ``rank``)."""

    tensor: str
    axis: int
    rank: int


@dataclass
class ProbePlan:
    """Which tensors to measure; built from the dependency graph and the blocks."""

    channels: dict[str, ChannelProbe] = field(default_factory=dict)
    energies: set[str] = field(default_factory=set)
    relu_norms: dict[str, ChannelProbe] = field(default_factory=dict)
    blocks: dict[str, Block] = field(default_factory=dict)
    batch_axis: dict[str, int | None] = field(default_factory=dict)


@dataclass
class CalibStats:
    """Accumulated statistics (float64); see the module docstring."""

    samples: int = 0
    channel_sum: dict[str, np.ndarray] = field(default_factory=dict)
    channel_sumsq: dict[str, np.ndarray] = field(default_factory=dict)
    channel_count: dict[str, float] = field(default_factory=dict)
    energy: dict[str, float] = field(default_factory=dict)
    relu_norm: dict[str, np.ndarray] = field(default_factory=dict)
    block_diff: dict[str, float] = field(default_factory=dict)
    block_out: dict[str, float] = field(default_factory=dict)
    provider: str = "CPUExecutionProvider"

    def mean(self, tensor: str) -> np.ndarray:
        return self.channel_sum[tensor] / max(self.channel_count[tensor], 1.0)

    def second_moment(self, tensor: str) -> np.ndarray:
        """E[a_c^2] = var_c + mu_c^2 per element of the channel axis."""
        return self.channel_sumsq[tensor] / max(self.channel_count[tensor], 1.0)

    def variance(self, tensor: str) -> np.ndarray:
        return np.maximum(self.second_moment(tensor) - self.mean(tensor) ** 2, 0.0)


def plan_probes(graph: DependencyGraph, blocks: Iterable[Block] = ()) -> ProbePlan:
    """The tensors the scores need: consumer inputs and outputs, producer inputs and
    outputs of every weighted node in a group, and every block's input and output."""
    plan = ProbePlan()
    index = graph.index
    for edit in graph.edits:
        if edit.kind != SLICE or edit.role not in ("producer", "consumer"):
            continue
        node = index.node_by_name[edit.node]
        if WEIGHTED.get(node.op_type) != edit.input:
            continue
        lay = graph.layouts[edit.tensor]
        rank = index.rank(edit.tensor)
        if rank is None:
            continue
        if edit.role == "consumer":
            plan.channels[edit.tensor] = ChannelProbe(edit.tensor, lay.axis, rank)
            plan.energies.add(node.output[0])
        else:
            plan.relu_norms[edit.tensor] = ChannelProbe(edit.tensor, lay.axis, rank)
            x = node.input[0]
            x_rank = index.rank(x)
            if x_rank is not None and x not in plan.channels:
                axis = x_rank - 1 if node.op_type == "MatMul" else 1
                plan.channels[x] = ChannelProbe(x, axis, x_rank)
    for block in blocks:
        plan.blocks[block.name] = block
        shape = index.shape(block.output)
        plan.batch_axis[block.name] = 0 if shape and shape[0] == 1 else None
    return plan


def _reduce(op: str, x: str, axes: list[int], out: str, opset: int, nodes, inits) -> None:
    """Append ``op(x, axes, keepdims=0)`` with the axes spelled as this opset wants."""
    as_input = opset >= 18 or (op == "ReduceSum" and opset >= 13)
    if as_input:
        name = f"{out}__axes"
        inits.append(helper.make_tensor(name, TensorProto.INT64, [len(axes)], axes))
        nodes.append(helper.make_node(op, [x, name], [out], keepdims=0, name=out))
    else:
        nodes.append(helper.make_node(op, [x], [out], axes=axes, keepdims=0, name=out))


def augment(model: onnx.ModelProto, plan: ProbePlan) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` with the reduction nodes of ``plan`` and their outputs."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    opset = next(i.version for i in out.opset_import if i.domain in ("", "ai.onnx"))
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    outputs: list[str] = []
    cast: set[str] = set()

    def as_float(t: str) -> str:
        """Reductions run in float64: sums over millions of positions keep 1e-9 accuracy."""
        name = f"idap::f64::{t}"
        if name not in cast:
            cast.add(name)
            nodes.append(helper.make_node("Cast", [t], [name], to=TensorProto.DOUBLE, name=name))
        return name

    for t, p in plan.channels.items():
        axes = [a for a in range(p.rank) if a != p.axis]
        f = as_float(t)
        for op, key in (("ReduceSum", "sum"), ("ReduceSumSquare", "sumsq")):
            name = f"idap::{key}::{t}"
            _reduce(op, f, axes, name, opset, nodes, inits)
            outputs.append(name)
        size = f"idap::size::{t}"
        nodes.append(helper.make_node("Size", [t], [size], name=size))
        outputs.append(size)
    for y in sorted(plan.energies):
        name = f"idap::energy::{y}"
        nodes.append(
            helper.make_node("ReduceSumSquare", [as_float(y)], [name], keepdims=0, name=name)
        )
        outputs.append(name)
    for t, p in plan.relu_norms.items():
        relu = f"idap::relu::{t}"
        nodes.append(helper.make_node("Relu", [as_float(t)], [relu], name=relu))
        sq = f"idap::relusq::{t}"
        spatial = [a for a in range(p.rank) if a not in (0, p.axis)]
        if spatial:
            _reduce("ReduceSumSquare", relu, spatial, sq, opset, nodes, inits)
            norm = f"idap::relunorm_b::{t}"
            nodes.append(helper.make_node("Sqrt", [sq], [norm], name=norm))
        else:
            norm = f"idap::relunorm_b::{t}"
            nodes.append(helper.make_node("Abs", [relu], [norm], name=norm))
        name = f"idap::relunorm::{t}"
        _reduce("ReduceSum", norm, [0], name, opset, nodes, inits)
        outputs.append(name)
    for bname, block in plan.blocks.items():
        x, y = as_float(block.input), as_float(block.output)
        diff = f"idap::diff::{bname}"
        nodes.append(helper.make_node("Sub", [y, x], [diff], name=diff))
        for src, key in ((diff, "bdiff"), (y, "bout")):
            name = f"idap::{key}::{bname}"
            axis = plan.batch_axis[bname]
            if axis is None:
                sq = f"{name}::sq"
                nodes.append(helper.make_node("ReduceSumSquare", [src], [sq], keepdims=0, name=sq))
                nodes.append(helper.make_node("Sqrt", [sq], [name], name=name))
            else:
                flat = f"{name}::flat"
                shape = f"{name}::shape"
                inits.append(helper.make_tensor(shape, TensorProto.INT64, [2], [0, -1]))
                nodes.append(helper.make_node("Reshape", [src, shape], [flat], name=flat))
                sq = f"{name}::sq"
                _reduce("ReduceSumSquare", flat, [1], sq, opset, nodes, inits)
                norms = f"{name}::norms"
                nodes.append(helper.make_node("Sqrt", [sq], [norms], name=norms))
                _reduce("ReduceSum", norms, [0], name, opset, nodes, inits)
            outputs.append(name)
    _interleave(out.graph, nodes, {i.name for i in inits})
    out.graph.initializer.extend(inits)
    out.graph.output.extend(onnx.ValueInfoProto(name=o) for o in outputs)
    return out, outputs


def _interleave(graph: onnx.GraphProto, probes: list[onnx.NodeProto], consts: set[str]) -> None:
    """Place each probe node right after the last node it depends on, so that (with
    priority-based execution) a probed activation is reduced and freed as soon as it is made,
    instead of every probed tensor living until the network's last node has run."""
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | consts
    pending = list(probes)
    ordered: list[onnx.NodeProto] = []

    def flush() -> None:
        nonlocal pending
        progress = True
        while progress:
            progress, rest = False, []
            for node in pending:
                if all(not i or i in ready for i in node.input):
                    ordered.append(node)
                    ready.update(node.output)
                    progress = True
                else:
                    rest.append(node)
            pending = rest

    flush()
    for node in list(graph.node):
        ordered.append(node)
        ready.update(node.output)
        flush()
    ordered.extend(pending)
    del graph.node[:]
    graph.node.extend(ordered)


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
    augmented, names = augment(model, plan)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.execution_order = ort.ExecutionOrder.PRIORITY_BASED  # reduce each probe early
    opts.log_severity_level = 3
    sess = ort.InferenceSession(augmented.SerializeToString(), opts, providers=providers(device))
    stats = CalibStats(provider=sess.get_providers()[0])
    iterator = batches
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="sample", desc="calibrate")
    for feed in iterator:
        n = len(next(iter(feed.values())))
        values = dict(zip(names, sess.run(names, dict(feed)), strict=True))
        _accumulate(stats, plan, values)
        stats.samples += n
        if bar is not None:
            bar.update(n)
    if bar is not None:
        bar.close()
    return stats


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
