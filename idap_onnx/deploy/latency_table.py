"""Latency tables: what each channel group's width costs on one target runtime, measured.

For every prunable group ``g`` the table holds ``T_g(w)``: the median time of the sub-graph of
the nodes whose work depends on ``g`` (its producers, consumers and the nodes between them),
cut out of the model (``extract_group``) and pruned to ``w`` units by the exact surgery, at a
ladder of widths (``ladder``), timed in turns on the target (``latency.measure``).

The whole model's latency at widths ``w`` is predicted from its measured latency ``M`` as

    L(w) = M - k S(w) - b W(w),   S(w) = sum_g [T_g(C_g) - T_g(w_g)] - sum_n t_n s_n,in s_n,out

where the second sum removes what the first counts twice: a node ``n`` shrunk on both sides
(input group and output group), with ``t_n`` its share of a sub-graph's time (by MACs) and
``s`` the fraction of it each side saves (``(1 - s_in)(1 - s_out)`` of it is left).
``W(w) = sum_n B_n (1 - prod_g w_g / C_g)`` is the weight bytes the cut removes (``B_n`` a
node's weights as ``accounting`` counts its parameters, 4 bytes each; the product over the
groups it touches). A sub-graph timed alone keeps its
weights in the cache; in the whole model they compete with every other layer's, so where a
model's weights do not stay in the cache a cut saves more than its sub-graph showed, and the
more the more weight it removes.
``k`` and ``b`` are measured (``fit_scale``): the whole model is timed with every group cut to
75 %, 50 % and 25 % of its width, and with the weight-heavy half of the groups (weight bytes
per sub-graph millisecond) and then the other half cut to 25 %, so ``S`` and ``W`` vary
apart; ``(k, b) >= 0`` is the least-squares fit of the five savings ``D_i = k S_i + b W_i``.
``k`` and ``b`` also convert a group's saving per unit for ranking.

The staircase: widths that are multiples of the runtime's block run fast; others fall back
to slower kernels and layout reorders (ONNX Runtime's NCHWc block is 8 with AVX2, 16 with
AVX-512; TensorRT wants 8 for fp16, 32 for INT8). Per group, the step ``m`` is the smallest of
1, 8, 16, 32 channels whose cut from an aligned anchor ``a`` costs no time,
``median_a T(a - m) / T(a) <= 1 + TOL``, and never below the runtime's known multiple
(``known_multiple``): a sub-graph alone cannot show the reorders an unaligned width forces on
the next layer. The width kept for a wanted ``w`` is the top of its stair, ``floor(w / m) m``
(``GroupCurve.snap``); with no table, the known multiple.

A table is keyed by its target (runtime, provider, device name, threads, precision, batch)
and each entry by the sub-graph's signature (its ops, attributes and shapes, names and
weight values left out), cached on disk (``default_cache_dir``) and saved as JSON for reuse:
a saved table makes planning free of timing noise.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from idap_onnx.errors import UsageError

TIMING_VERSION = 2  # in every cached entry's key: 2 since sessions stop spinning after a run
SCHEMA = 2  # 2: the weight-bytes term ``b W`` replaced schema 1's knots of ``f(S)``
TOL = 0.10  # a cut of m channels may cost this much (timing noise) and still count as free
MULTIPLES = (1, 8, 16, 32)  # channels; the stair steps a table can find
ANCHORS = (1.0, 0.75, 0.5, 0.25)  # anchor widths, as fractions of the group's width


@dataclass(frozen=True)
class Target:
    """Where the latency is paid: a runtime (a ``latency.BACKENDS`` name), its provider, the
    device's name, intra-op threads (0: the runtime's default), precision and batch."""

    runtime: str = "onnxruntime"
    provider: str = "CPUExecutionProvider"
    device: str = ""
    threads: int = 0
    precision: str = "fp32"
    batch: int = 1

    @property
    def key(self) -> str:
        """A short hash of every field: tables of different targets never mix."""
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def describe(self) -> str:
        threads = self.threads or "default"
        return (f"{self.runtime} {self.provider} on {self.device or 'this device'}, "
                f"{threads} threads, {self.precision}, batch {self.batch}")


def local_target(runtime: str = "onnxruntime", *, device: str = "auto", threads: int = 0,
                 precision: str = "fp32", batch: int = 1) -> Target:
    """The target of this machine for ``runtime`` (``device`` as for ``calib.stats.providers``)."""
    if runtime == "onnxruntime":
        from idap_onnx.calib.stats import providers

        provider = providers(device)[0]
        name = cpu_name() if provider == "CPUExecutionProvider" else _gpu_name()
    else:
        provider, name = "TensorRT", _gpu_name()
    return Target(runtime, provider, name, threads, precision, batch)


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return "GPU"


def cpu_flags() -> set[str]:
    """The CPU's feature flags (``/proc/cpuinfo``); empty where that cannot be read."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def known_multiple(target: Target) -> int:
    """The channel multiple the runtime is documented to run fast (FIELD_NOTES.md): ONNX
    Runtime's CPU NCHWc block (16 with AVX-512, else 8); 32 for TensorRT INT8; 8 otherwise
    (fp16 tensor cores, cuDNN)."""
    if target.runtime == "onnxruntime" and target.provider == "CPUExecutionProvider":
        return 16 if "avx512f" in cpu_flags() else 8
    return {"int8": 32}.get(target.precision, 8)


