"""Channel surgery: remove units of channel groups (``prune_channels``) or zero them
(``zero_units``).

Invariant: every tensor's channel axis shrinks by exactly the elements whose channels are
removed (``Layout.keep_mask``); every constant, attribute and shape that spells a channel
count is rewritten from those keep masks by the edits the op rules recorded. Shared
initializers (the legacy exporter deduplicates equal constants) are copied before they are
changed. The result passes ``onnx.checker`` with ``full_check=True``; this module never runs a
session (``idap_onnx.verify`` does).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from idap_onnx.dependency import (
    GROUP_ATTR,
    PINNED,
    RESHAPE_DIM,
    ROWS,
    SCALED,
    SLICE,
    SLICE_BOUNDS,
    SPLIT_SIZES,
    DependencyGraph,
    Edit,
    analyze_model,
)
from idap_onnx.errors import SurgeryError, UsageError
from idap_onnx.graph import GraphIndex
from idap_onnx.passes.cleanup import finalize

Removal = Mapping[str, Iterable[int]]


def prune_channels(
    model: onnx.ModelProto, removal: Removal, *, graph: DependencyGraph | None = None
) -> onnx.ModelProto:
    """Return a copy of ``model`` without the units ``removal[group_id]`` of each group.

    Args:
        model: the model (not modified).
        removal: group id (``"g3"``) -> unit indices to remove.
        graph: the dependency graph of ``model`` when already computed.

    Raises:
        UsageError: unknown group, unit out of range, or every unit of a group removed.
        SurgeryError: a unit is fixed (reaches an output, frozen op) or an edit cannot apply.
    """
    graph = graph or analyze_model(model)
    clean = _validate(graph, removal)
    out = _apply(model, graph, clean, zero=False)
    return finalize(out)


def zero_units(
    model: onnx.ModelProto, removal: Removal, *, graph: DependencyGraph | None = None
) -> onnx.ModelProto:
    """Return a copy of ``model`` whose per-channel parameters of the given units are zero.

    Same shapes as ``model``. For an exact group, ``prune_channels`` of the same units
    computes the same outputs as this model (the exactness invariant the tests check).
    """
    graph = graph or analyze_model(model)
    clean = _validate(graph, removal)
    return _apply(model, graph, clean, zero=True)


def _validate(graph: DependencyGraph, removal: Removal) -> dict[str, list[int]]:
    clean: dict[str, list[int]] = {}
    known = {g.id: g for g in graph.groups}
    for gid, units in removal.items():
        if gid not in known:
            raise UsageError(f"unknown channel group '{gid}': run `idap-onnx inspect` for ids")
        group = known[gid]
        units = sorted({int(u) for u in units})
        if not units:
            continue
        if units[0] < 0 or units[-1] >= group.size:
            raise UsageError(f"group '{gid}' has units 0..{group.size - 1}, got {units[-1]}")
        fixed = [u for u in units if group.fixed[u]]
        if fixed:
            reason = "; ".join(group.frozen_reasons) or "fixed"
            raise SurgeryError(f"group '{gid}' units {fixed[:5]} cannot be removed: {reason}")
        if len(units) >= group.size:
            raise UsageError(f"group '{gid}': removing all {group.size} units leaves none")
        clean[gid] = units
    return clean


class _Constants:
    """Copy-on-write access to the constant inputs of nodes of ``model``."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.index = GraphIndex(model)
        self.nodes = {n.name: n for n in model.graph.node}
        self.refs: Counter[str] = Counter()
        for node in model.graph.node:
            for name in node.input:
                init = self.index.initializer_name(name) if name else None
                if init is not None:
                    self.refs[init] += 1
        self.private: dict[tuple[str, int], str] = {}
        self.arrays: dict[str, np.ndarray] = {}

    def get(self, node_name: str, i: int) -> np.ndarray:
        key = (node_name, i)
        if key in self.private:
            return self.arrays[self.private[key]]
        name = self.nodes[node_name].input[i]
        value = self.index.constant(name)
        if value is None:
            raise SurgeryError(f"node '{node_name}' input {i} is not a constant")
        return value

    def set(self, node_name: str, i: int, value: np.ndarray) -> None:
        key = (node_name, i)
        node = self.nodes[node_name]
        if key not in self.private:
            init = self.index.initializer_name(node.input[i])
            if init is None:  # a Constant node's value: becomes a private initializer
                name = self._fresh(f"{node.input[i]}__{node_name}_{i}")
            elif self.refs[init] == 1:
                name = init
            else:
                name = self._fresh(f"{init}__{node_name}_{i}")
            self.private[key] = name
            node.input[i] = name
        self.arrays[self.private[key]] = value

    def unshare(self, node_name: str, user_name: str) -> str:
        """Give ``user_name`` its own copy of ``node_name`` when others read its output too
        (a target shape Concat shared by several Reshapes); returns the node to edit."""
        node = self.nodes[node_name]
        users = [n for n in self.model.graph.node if node.output[0] in n.input]
        if len(users) <= 1:
            return node_name
        clone = onnx.NodeProto()
        clone.CopyFrom(node)
        clone.name = self._fresh_node(f"{node.name}__{user_name}")
        clone.output[0] = f"{node.output[0]}__{user_name}"
        for name in clone.input:  # the clone shares the original's constants
            init = self.index.initializer_name(name) if name else None
            if init is not None:
                self.refs[init] += 1
        user = self.nodes[user_name]
        for k, name in enumerate(user.input):
            if name == node.output[0]:
                user.input[k] = clone.output[0]
        position = list(self.model.graph.node).index(node) + 1
        self.model.graph.node.insert(position, clone)
        self.nodes[clone.name] = self.model.graph.node[position]
        return clone.name

    def _fresh_node(self, base: str) -> str:
        name, k = base, 0
        while name in self.nodes:
            k += 1
            name = f"{base}_{k}"
        return name

    def _fresh(self, base: str) -> str:
        name, k = base, 0
        while name in self.index.initializers or name in self.arrays:
            k += 1
            name = f"{base}_{k}"
        return name

    def commit(self) -> None:
        inits = {t.name: t for t in self.model.graph.initializer}
        for name, value in self.arrays.items():
            tensor = numpy_helper.from_array(np.asarray(value, order="C"), name)  # keeps 0-d
            if name in inits:
                inits[name].CopyFrom(tensor)
            else:
                self.model.graph.initializer.append(tensor)


