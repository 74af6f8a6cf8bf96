"""MACs and parameters seen through the channel groups.

- ``group_macs``: the MACs of the nodes that produce or consume a group's channels (the
  compute that pruning the group can shrink);
- ``prunable_share``: the fraction of all MACs in nodes that touch at least one prunable group;
- ``predict_macs``: the MACs a removal leaves: each node's MACs times the kept fraction of its
  input channels (consumer columns) and of its output channels (producer rows). Surgery is
  correct only if ``accounting.model_cost`` of the pruned model equals this prediction.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from idap_onnx.accounting import ModelCost
from idap_onnx.dependency import SLICE, DependencyGraph


def group_macs(graph: DependencyGraph, cost: ModelCost) -> dict[str, int]:
    """Group id -> MACs of the nodes that produce, consume or multiply its channels."""
    macs = {n.name: n.macs for n in cost.nodes}
    touching = _touching(graph)
    return {g.id: sum(macs.get(name, 0) for name in touching[g.id]) for g in graph.groups}


def prunable_share(graph: DependencyGraph, cost: ModelCost) -> float:
    """Fraction of the model's MACs in nodes touching at least one non-frozen group."""
    by_group = _touching(graph)
    touching = set()
    for g in graph.groups:
        if not g.frozen:
            touching |= by_group[g.id]
    total = sum(n.macs for n in cost.nodes)
    part = sum(n.macs for n in cost.nodes if n.name in touching)
    return part / total if total else 0.0


def predict_macs(graph: DependencyGraph, cost: ModelCost, removal: dict[str, list[int]]) -> int:
    """MACs after removing ``removal`` (see module docstring), without building the model."""
    dead = graph.removed_channels(removal)
    masks: dict[str, float] = {}

    def kept(tensor: str) -> float:
        if tensor not in masks:
            masks[tensor] = float(graph.layouts[tensor].keep_mask(dead).mean())
        return masks[tensor]

    weight_edits: dict[str, dict[str, str]] = defaultdict(dict)
    for e in graph.edits:
        if e.kind == SLICE and e.role in ("producer", "consumer"):
            node = graph.index.node_by_name.get(e.node)
            if (
                node is not None
                and node.op_type in _WEIGHTED
                and e.input == _WEIGHT_SLOT[node.op_type]
            ):
                weight_edits[e.node][e.role] = e.tensor
    total = 0.0
    for nc in cost.nodes:
        if not nc.macs:
            continue
        node = graph.index.node_by_name.get(nc.name)
        frac = 1.0
        if node is not None and nc.name in weight_edits:
            for tensor in weight_edits[nc.name].values():
                frac *= kept(tensor)
        elif node is not None and node.op_type == "MatMul":
            frac = _activation_matmul_fraction(graph, node, kept)
        total += nc.macs * frac
    return int(round(total))


def _touching(graph: DependencyGraph) -> dict[str, set[str]]:
    """Group id -> its producers and consumers, and the MatMuls of two activations that carry
    its channels (attention's ``Q K^T`` and ``P V``: removing heads shrinks them too, as
    ``predict_macs`` counts)."""
    by_space = {s: g.id for g in graph.groups for s in g.spaces}
    out = {g.id: set(g.producers) | set(g.consumers) for g in graph.groups}
    for node in graph.index.nodes:
        if node.op_type != "MatMul" or any(
            graph.index.initializer_name(i) is not None for i in node.input
        ):
            continue
        for name in node.input:
            lay = graph.layouts.get(name)
            for s in lay.spaces() if lay is not None else ():
                out[by_space[s]].add(node.name)
    return out


_WEIGHTED = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
_WEIGHT_SLOT = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}


def _activation_matmul_fraction(graph: DependencyGraph, node, kept) -> float:
    """Heads kept (batch axis), rows kept (M) and columns kept (N) of an attention MatMul."""
    a, b = node.input[0], node.input[1]
    la, lb = graph.layouts.get(a), graph.layouts.get(b)
    ra, rb = graph.index.rank(a) or 0, graph.index.rank(b) or 0
    frac = kept(a) if la is not None else 1.0
    if lb is not None:
        b_is_n = lb.axis == rb - 1
        a_joined = la is not None and (la.axis < ra - 2 or la.axis == ra - 1)
        if b_is_n or not a_joined:
            frac *= kept(b)
    return float(np.clip(frac, 0.0, 1.0))