def parse_target_latency(text: str | float) -> tuple[str, float]:
    """``0.5`` -> ('fraction', 0.5) of the original's latency; ``12ms`` / ``0.012s`` ->
    ('ms', 12.0). Raises ``UsageError`` in one line otherwise."""
    s = str(text).strip().lower()
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)\s*(ms|s|us)?", s)
    if not m:
        raise UsageError(f"target latency '{text}': give a fraction of the original's "
                         "latency (0.5) or a time (12ms, 0.012s)")
    value, unit = float(m.group(1)), m.group(2)
    if unit is None:
        if not 0 < value < 1:
            raise UsageError(f"target latency {value:g}: a fraction must be in (0, 1); "
                             "for a time, add its unit (12ms)")
        return "fraction", value
    ms = value * {"ms": 1.0, "s": 1e3, "us": 1e-3}[unit]
    if ms <= 0:
        raise UsageError(f"target latency '{text}' must be above zero")
    return "ms", ms


@dataclass
class GroupCurve:
    """One group's measured widths: ``points[w]`` ms of its sub-graph at ``w`` units kept."""

    key: str
    size: int
    channels_per_unit: int
    multiple: int  # units: the stair step (module docstring)
    points: dict[int, float]
    nodes: dict[str, float] = field(default_factory=dict)  # weighted node -> MACs share
    note: str = ""
    weight_bytes: dict[str, int] = field(default_factory=dict)  # node -> bytes of its weights

    def aligned(self) -> tuple[np.ndarray, np.ndarray]:
        """The measured points on the stair tops (multiples of ``multiple``, and the full
        width), ascending, made non-decreasing in the width (``T(x_i) = min_{j>=i} T(x_j)``:
        a narrower stair top that timed slower than a wider one is timing noise)."""
        xs = sorted(w for w in self.points if w % self.multiple == 0 or w == self.size)
        ys = np.asarray([self.points[w] for w in xs], dtype=np.float64)
        return np.asarray(xs, dtype=np.float64), np.minimum.accumulate(ys[::-1])[::-1]

    def time(self, width: float) -> float:
        """Predicted sub-graph time at ``width`` units (linear between stair tops; below the
        narrowest measured one, proportional to the width)."""
        xs, ys = self.aligned()
        if width < xs[0]:
            return float(ys[0] * max(width, 0.0) / xs[0])
        return float(np.interp(width, xs, ys))

    def snap(self, wanted: int) -> int:
        """The width kept for ``wanted``: the top of its stair, never below one step."""
        if wanted >= self.size:
            return self.size
        return max(self.multiple, (wanted // self.multiple) * self.multiple)

    def saving_per_unit(self, width: int) -> float:
        """Average time saved per unit cut from ``width`` down to the narrowest stair top."""
        low = min(self.multiple, width)
        if width <= low:
            return 0.0
        return max(self.time(width) - self.time(low), 0.0) / (width - low)

    def bytes_per_unit(self) -> float:
        """Weight bytes one unit holds in this group's nodes (its neighbours at full width)."""
        return sum(self.weight_bytes.values()) / self.size if self.size else 0.0


@dataclass
class LatencyTable:
    """A target's curves by group key (``ChannelGroup.key``) and the whole model's measured time."""

    target: Target
    model_ms: float
    groups: dict[str, GroupCurve]
    seconds: float = 0.0
    fallback_multiple: int = 1
    model_signature: str = ""
    scale: float = 1.0  # k: in-context savings / the sub-graphs' savings (``fit_scale``)
    probes: list[dict] = field(default_factory=list)  # the whole-model checks of ``fit_scale``
    ms_per_mb: float = 0.0  # b: ms saved per MB of weights removed, beyond k S (``fit_scale``)

    def curve(self, graph, group) -> GroupCurve | None:
        return self.groups.get(group.key)

    def multiples(self, graph) -> dict[str, int]:
        """Group id -> kept counts must be multiples of this (units): the measured stair
        step, or the runtime's known multiple where the group has no curve."""
        out = {}
        for g in graph.groups:
            c = self.groups.get(g.key)
            out[g.id] = c.multiple if c else units_for(self.fallback_multiple, channels_per_unit(g))
        return out

    def predict(self, graph, removal: Mapping[str, Sequence[int]] | None = None) -> float:
        """Predicted model latency (ms) of ``graph``'s model less ``removal`` (module docstring)."""
        removal = removal or {}
        widths = {}
        for g in graph.groups:
            key = g.key
            if key in self.groups:
                widths[key] = g.size - len(removal.get(g.id, ()))
        return self.predict_widths(widths)

    def predict_widths(self, widths: Mapping[str, int]) -> float:
        """``L(w)``, never below 0 (a line extended past the deepest probe can overshoot)."""
        return max(self.model_ms - self.measured_saving(self.savings(widths),
                                                        self.removed_bytes(widths)), 0.0)

    def measured_saving(self, s: float, removed: float = 0.0) -> float:
        """``k S + b W``: the whole model's saving (ms) for the sub-graphs' saving ``s`` (ms)
        and ``removed`` weight bytes."""
        return self.scale * s + self.ms_per_mb * removed / 1e6

    def unit_saving(self, curve: GroupCurve, width: int) -> float:
        """The whole model's saving (ms) per unit cut from ``curve``'s group at ``width``."""
        return (self.scale * curve.saving_per_unit(width)
                + self.ms_per_mb * curve.bytes_per_unit() / 1e6)

    def removed_bytes(self, widths: Mapping[str, int]) -> float:
        """``W(w)``: weight bytes removed at ``widths`` (module docstring)."""
        kept: dict[str, float] = defaultdict(lambda: 1.0)
        size: dict[str, int] = {}
        for key, w in widths.items():
            c = self.groups[key]
            for node, b in c.weight_bytes.items():
                kept[node] *= w / c.size if c.size else 1.0
                size[node] = b
        return float(sum(b * (1.0 - kept[node]) for node, b in size.items()))

    def savings(self, widths: Mapping[str, int]) -> float:
        """The sub-graphs' predicted saving (ms) at ``widths`` (group key -> units), with
        the double-counted part of nodes shrunk on both sides added back."""
        total = 0.0
        parts: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for key, w in widths.items():
            c = self.groups[key]
            full = c.time(c.size)
            saved = full - c.time(w)
            total += saved
            for node, share in c.nodes.items():
                parts[node].append((full * share, saved * share))
        for got in parts.values():
            if len(got) == 2:  # shrunk on both sides: the product, not the sum, of the savings
                t_n = (got[0][0] + got[1][0]) / 2
                if t_n > 0:
                    total -= t_n * (got[0][1] / t_n) * (got[1][1] / t_n)
        return float(total)

    def widths_of(self, graph) -> dict[str, int]:
        """Group key -> units of ``graph``'s model, for the groups this table measured."""
        return {g.key: g.size for g in graph.groups if g.key in self.groups}

    def refit(self) -> None:
        """``k``, ``b`` fitted to the probes' measured savings (``fit_line``), each probe
        counted its ``weight`` times, then both scaled by ``c`` so that the last measured
        result (``add_result``) is predicted as measured (``k`` kept in [0.05, 3]): near the
        cut planning needs, the line is corrected as a secant; their ``predicted_ms`` set
        with the fit."""
        if not self.probes:
            return
        s = [p["subgraph_saving_ms"] for p in self.probes]
        w = [p["weights_removed_mb"] for p in self.probes]
        d = [self.model_ms - p["measured_ms"] for p in self.probes]
        self.scale, self.ms_per_mb = fit_line(s, w, d, [p.get("weight", 1.0) for p in self.probes])
        results = [p for p in self.probes if "measured_here_ms" in p]
        if results:
            last = results[-1]
            fitted = self.measured_saving(last["subgraph_saving_ms"],
                                          last["weights_removed_mb"] * 1e6)
            saved = self.model_ms - last["measured_ms"]
            if fitted > 0 and saved > 0:
                c = saved / fitted
                self.scale = float(np.clip(self.scale * c, *K_BOUNDS))
                self.ms_per_mb *= c
        for p in self.probes:
            p["predicted_ms"] = round(self.model_ms - self.measured_saving(
                p["subgraph_saving_ms"], p["weights_removed_mb"] * 1e6), 4)

    def keep_probes(self, n: int) -> None:
        """Drop the probes after the first ``n`` and fit again: the table as it was when
        those ``n`` planned (``k``, ``b`` are a function of the probes alone)."""
        if n < len(self.probes):
            self.probes = self.probes[:n]
            self.refit()

    def add_result(self, name: str, widths: Mapping[str, int], original_ms: float,
                   result_ms: float) -> None:
        """Learn from a measured result: the model at ``widths`` ran ``result_ms`` where the
        original ran ``original_ms`` (one call, in turns). Its saving, as a fraction of the
        original applied to ``model_ms``, joins the probes counted as many times as the
        probes before it (so the fit passes near the point planning needs) and ``k``, ``b``
        are fitted again (``refit``: the result is then predicted as measured)."""
        weight = float(sum(p.get("weight", 1.0) for p in self.probes)) or 1.0
        self.probes.append({
            "probe": name, "measured_ms": round(self.model_ms * result_ms / original_ms, 6),
            "subgraph_saving_ms": round(self.savings(widths), 6),
            "weights_removed_mb": round(self.removed_bytes(widths) / 1e6, 6), "weight": weight,
            "measured_here_ms": [round(original_ms, 4), round(result_ms, 4)]})
        self.refit()

    def to_dict(self) -> dict:
        return {
            "schema_version": SCHEMA,
            "target": asdict(self.target),
            "target_key": self.target.key,
            "model_ms": self.model_ms,
            "model_signature": self.model_signature,
            "seconds": round(self.seconds, 3),
            "fallback_multiple": self.fallback_multiple,
            "scale": self.scale,
            "ms_per_mb": self.ms_per_mb,
            "probes": self.probes,
            "groups": {k: {**asdict(c), "points": {str(w): t for w, t in sorted(c.points.items())}}
                       for k, c in sorted(self.groups.items())},
        }

    @staticmethod
    def from_dict(d: dict) -> LatencyTable:
        if d.get("schema_version") != SCHEMA:
            raise UsageError(f"latency table schema {d.get('schema_version')} is not {SCHEMA}: "
                             "measure the table again with this version")
        groups = {}
        for k, c in d["groups"].items():
            c = dict(c)
            c["points"] = {int(w): float(t) for w, t in c["points"].items()}
            groups[k] = GroupCurve(**c)
        return LatencyTable(Target(**d["target"]), float(d["model_ms"]), groups,
                            float(d.get("seconds", 0.0)), int(d.get("fallback_multiple", 1)),
                            d.get("model_signature", ""), float(d.get("scale", 1.0)),
                            list(d.get("probes", [])), float(d.get("ms_per_mb", 0.0)))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the table as JSON atomically."""
        return _atomic_json(Path(path), self.to_dict())

    @staticmethod
    def load(path: str | os.PathLike) -> LatencyTable:
        """Read a table written by ``save``; a missing or malformed file is a ``UsageError``."""
        p = Path(path)
        try:
            return LatencyTable.from_dict(json.loads(p.read_text()))
        except FileNotFoundError:
            raise UsageError(f"latency table {p} does not exist") from None
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise UsageError(f"latency table {p} is not a table idap-onnx wrote ({exc})") from None


def channels_per_unit(group) -> int:
    """Channels per unit of ``group`` (a head holds many; a filter one)."""
    first = group.units[0]
    return max(1, min(len(v) for v in first.values()))


def units_for(channels: int, cpu: int) -> int:
    """The smallest unit count whose channels are a multiple of ``channels``."""
    return int(np.lcm(channels, cpu) // cpu)


def ladder(size: int, cpu: int) -> tuple[list[int], list[tuple[int, dict[int, int]]]]:
    """Widths (units) to time for a group of ``size`` units of ``cpu`` channels: the full
    width, anchors aligned to 32 channels at ``ANCHORS`` of it, and below each anchor the
    widths one unit and 8 and 16 channels narrower; with the probes ``(anchor, {multiple:
    width})`` that decide the stair step."""
    widths = {size}
    probes = []
    step = units_for(32, cpu)
    anchors = sorted({int(size * f) // step * step for f in ANCHORS} - {0})
    if not anchors and size > 1:
        anchors = [size]  # narrower than one 32-channel step: probe below the full width
    for a in anchors:
        widths.add(a)
        below = {}
        for m in MULTIPLES:
            w = a - units_for(m, cpu)
            if 0 < w < a:
                below[m] = w
                widths.add(w)
        probes.append((a, below))
    smallest = units_for(16, cpu)
    if smallest < size:
        widths.add(smallest)
    return sorted(widths), probes


def stair_step(points: Mapping[int, float], probes, cpu: int, size: int) -> int:
    """The smallest multiple (units) of ``MULTIPLES`` channels whose cut from an aligned
    anchor costs no time: the median over anchors of ``T(a - m) / T(a)`` is at most
    ``1 + TOL``; the largest probed one when none passes, 1 when nothing was probed."""
    tried = []
    for m in MULTIPLES:
        u = units_for(m, cpu)
        if u >= size:
            break
        ratios = [points[below[m]] / points[a] for a, below in probes
                  if m in below and a in points and below[m] in points and points[a] > 0]
        if not ratios:
            continue
        tried.append(u)
        if float(np.median(ratios)) <= 1 + TOL:
            return u
    return tried[-1] if tried else 1


def model_signature(model: onnx.ModelProto) -> str:
    """A hash of the model's structure and weights' shapes (a table's model)."""
    return _signature(model)


def _signature(model: onnx.ModelProto, extra: str = "") -> str:
    """Ops, attributes, shapes and dtypes; tensor and node names renamed canonically and
    weight values left out, so repeated blocks share one signature."""
    names: dict[str, str] = {}

    def canon(n: str) -> str:
        if not n:
            return ""
        if n not in names:
            names[n] = f"t{len(names)}"
        return names[n]

    g = model.graph
    parts = [str(max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
                     default=0))]
    for vi in g.input:
        dims = [d.dim_value or d.dim_param for d in vi.type.tensor_type.shape.dim]
        parts.append(f"in {canon(vi.name)} {vi.type.tensor_type.elem_type} {dims}")
    for t in sorted(g.initializer, key=lambda t: t.name):
        parts.append(f"w {t.data_type} {list(t.dims)}")
    for node in g.node:
        attrs = []
        for a in node.attribute:
            b = onnx.AttributeProto()
            b.CopyFrom(a)
            attrs.append(b.SerializeToString(deterministic=True).hex())
        parts.append(f"{node.domain}.{node.op_type} {[canon(i) for i in node.input]} "
                     f"{[canon(o) for o in node.output]} {attrs}")
    parts.append(extra)
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def extract_group(model: onnx.ModelProto, graph, group, types: Mapping[str, int]
                  ) -> onnx.ModelProto | None:
    """The sub-graph of the nodes that touch ``group``'s channels, its inputs concrete at the
    analysis shapes (constants folded by the analysis become initializers); None where a
    needed input cannot be made (unknown shape)."""
    spaces = set(group.spaces)
    keep = set(group.producers) | set(group.consumers)
    for node in graph.index.nodes:
        for t in (*node.input, *node.output):
            lay = graph.layouts.get(t) if t else None
            if lay is not None and spaces & lay.spaces():
                keep.add(node.name)
                break
    chain = set().union(*(_constant_chain(graph.index, name) for name in keep)) - keep
    keep |= chain
    nodes = [n for n in graph.index.nodes if n.name in keep]
    produced = {o for n in nodes for o in n.output if o}
    inits = graph.index.initializers
    inputs, initializers, seen = [], [], set()
    for n in nodes:
        for t in n.input:
            if not t or t in produced or t in seen:
                continue
            seen.add(t)
            if t in inits:
                initializers.append(inits[t])
                continue
            shape = graph.index.shape(t)
            const = None if t in graph.index.input_names else graph.index.constant(t)
            if const is not None:  # a weight computed from weights (Paddle's reshaped
                initializers.append(onnx.numpy_helper.from_array(np.asarray(const), t))
                continue  # biases): fed at random, the sub-graph's analysis would freeze it
            if shape is None or any(not isinstance(d, int) or d < 0 for d in shape):
                return None
            inputs.append(onnx.helper.make_tensor_value_info(
                t, types.get(t, onnx.TensorProto.FLOAT), list(shape)))
    used_outside = {i for n in graph.index.nodes if n.name not in keep for i in n.input}
    graph_outputs = set(graph.index.output_names)
    outputs = []
    for n in nodes:
        for o in n.output if n.name not in chain else ():  # a chain's tensors stay inside
            if o and (o in used_outside or o in graph_outputs
                      or not graph.index.consumers.get(o)):
                shape = graph.index.shape(o)
                outputs.append(onnx.helper.make_tensor_value_info(
                    o, types.get(o, onnx.TensorProto.FLOAT), list(shape) if shape else None))
    if not outputs:
        return None
    sub = onnx.helper.make_graph(nodes, f"group_{group.id}", inputs, outputs, initializers)
    out = onnx.helper.make_model(sub, opset_imports=list(model.opset_import))
    out.ir_version = model.ir_version
    return out


def _constant_chain(index, node_name: str) -> set[str]:
    """The nodes computing ``node_name``'s inputs from weights and shapes alone (Paddle's
    ``Reshape(bias)`` before an ``Add``; an exporter's ``Shape -> Gather -> Concat`` target
    of a heads ``Reshape``): kept with the sub-graph, so its analysis sees the weight or
    shape the whole model's did, not a random input it cannot prune. A ``Shape``'s data
    input joins the sub-graph's inputs (concrete at the analysis shapes)."""
    out: set[str] = set()

    def computable(t: str, depth: int) -> bool:
        if not t or t in index.initializers or index.constant(t) is not None:
            return True
        p = index.producer.get(t)
        if p is None or depth > 8 or t in index.input_names:
            return False
        if p.op_type in ("Shape", "Size") or all(computable(i, depth + 1) for i in p.input):
            out.add(p.name)
            return True
        return False

    for t in index.node(node_name).input:
        computable(t, 0)
    return out


def elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Tensor name -> ONNX element type, from shape inference (``extract_group``'s inputs)."""
    from idap_onnx.shapes import infer_shapes

    inferred = infer_shapes(model)
    g = inferred.graph
    return {v.name: v.type.tensor_type.elem_type
            for v in (*g.input, *g.value_info, *g.output) if v.type.tensor_type.elem_type}


def _feed(sub: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feed = {}
    for vi in sub.graph.input:
        shape = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        if np.issubdtype(dtype, np.floating):
            feed[vi.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feed[vi.name] = np.ones(shape, dtype=bool)
        else:
            feed[vi.name] = np.zeros(shape, dtype=dtype)
    return feed


def default_cache_dir() -> Path:
    """``$IDAP_ONNX_CACHE`` or ``$XDG_CACHE_HOME/idap-onnx`` (``~/.cache/idap-onnx``), then
    ``latency``."""
    base = os.environ.get("IDAP_ONNX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "idap-onnx")
    return Path(base) / "latency"


@dataclass(frozen=True)
class Timing:
    """How hard each sub-graph is timed (``latency.measure``'s arguments)."""

    rounds: int = 5
    per_round: int = 6
    warmup: int = 2
    max_seconds: float = 4.0


def build_table(
    model: onnx.ModelProto,
    target: Target,
    feed: Mapping[str, np.ndarray],
    *,
    groups: Sequence[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    timing: Timing = Timing(),
    device: str = "auto",
    progress: Callable[[str], None] | None = None,
    show: bool = False,
) -> LatencyTable:
    """Measure ``model``'s table on ``target`` (this machine): ``feed`` (batch
    ``target.batch``) times the whole model; every non-frozen group (or the ids in
    ``groups``) gets a curve. Entries found in ``cache_dir`` are reused; ``cache_dir=False``
    turns the cache off; ``show`` draws a tqdm bar on stderr."""
    from tqdm import tqdm

    from idap_onnx.accounting import model_cost
    from idap_onnx.dependency import analyze_model
    from idap_onnx.deploy.latency import measure

    t0 = time.perf_counter()
    batch = target.batch
    shapes = {k: list(np.asarray(v).shape) for k, v in feed.items()}
    if any(s and s[0] != batch for s in shapes.values()):
        raise UsageError(f"latency table: the feed's batch is not the target's ({batch})")
    graph = analyze_model(model, shapes)
    cost = model_cost(model, shapes)
    macs = {n.name: n.macs for n in cost.nodes}
    weights = {n.name: 4 * n.params for n in cost.nodes}  # float32 bytes of its weights
    types = elem_types(model)
    cache = None if cache_dir is False else Path(cache_dir or default_cache_dir()) / target.key
    kw = dict(backend=target.runtime, device=device, threads=target.threads)
    wanted = [g for g in graph.groups if not g.frozen and (groups is None or g.id in groups)]
    known = known_multiple(target)
    curves: dict[str, GroupCurve] = {}
    memo: dict[str, dict] = {}
    for g in tqdm(wanted, desc="latency table", unit="group", disable=not show,
                  file=sys.stderr, dynamic_ncols=True, leave=False):
        key = g.key
        cpu = channels_per_unit(g)
        widths, probes = ladder(g.size, cpu)
        nodes = {n: macs.get(n, 0) for n in {*g.producers, *g.consumers}}
        total = sum(nodes.values())
        shares = {n: v / total for n, v in sorted(nodes.items()) if v} if total else {}
        sub = extract_group(model, graph, g, types)
        if sub is None:
            continue
        sig = _signature(sub, f"{widths} {cpu} timing {TIMING_VERSION}")
        entry = memo.get(sig) or _cached(cache, sig)
        if entry is None:
            entry = _time_widths(sub, g, widths, measure, timing, kw)
            if entry is None:
                continue
            if cache is not None:
                _atomic_json(cache / f"{sig}.json", entry)
        memo[sig] = entry
        points = {int(w): float(t) for w, t in entry["points"].items()}
        step = max(stair_step(points, probes, cpu, g.size), units_for(known, cpu))
        curves[key] = GroupCurve(key, g.size, cpu, step if step < g.size else g.size, points,
                                 shares, weight_bytes={n: weights[n] for n in sorted(nodes)
                                                       if weights.get(n)})
        if progress:
            c = curves[key]
            progress(f"latency table: group {g.id} ({g.size} units): step {c.multiple}, "
                     f"{c.points[g.size]:.3f} ms at full width")
    table = LatencyTable(target, 0.0, curves, 0.0, known, model_signature(model))
    fit_scale(table, model, graph, feed, measure, kw, progress)
    table.seconds = time.perf_counter() - t0
    return table


K_BOUNDS = (0.05, 3.0)  # k of the fit (fit_line) and of the landing's secant (refit)
PROBE_WIDTHS = (0.75, 0.5, 0.25)  # whole-model checks: every measured group cut to these fractions
UNEVEN = 0.25  # the weight-heavy half of the groups, then the other half, cut to this fraction


def probe_cuts(table: LatencyTable, graph) -> dict[str, dict[str, float]]:
    """The whole-model probes of ``fit_scale``: name -> group id -> fraction of its width
    kept. Every measured group at each of ``PROBE_WIDTHS``; then the groups ordered by weight
    bytes per millisecond of their sub-graph, the heavier half and the lighter half each cut
    to ``UNEVEN`` alone, so the sub-graph savings and the weight bytes vary apart."""
    measured = [g for g in graph.groups if g.key in table.groups]
    cuts = {f"probe {f:g}": {g.id: f for g in measured} for f in PROBE_WIDTHS}
    if len(measured) >= 2:
        def density(g) -> float:
            c = table.groups[g.key]
            return sum(c.weight_bytes.values()) / max(c.time(c.size), 1e-9)

        order = sorted(measured, key=lambda g: (density(g), g.id))
        half = len(order) // 2
        cuts["probe weights"] = {g.id: UNEVEN for g in order[half:]}
        cuts["probe compute"] = {g.id: UNEVEN for g in order[:half]}
    return cuts


def fit_line(s: Sequence[float], w: Sequence[float], d: Sequence[float],
             weights: Sequence[float] | None = None) -> tuple[float, float]:
    """``(k, b)``: the least-squares ``d = k s + b w`` (each point counted ``weights`` times)
    with ``k`` in [0.05, 3] and ``b >= 0`` (``w`` in MB); where the free fit leaves those
    bounds, the bound is held and the other coefficient fitted again."""
    root = np.sqrt(np.asarray(weights if weights is not None else np.ones(len(s)), np.float64))
    s, w, d = (np.asarray(v, dtype=np.float64) * root for v in (s, w, d))

    def k_only() -> float:
        den = float(s @ s)
        return float(np.clip(s @ d / den, *K_BOUNDS)) if den > 0 else 1.0

    if float(w @ w) <= 0:
        return k_only(), 0.0
    (k, b), *_ = np.linalg.lstsq(np.stack([s, w], axis=1), d, rcond=None)
    if K_BOUNDS[0] <= k <= K_BOUNDS[1] and b >= 0:
        return float(k), float(b)
    if b < 0:
        return k_only(), 0.0
    k = float(np.clip(k, *K_BOUNDS))
    return k, max(float(w @ (d - k * s) / (w @ w)), 0.0)


def fit_scale(table: LatencyTable, model, graph, feed, measure, kw, progress=None) -> None:
    """Time the model and its probes (``probe_cuts``, each group on its stair) in turns,
    and set ``table.model_ms`` and the ``k``, ``b`` of ``L(w) = M - k S - b W`` fitted to
    the probes' measured savings (``fit_line``; module docstring). Sub-graphs timed alone
    miss the layout changes and cache effects of their neighbours, so the mapping is
    measured, not assumed."""
    from idap_onnx.passes.prune_channels import prune_channels
    from idap_onnx.shapes import shapes_as_input

    models, widths = {"model": model}, {}
    for name, fractions in probe_cuts(table, graph).items():
        removal, w = {}, {}
        for g in graph.groups:
            c = table.groups.get(g.key)
            if c is None or g.id not in fractions:
                continue
            keep = c.snap(int(g.size * fractions[g.id]))
            cut = min(g.size - keep, len(g.prunable_units))
            if cut > 0:
                removal[g.id] = g.prunable_units[len(g.prunable_units) - cut:]
                w[c.key] = g.size - cut
        if removal:  # timed as optimize writes its result (``shapes.shapes_as_input``)
            probe = prune_channels(model, removal, graph=graph)
            models[name] = shapes_as_input(probe, model)
            widths[name] = w
    report = measure(models, feed, rounds=15, per_round=10, warmup=3, max_seconds=20, **kw)
    m = report.timings["model"].median_ms
    table.model_ms = m
    saved = {name: table.savings(w) for name, w in widths.items()}
    removed = {name: table.removed_bytes(w) for name, w in widths.items()}
    table.probes = [
        {"probe": name, "measured_ms": report.timings[name].median_ms,
         "subgraph_saving_ms": round(saved[name], 6),
         "weights_removed_mb": round(removed[name] / 1e6, 6), "weight": 1.0}
        for name in widths
    ]
    table.refit()
    if progress:
        progress(f"latency table: model {m:.3f} ms, k {table.scale:.3f}, "
                 f"b {table.ms_per_mb:.4f} ms/MB; "
                 + ", ".join(f"{p['probe']} {p['measured_ms']:.3f} ms measured, "
                             f"{p['predicted_ms']:.3f} predicted" for p in table.probes))


def sub_group(sub: onnx.ModelProto | None, group):
    """``(sub-graph analysis, the group in it)``, or why ``group`` gets no curve: its
    sub-graph (``extract_group``) could not be made, the analysis cannot read it, finds no
    group with the same producers, consumers and size, or freezes it."""
    from idap_onnx.dependency import analyze_model

    if sub is None:
        return "no sub-graph: an input of unknown shape"
    try:
        sg = analyze_model(sub)
    except Exception as exc:  # noqa: BLE001 (a sub-graph the analysis cannot read: no curve)
        return f"the sub-graph's analysis failed: {str(exc).splitlines()[0][:160]}"
    match = [h for h in sg.groups if set(group.producers) <= set(h.producers)
             and set(h.consumers) == set(group.consumers) and h.size == group.size]
    if not match:
        return "the sub-graph's analysis couples the channels otherwise"
    if match[0].frozen:
        return f"frozen in the sub-graph: {match[0].frozen_reasons[0]}"
    return sg, match[0]


def _time_widths(sub, group, widths, measure, timing, kw):
    """{'points': {width: ms}} of ``sub`` with ``group`` pruned to each width, timed in turns."""
    from idap_onnx.passes.prune_channels import prune_channels

    found = sub_group(sub, group)
    if isinstance(found, str):
        return None
    sg, h = found
    prunable = h.prunable_units
    models = {}
    for w in widths:
        cut = h.size - w
        if cut > len(prunable):
            continue
        models[str(w)] = sub if cut == 0 else prune_channels(
            sub, {h.id: sorted(prunable[len(prunable) - cut:])}, graph=sg)
    if str(group.size) not in models:
        return None
    report = measure(models, _feed(sub), rounds=timing.rounds, per_round=timing.per_round,
                     warmup=timing.warmup, max_seconds=timing.max_seconds, **kw)
    return {"points": {w: t.median_ms for w, t in report.timings.items()}}


def _cached(cache: Path | None, sig: str) -> dict | None:
    if cache is None:
        return None
    try:
        return json.loads((cache / f"{sig}.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _atomic_json(path: Path, data: dict) -> Path:
    from idap_onnx.model_io import write_text_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True))
