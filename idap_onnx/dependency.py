"""The channel-dependency graph of an ONNX model (DepGraph on the ONNX graph).

``analyze(model)`` walks the nodes in order and asks each op's rule (``idap_onnx.oprules``)
what it does with the channel axis. Every producer creates a *space* of channels; rules join
channels that must be removed together (union-find over all channels of all spaces). Then:

- a **group** is a connected set of spaces (spaces linked by any joined channel);
- a **unit** is a connected set of channels: removing unit u removes each of its channels from
  its space, i.e. one output row from each producer, one input column from each consumer;
- a unit joined with a *fixed* element (a graph output, an op without a rule, an untracked
  tensor of the same size) cannot be removed; a group whose units are all fixed is frozen;
- a group is *exact* when, after zeroing the per-channel parameters of removed units, every
  consumer reads zeros there, so removal leaves the output unchanged (``zero_units``).

Scoring and surgery read the result; nothing here edits the model.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import onnx

from idap_onnx.graph import GraphIndex
from idap_onnx.layout import FIXED, Layout

SLICE = "slice"  # slice constant input `input` of `node` along `axis` by keep mask of `tensor`
GROUP_ATTR = "group"  # set attribute group = kept(tensor) // per (extra[0])
RESHAPE_DIM = "reshape"  # set shape[axis] of Reshape `node` to the tracked length of `tensor`
SPLIT_SIZES = "split"  # set Split sizes to the kept lengths of the outputs in `extra`
SLICE_BOUNDS = "slice_bounds"  # rewrite Slice start/end at position `axis` for kept elements
ROWS = "rows"  # in a SLICE's extra (ROWS, g): the tensor holds g joined rows, the constant one
SCALED = "scaled"  # in a RESHAPE_DIM's extra: a constant factor of a run-time entry (B * H)
PINNED = "pinned"  # in a RESHAPE_DIM's extra: the entry is a run-time piece, becomes a constant


@dataclass(frozen=True)
class Edit:
    """One change removal needs; ``role`` is ``producer`` for per-channel parameters (zeroed by
    ``zero_units``), ``consumer`` for input columns, ``structure`` for attributes and shapes."""

    kind: str
    node: str
    tensor: str
    input: int = -1
    axis: int = 0
    role: str = "structure"
    extra: tuple = ()


@dataclass
class Space:
    """The channels one producer node creates; ``offset`` indexes them in the union-find."""

    id: int
    node: str
    n: int
    offset: int
    reasons: list[str] = field(default_factory=list)
    inexact: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ChannelGroup:
    """Coupled spaces; ``units[u]`` maps space id -> the channels unit u holds in that space.

    ``fixed[u]`` marks units that can never be removed; ``frozen_reasons`` says why.
    """

    id: str
    spaces: tuple[int, ...]
    units: tuple[dict[int, np.ndarray], ...]
    fixed: tuple[bool, ...]
    producers: tuple[str, ...]
    consumers: tuple[str, ...]
    frozen_reasons: tuple[str, ...]
    inexact_reasons: tuple[str, ...]

    @property
    def size(self) -> int:
        return len(self.units)

    @property
    def prunable_units(self) -> list[int]:
        return [u for u, f in enumerate(self.fixed) if not f]

    @property
    def frozen(self) -> bool:
        return len(self.prunable_units) < 2

    @property
    def exact(self) -> bool:
        return not self.inexact_reasons

    @property
    def key(self) -> str:
        """A name that survives pruning (node names do, group ids do not): its producers and
        consumers, ``"p1,p2>c1,c2"``."""
        return ",".join(sorted(self.producers)) + ">" + ",".join(sorted(self.consumers))


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = [0]  # element 0 is unused

    def add(self, n: int) -> int:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return start

    def find(self, x: int) -> int:
        parent = self.parent
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


class AnalysisContext:
    """What rules read and write while the analysis walks the graph (see ``oprules.base``)."""

    def __init__(self, model: onnx.ModelProto, shapes=None) -> None:
        self.index = GraphIndex(model, shapes)
        self.layouts: dict[str, Layout] = {}
        self.nonzeros: dict[str, np.ndarray] = {}
        self.spaces: list[Space] = []
        self.edits: list[Edit] = []
        self.uf = _UnionFind()
        self.producers: dict[int, set[str]] = defaultdict(set)
        self.consumers: dict[int, set[str]] = defaultdict(set)
        self.declined: dict[str, str] = {}
        self.fixed: dict[int, str] = {}  # union-find element -> why it cannot be removed
        self.deferred: list[tuple[str, str, str, str]] = []
        # (width tensor, Reshape) -> (entry -> "channel" | "head", every entry that reads the
        # width): how a Reshape's own rule resolved the run-time reads of another tensor's
        # channel count in its target (``movement._note_width_read``)
        self.width_reads: dict[tuple[str, str], tuple[dict[int, str], frozenset[int]]] = {}

    # -- reading -----------------------------------------------------------------------------
    @property
    def opset(self) -> int:
        return self.index.opset

    def layout(self, name: str) -> Layout | None:
        return self.layouts.get(name) if name else None

    def nonzero(self, name: str) -> np.ndarray:
        return self.nonzeros[name]

    def shape(self, name: str):
        return self.index.shape(name)

    def rank(self, name: str) -> int | None:
        return self.index.rank(name)

    def const(self, name: str) -> np.ndarray | None:
        return self.index.constant(name) if name else None

    # -- writing -----------------------------------------------------------------------------
    def set(self, name: str, layout: Layout, nonzero: np.ndarray) -> None:
        self.layouts[name] = layout
        self.nonzeros[name] = nonzero

    def new_space(self, node: onnx.NodeProto, n: int, axis: int) -> Layout:
        """A fresh space of ``n`` channels produced by ``node`` (its output rows)."""
        space = Space(len(self.spaces), node.name, n, self.uf.add(n))
        self.spaces.append(space)
        self.producers[space.id].add(node.name)
        return Layout.fresh(space.id, n, axis)

    def _ids(self, lay: Layout, e: int) -> list[int]:
        s = int(lay.space[e])
        if s == FIXED:
            return []
        base = self.spaces[s].offset + int(lay.chan[e])
        return list(range(base, base + lay.fold))

    def join(self, a: Layout, b: Layout) -> None:
        """Channels at the same element of ``a`` and ``b`` are removed together; a channel
        at the same element as an untracked one (``FIXED``) can never be removed."""
        for e in range(len(a)):
            ids_a, ids_b = self._ids(a, e), self._ids(b, e)
            if not ids_a or not ids_b:
                for x in ids_a + ids_b:
                    self.fixed.setdefault(x, "coupled with untracked channels")
                continue
            ids = ids_a + ids_b
            for x in ids[1:]:
                self.uf.union(ids[0], x)

    def bundle(self, lay: Layout) -> None:
        """All channels of each element (a whole head) form one unit."""
        for e in range(len(lay)):
            ids = self._ids(lay, e)
            for x in ids[1:]:
                self.uf.union(ids[0], x)

    def tie(self, parts: list[tuple[Layout, np.ndarray]]) -> None:
        """All channels at the given elements of the given layouts form one unit."""
        ids = [x for lay, elems in parts for e in elems for x in self._ids(lay, int(e))]
        for x in ids[1:]:
            self.uf.union(ids[0], x)

    def fix(self, lay: Layout, reason: str) -> None:
        """The channels of ``lay`` can never be removed, for ``reason``."""
        for e in range(len(lay)):
            for x in self._ids(lay, e):
                self.fixed.setdefault(x, reason)

    def inexact(self, lay: Layout, reason: str, where: np.ndarray | None = None) -> None:
        """Removing the channels of ``lay`` (at elements ``where``) changes the output."""
        space = lay.space if where is None else lay.space[where]
        for s in {int(x) for x in np.unique(space) if x != FIXED}:
            if reason not in self.spaces[s].inexact:
                self.spaces[s].inexact.append(reason)

    def sink(self, node: onnx.NodeProto, name: str, lay: Layout | None = None) -> None:
        """``node`` contracts the channels of ``name``: exact only where they read zeros."""
        lay = lay or self.layouts[name]
        self.consume(node, lay)
        nz = self.nonzeros[name]
        if nz.any():
            self.inexact(lay, f"{node.op_type} '{node.name}' reads non-zero removed channels", nz)

    def same_channels_later(self, source: str, other: str, where: str, reshape: str = "") -> None:
        """After the analysis, ``other`` must hold the same units as ``source`` element by
        element (a shape read from one tensor spells the other's channel count), unless
        Reshape ``reshape`` resolved every such read itself (``width_reads``)."""
        self.deferred.append((source, other, where, reshape))

    def check_deferred(self) -> None:
        """Fix both tensors of each recorded pair that do not hold the same units, unless
        the Reshape's rule resolved every read of ``source``'s width in its target
        (``width_reads``): a channel entry rewritten to a constant is right either way; a
        head size read from the width stays right while the width stays, so then only the
        source is fixed, or both where they hold the same units (removing heads would change
        the width it reads)."""
        for source, other, where, reshape in self.deferred:
            kinds, entries = self.width_reads.get((source, reshape), ({}, None))
            resolved = entries is not None and entries <= set(kinds)
            head = "head" in kinds.values()
            same = self._same_units(source, other)
            if (same and not (resolved and head)) or (resolved and not head):
                continue
            if resolved and not same:
                self.fix(self.layouts[source], f"its width sets the head size of {where}")
                continue
            reason = (f"{where} reads its head size from the width it prunes" if same
                      else f"{where} is shaped by the channel count of '{source}'")
            for lay in (self.layouts.get(source), self.layouts.get(other)):
                if lay is not None:
                    self.fix(lay, reason)

    def _same_units(self, source: str, other: str) -> bool:
        """Whether ``source`` and ``other`` hold the same units element by element."""
        a, b = self.layouts.get(source), self.layouts.get(other)
        if a is None or b is None or len(a) != len(b) or a.fold != b.fold:
            return False
        for e in range(len(a)):
            ids_a, ids_b = self._ids(a, e), self._ids(b, e)
            if not ids_a or not ids_b or self.uf.find(ids_a[0]) != self.uf.find(ids_b[0]):
                return False
        return True

    def consume(self, node: onnx.NodeProto, lay: Layout) -> None:
        for s in lay.spaces():
            self.consumers[s].add(node.name)

    def produce(self, node: onnx.NodeProto, lay: Layout) -> None:
        for s in lay.spaces():
            self.producers[s].add(node.name)

    def edit(self, kind: str, node: onnx.NodeProto, tensor: str, **kw) -> None:
        self.edits.append(Edit(kind, node.name, tensor, **kw))

    def decline(self, node: onnx.NodeProto, reason: str) -> None:
        """Fix every channel entering ``node``; its outputs carry no tracked channels."""
        self.declined[node.name] = reason
        for inp in node.input:
            lay = self.layout(inp)
            if lay is not None:
                self.fix(lay, reason)


@dataclass
class DependencyGraph:
    """The result of ``analyze``: layouts, groups, edits, and what was declined and why."""

    model: onnx.ModelProto
    index: GraphIndex
    layouts: dict[str, Layout]
    spaces: list[Space]
    groups: list[ChannelGroup]
    edits: list[Edit]
    declined: dict[str, str]

    def group(self, group_id: str) -> ChannelGroup:
        for g in self.groups:
            if g.id == group_id:
                return g
        raise KeyError(group_id)

    @cached_property
    def _unit_arrays(self) -> dict[int, tuple[int, np.ndarray]]:
        """Space -> (index of its group in ``groups``, unit of each of its channels)."""
        arrays = {}
        for gi, group in enumerate(self.groups):
            for s in group.spaces:
                arrays[s] = (gi, np.full(self.spaces[s].n, -1, dtype=np.int64))
            for u, unit in enumerate(group.units):
                for s, chans in unit.items():
                    arrays[s][1][chans] = u
        return arrays

    def element_units(self, tensor: str) -> tuple[np.ndarray, np.ndarray]:
        """Per element of ``tensor``'s channel axis: (index into ``groups``, unit), -1 where
        the element holds no channel of a group (an untracked part of a Concat)."""
        lay = self.layouts[tensor]
        group = np.full(len(lay), -1, dtype=np.int64)
        unit = np.full(len(lay), -1, dtype=np.int64)
        for s in lay.spaces():
            gi, units = self._unit_arrays[s]
            sel = lay.space == s
            group[sel] = gi
            unit[sel] = units[lay.chan[sel]]
        return group, unit

    def removed_channels(self, removal: dict[str, list[int]]) -> dict[int, np.ndarray]:
        """Per space, a bool per channel: True where a unit in ``removal`` holds it."""
        dead = {s.id: np.zeros(s.n, dtype=bool) for s in self.spaces}
        for gid, units in removal.items():
            group = self.group(gid)
            for u in units:
                for s, chans in group.units[u].items():
                    dead[s][chans] = True
        return dead


def analyze_model(
    model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None
) -> DependencyGraph:
    """``analyze`` with every shape made concrete (``shapes.analysis_shapes``).

    Symbolic input dims are filled in (batch 1, others 32 unless ``input_shapes`` says);
    shapes that static inference and shape folding leave unknown are measured by running the
    model once in ONNX Runtime on dummy inputs. The edits refer to node and initializer
    names only, so they apply to ``model`` itself, whose symbolic dims stay symbolic.
    """
    from idap_onnx.shapes import analysis_shapes

    return analyze(model, analysis_shapes(model, input_shapes))


def analyze(model: onnx.ModelProto, shapes=None) -> DependencyGraph:
    """Build the channel-dependency graph of ``model``.

    Args:
        model: the model (not modified).
        shapes: tensor name -> shape; by default the model's own ``value_info``.
    """
    from idap_onnx import oprules  # the rules import this module's context and edit kinds

    ctx = AnalysisContext(model, shapes)
    for node in ctx.index.nodes:
        rule = oprules.lookup(node.domain, node.op_type, ctx.opset)
        has_channels = any(ctx.layout(i) is not None for i in node.input)
        if rule is None:
            if has_channels or node.op_type in oprules.PRODUCER_OPS:
                ctx.decline(node, f"no rule for op {node.domain or 'ai.onnx'}.{node.op_type}")
            continue
        rule.fn(node, ctx)
    ctx.check_deferred()
    for out in ctx.index.output_names:
        lay = ctx.layout(out)
        if lay is not None:
            ctx.fix(lay, f"reaches graph output '{out}'")
    return DependencyGraph(
        model, ctx.index, ctx.layouts, ctx.spaces, _groups(ctx), ctx.edits, ctx.declined
    )


def _groups(ctx: AnalysisContext) -> list[ChannelGroup]:
    """Spaces sharing a union-find root form one group (a union-find over spaces)."""
    uf = ctx.uf
    parent = list(range(len(ctx.spaces)))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    owner: dict[int, int] = {}
    for s in ctx.spaces:
        for c in range(s.n):
            root = uf.find(s.offset + c)
            if root in owner:
                a, b = find(owner[root]), find(s.id)
                if a != b:
                    parent[max(a, b)] = min(a, b)
            else:
                owner[root] = s.id
    by_group: dict[int, list[int]] = defaultdict(list)
    for s in ctx.spaces:
        by_group[find(s.id)].append(s.id)
    return [
        _group(ctx, f"g{k}", members)
        for k, members in enumerate(sorted(by_group.values(), key=min))
    ]


def _group(ctx: AnalysisContext, gid: str, members: list[int]) -> ChannelGroup:
    uf = ctx.uf
    unit_of_root: dict[int, dict[int, list[int]]] = {}
    fixed_roots: set[int] = set()
    reasons: list[str] = []
    for s in members:
        space = ctx.spaces[s]
        for c in range(space.n):
            x = space.offset + c
            root = uf.find(x)
            unit_of_root.setdefault(root, {}).setdefault(s, []).append(c)
            if x in ctx.fixed:
                fixed_roots.add(root)
                reasons.append(ctx.fixed[x])
    units, fixed = [], []
    for root, chans in unit_of_root.items():
        units.append({s: np.asarray(c, dtype=np.int64) for s, c in chans.items()})
        fixed.append(root in fixed_roots)
    order = sorted(
        range(len(units)), key=lambda u: min((s, int(c[0])) for s, c in units[u].items())
    )
    reasons += [r for s in members for r in ctx.spaces[s].reasons]
    inexact = [r for s in members for r in ctx.spaces[s].inexact]
    return ChannelGroup(
        gid,
        tuple(members),
        tuple(units[u] for u in order),
        tuple(fixed[u] for u in order),
        tuple(sorted({n for s in members for n in ctx.producers[s]})),
        tuple(sorted({n for s in members for n in ctx.consumers[s]})),
        tuple(dict.fromkeys(reasons)),
        tuple(dict.fromkeys(inexact)),
    )