def _apply(
    model: onnx.ModelProto, graph: DependencyGraph, removal: dict[str, list[int]], *, zero: bool
) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    dead = graph.removed_channels(removal)
    masks: dict[str, np.ndarray] = {}

    def keep(tensor: str) -> np.ndarray:
        if tensor not in masks:
            masks[tensor] = graph.layouts[tensor].keep_mask(dead)
        return masks[tensor]

    consts = _Constants(out)
    for edit in graph.edits:
        if zero and (edit.kind != SLICE or edit.role != "producer"):
            continue
        # a pinned entry reads another width at run time, which may change even where its
        # own tensor keeps every channel: it always becomes its constant
        if keep(edit.tensor).all() and edit.kind != SPLIT_SIZES and PINNED not in edit.extra:
            continue
        _APPLY[edit.kind](edit, consts, keep, zero)
    consts.commit()
    return out


def _slice(edit: Edit, consts: _Constants, keep, zero: bool) -> None:
    arr = consts.get(edit.node, edit.input)
    mask = keep(edit.tensor)
    if ROWS in edit.extra:  # g joined rows (equal masks): the constant holds one
        rows = mask.reshape(int(edit.extra[1]), -1)
        if not (rows == rows[0]).all():
            raise SurgeryError(f"node '{edit.node}': its joined rows keep different channels")
        mask = rows[0]
    if arr.shape[edit.axis] == 1:
        return
    if arr.shape[edit.axis] != len(mask):
        raise SurgeryError(
            f"node '{edit.node}' input {edit.input}: axis {edit.axis} has "
            f"{arr.shape[edit.axis]} entries, the channel layout {len(mask)}"
        )
    if zero:
        new = arr.copy()
        index = [slice(None)] * arr.ndim
        index[edit.axis] = ~mask
        new[tuple(index)] = 0
    else:
        new = np.compress(mask, arr, axis=edit.axis)
    consts.set(edit.node, edit.input, new)


def _group_attr(edit: Edit, consts: _Constants, keep, zero: bool) -> None:
    node = consts.nodes[edit.node]
    value = int(keep(edit.tensor).sum()) // int(edit.extra[0])
    for a in node.attribute:
        if a.name == "group":
            a.i = value
            return
    node.attribute.append(onnx.helper.make_attribute("group", value))


def _reshape_dim(edit: Edit, consts: _Constants, keep, zero: bool) -> None:
    if SCALED in edit.extra:  # the factor H of B * H (B is 1 where the layout was taken)
        old = consts.get(edit.node, edit.input)
        consts.set(edit.node, edit.input, np.full_like(old, int(keep(edit.tensor).sum())))
        return
    node = consts.unshare(edit.node, edit.extra[0]) if edit.extra else edit.node
    if PINNED in edit.extra:  # a 1-entry piece read at run time: the kept count, constant
        consts.set(node, edit.input, np.array([int(keep(edit.tensor).sum())], np.int64))
        return
    shape = consts.get(node, edit.input).copy()
    flat = shape.reshape(-1)
    flat[edit.axis] = int(keep(edit.tensor).sum())
    consts.set(node, edit.input, shape)


def _split_sizes(edit: Edit, consts: _Constants, keep, zero: bool) -> None:
    node = consts.nodes[edit.node]
    sizes = [int(keep(o).sum()) for o in edit.extra]
    for a in node.attribute:
        if a.name == "split":
            del a.ints[:]
            a.ints.extend(sizes)
            return
    consts.set(edit.node, 1, np.asarray(sizes, dtype=np.int64))


def _slice_bounds(edit: Edit, consts: _Constants, keep, zero: bool) -> None:
    starts = consts.get(edit.node, 1).copy()
    ends = consts.get(edit.node, 2).copy()
    kin, kout = keep(edit.tensor), keep(edit.extra[0])
    idx = np.arange(len(kin))[int(starts[edit.axis]) : int(ends[edit.axis])]
    start = int(kin[: idx[0]].sum()) if idx.size else 0
    starts[edit.axis], ends[edit.axis] = start, start + int(kout.sum())
    consts.set(edit.node, 1, starts)
    consts.set(edit.node, 2, ends)


_APPLY = {
    SLICE: _slice,
    GROUP_ATTR: _group_attr,
    RESHAPE_DIM: _reshape_dim,
    SPLIT_SIZES: _split_sizes,
    SLICE_BOUNDS: _slice_bounds,
}
