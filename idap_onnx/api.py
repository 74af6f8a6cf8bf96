"""The Python API behind every ``idap-onnx`` subcommand: ``inspect``, ``prune``, ``remove_blocks``.

Each function takes a model (a path or an ``onnx.ModelProto``), composes the library's analyses
and passes, and returns plain frozen dataclasses whose ``to_dict()`` is the JSON form the CLI
writes (documented in ``docs/CLI.md``, versioned by :data:`SCHEMA_VERSION`). Nothing here
writes files, and the caller's model (file or proto) is never modified.

A proto is normalized the way :func:`idap_onnx.model_io.load_model` normalizes a file (on a
copy: ``Constant`` nodes folded, unique node names), so a path and ``onnx.load`` of the same
path give the same group ids, plans and outputs. Group ids (``g0``, ``g1``...) follow the
analysis order, so they are stable for the same model and input shapes.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import onnx

from idap_onnx.accounting import ModelCost, model_cost
from idap_onnx.blocks import Block, find_blocks
from idap_onnx.dependency import SLICE, DependencyGraph, analyze_model
from idap_onnx.errors import UsageError
from idap_onnx.graph import GraphIndex
from idap_onnx.group_costs import group_macs, predict_macs, prunable_share
from idap_onnx.model_io import load_model, normalized
from idap_onnx.planner import SCORES, PlanConfig, plan_removal, weight_scores
from idap_onnx.shapes import analysis_shapes, concrete_input_shapes
from idap_onnx.verify import check_rewrite, random_feeds

__all__ = [
    "SCHEMA_VERSION",
    "BlockInfo",
    "BlockReport",
    "Cost",
    "GroupChange",
    "GroupInfo",
    "InspectReport",
    "ModelInfo",
    "PruneReport",
    "Verification",
    "WeightRef",
    "inspect",
    "prune",
    "remove_blocks",
]

#: Version of the JSON reports; bumped when a field changes meaning or disappears.
SCHEMA_VERSION = 1

ModelLike = str | os.PathLike | onnx.ModelProto
InputShapes = Mapping[str, Sequence[int]] | None


# ----------------------------------------------------------------------------------------------
# Report data
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelInfo:
    """Where a model came from and its graph inputs and outputs (declared dims)."""

    path: str | None
    opset: int
    nodes: int
    inputs: tuple[tuple[str, tuple[int | str | None, ...]], ...]
    outputs: tuple[tuple[str, tuple[int | str | None, ...]], ...]

    def to_dict(self) -> dict:
        def values(items):
            return [{"name": n, "shape": list(s)} for n, s in items]

        return {"path": self.path, "opset": self.opset, "nodes": self.nodes,
                "inputs": values(self.inputs), "outputs": values(self.outputs)}


@dataclass(frozen=True)
class Cost:
    """Parameters and MACs of a model at the report's input shapes (FLOPs = 2 * MACs)."""

    params: int
    macs: int

    @property
    def flops(self) -> int:
        return 2 * self.macs

    def to_dict(self) -> dict:
        return {"params": self.params, "macs": self.macs, "flops": self.flops}


@dataclass(frozen=True)
class WeightRef:
    """A node that produces (or consumes) a group's channels, and the axis of its weight
    input (``input``/``axis`` are None when the node slices no constant for the group)."""

    node: str
    op_type: str
    input: int | None
    axis: int | None

    def to_dict(self) -> dict:
        return {"node": self.node, "op_type": self.op_type, "input": self.input, "axis": self.axis}


@dataclass(frozen=True)
class GroupInfo:
    """One channel group as ``inspect`` reports it."""

    id: str
    units: int
    prunable_units: int
    frozen: bool
    exact: bool
    macs: int
    producers: tuple[WeightRef, ...]
    consumers: tuple[WeightRef, ...]
    frozen_reasons: tuple[str, ...]
    inexact_reasons: tuple[str, ...]

    def to_dict(self) -> dict:
        return {
            "id": self.id, "units": self.units, "prunable_units": self.prunable_units,
            "frozen": self.frozen, "exact": self.exact, "macs": self.macs,
            "producers": [p.to_dict() for p in self.producers],
            "consumers": [c.to_dict() for c in self.consumers],
            "frozen_reasons": list(self.frozen_reasons),
            "inexact_reasons": list(self.inexact_reasons),
        }


@dataclass(frozen=True)
class BlockInfo:
    """A removable block (``idap_onnx.blocks``) with the cost of the nodes inside it."""

    name: str
    kind: str
    input: str
    output: str
    nodes: int
    params: int
    macs: int

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "input": self.input,
                "output": self.output, "nodes": self.nodes, "params": self.params,
                "macs": self.macs}


@dataclass(frozen=True)
class InspectReport:
    """What ``inspect`` found: costs, channel groups, declined nodes, removable blocks."""

    model: ModelInfo
    input_shapes: tuple[tuple[str, tuple[int, ...]], ...]
    op_histogram: tuple[tuple[str, int], ...]
    cost: Cost
    unresolved: tuple[str, ...]
    prunable_share: float
    groups: tuple[GroupInfo, ...]
    declined: tuple[tuple[str, str, str], ...]  # (node, op_type, reason), graph order
    blocks: tuple[BlockInfo, ...]

    @property
    def frozen_groups(self) -> tuple[GroupInfo, ...]:
        return tuple(g for g in self.groups if g.frozen)

    def to_dict(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "command": "inspect",
            "model": self.model.to_dict(),
            "input_shapes": {n: list(s) for n, s in self.input_shapes},
            "op_histogram": dict(self.op_histogram),
            **self.cost.to_dict(),
            "unresolved_nodes": list(self.unresolved),
            "prunable_share": self.prunable_share,
            "summary": {
                "groups": len(self.groups),
                "frozen_groups": len(self.frozen_groups),
                "exact_groups": sum(g.exact for g in self.groups),
                "units": sum(g.units for g in self.groups),
                "prunable_units": sum(g.prunable_units for g in self.groups if not g.frozen),
                "declined_nodes": len(self.declined),
                "blocks": len(self.blocks),
            },
            "groups": [g.to_dict() for g in self.groups],
            "declined": [{"node": n, "op_type": o, "reason": r} for n, o, r in self.declined],
            "blocks": [b.to_dict() for b in self.blocks],
        }


@dataclass(frozen=True)
class Verification:
    """The rewrite check on random inputs: largest relative L2 output error, output shapes."""

    max_rel_err: float
    output_shapes: tuple[tuple[int, ...], ...]
    seed: int

    def to_dict(self) -> dict:
        err = self.max_rel_err if math.isfinite(self.max_rel_err) else None
        return {"max_rel_err": err, "output_shapes": [list(s) for s in self.output_shapes],
                "seed": self.seed}


@dataclass(frozen=True)
class GroupChange:
    """A group's unit count before pruning, the units kept and the indices removed."""

    id: str
    units: int
    removed: tuple[int, ...]

    @property
    def kept(self) -> int:
        return self.units - len(self.removed)

    def to_dict(self) -> dict:
        return {"id": self.id, "units": self.units, "kept": self.kept,
                "removed": list(self.removed)}


@dataclass(frozen=True)
class PruneReport:
    """What ``prune`` did. ``groups`` lists every group; ``output`` is set by the CLI."""

    model: ModelInfo
    input_shapes: tuple[tuple[str, tuple[int, ...]], ...]
    ratio: float
    score: str
    round_to: int
    seed: int
    ignore: tuple[str, ...]
    max_group_ratio: float
    before: Cost
    after: Cost
    predicted_macs: int
    prunable_units: int
    groups: tuple[GroupChange, ...]
    verification: Verification | None
    output: str | None = None

    @property
    def plan(self) -> dict[str, list[int]]:
        """Group id -> removed units, for the groups that lost any."""
        return {g.id: list(g.removed) for g in self.groups if g.removed}

    @property
    def removed_units(self) -> int:
        return sum(len(g.removed) for g in self.groups)

    def to_dict(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "command": "prune",
            "model": self.model.to_dict(),
            "output": self.output,
            "input_shapes": {n: list(s) for n, s in self.input_shapes},
            "config": {"ratio": self.ratio, "score": self.score, "round_to": self.round_to,
                       "seed": self.seed, "ignore": list(self.ignore),
                       "max_group_ratio": self.max_group_ratio},
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "predicted_macs": self.predicted_macs,
            "prunable_units": self.prunable_units,
            "removed_units": self.removed_units,
            "groups": [g.to_dict() for g in self.groups],
            "verification": self.verification.to_dict() if self.verification else None,
        }


@dataclass(frozen=True)
class BlockReport:
    """What ``remove_blocks`` did; ``output`` is set by the CLI."""

    model: ModelInfo
    input_shapes: tuple[tuple[str, tuple[int, ...]], ...]
    blocks: tuple[BlockInfo, ...]
    before: Cost
    after: Cost
    verification: Verification | None
    output: str | None = None

    def to_dict(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "command": "remove-blocks",
            "model": self.model.to_dict(),
            "output": self.output,
            "input_shapes": {n: list(s) for n, s in self.input_shapes},
            "removed_blocks": [b.to_dict() for b in self.blocks],
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "verification": self.verification.to_dict() if self.verification else None,
        }


# ----------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------


def inspect(model_or_path: ModelLike, input_shapes: InputShapes = None) -> InspectReport:
    """Analyze a model: op histogram, costs, channel groups, declined nodes, removable blocks.

    Args:
        model_or_path: An ``.onnx`` path or a loaded model (not modified).
        input_shapes: Concrete dims for some graph inputs; other symbolic dims become 1 (first
            dim) or 32 (``shapes.concrete_input_shapes``).

    Raises:
        IdapError: The file cannot be loaded, or ``input_shapes`` does not fit the model.
    """
    model, info = _load(model_or_path)
    shapes = _concrete_shapes(model, input_shapes)
    graph = analyze_model(model, shapes)
    cost = model_cost(model, shapes)
    per_group = group_macs(graph, cost)
    refs = _weight_refs(graph)
    groups = tuple(
        GroupInfo(
            g.id, g.size, len(g.prunable_units), g.frozen, g.exact, per_group[g.id],
            tuple(refs.get((g.id, "producer", n), _ref(graph, n)) for n in g.producers),
            tuple(refs.get((g.id, "consumer", n), _ref(graph, n)) for n in g.consumers),
            g.frozen_reasons, g.inexact_reasons,
        )
        for g in graph.groups
    )
    op_types = {n.name: n.op_type for n in model.graph.node}
    declined = tuple(
        (n.name, n.op_type, graph.declined[n.name])
        for n in model.graph.node if n.name in graph.declined
    )
    blocks = tuple(_block_info(b, cost) for b in find_blocks(graph.model, graph.index))
    histogram = sorted(Counter(op_types.values()).items(), key=lambda kv: (-kv[1], kv[0]))
    return InspectReport(
        info, _freeze_shapes(shapes), tuple(histogram),
        Cost(cost.params, cost.macs), cost.unresolved, prunable_share(graph, cost), groups,
        declined, blocks,
    )


def prune(
    model_or_path: ModelLike,
    ratio: float,
    *,
    score: str = "l1",
    round_to: int = 1,
    seed: int = 0,
    ignore: Iterable[str] = (),
    max_group_ratio: float = 1.0,
    input_shapes: InputShapes = None,
    verify: bool = True,
) -> tuple[onnx.ModelProto, PruneReport]:
    """Remove the lowest-scored channel units of the whole model (``planner`` docstring).

    Args:
        model_or_path: An ``.onnx`` path or a loaded model (not modified).
        ratio: Fraction of all prunable units to remove, in [0, 1).
        score: Unit score, one of ``planner.SCORES`` (``l1``, ``l2``, ``random``).
        round_to: Kept unit counts are rounded to multiples of this.
        seed: Seed of the ``random`` score and of the verification inputs.
        ignore: Node names whose groups are left whole.
        max_group_ratio: At most this fraction of any one group is removed.
        input_shapes: Concrete dims for some graph inputs (see :func:`inspect`).
        verify: Run original and pruned model in ONNX Runtime on random inputs and report the
            largest relative output error.

    Returns:
        The pruned model and the report.

    Raises:
        UsageError: A bad ratio, round-to, max-group-ratio, score or ignored node name.
        SurgeryError: The rewrite fails the checker, or the pruned model does not run.
    """
    config = PlanConfig(float(ratio), int(round_to), float(max_group_ratio), tuple(ignore))
    config.check()
    if score not in SCORES:
        raise UsageError(f"unknown score '{score}'; choose one of {', '.join(SCORES)}")
    model, info = _load(model_or_path)
    names = {n.name for n in model.graph.node}
    unknown = [n for n in config.ignore if n not in names]
    if unknown:
        raise UsageError(
            f"--ignore node '{unknown[0]}' is not in the model; use a node name that "
            "`idap-onnx inspect` lists as a producer or consumer"
        )
    shapes = _concrete_shapes(model, input_shapes)
    graph = analyze_model(model, shapes)
    removal = plan_removal(graph, weight_scores(graph, score, seed), config)
    before = model_cost(model, shapes)
    from idap_onnx.passes.prune_channels import prune_channels

    pruned = prune_channels(model, removal, graph=graph) if removal else _copy(model)
    after = model_cost(pruned, shapes)
    groups = tuple(GroupChange(g.id, g.size, tuple(removal.get(g.id, ()))) for g in graph.groups)
    report = PruneReport(
        info, _freeze_shapes(shapes), config.ratio, score, config.round_to, int(seed),
        config.ignore, config.max_group_ratio, Cost(before.params, before.macs),
        Cost(after.params, after.macs), predict_macs(graph, before, removal),
        sum(len(g.prunable_units) for g in graph.groups if not g.frozen), groups,
        _verify(model, pruned, shapes, seed) if verify else None,
    )
    return pruned, report


def remove_blocks(
    model_or_path: ModelLike,
    names: Iterable[str],
    *,
    input_shapes: InputShapes = None,
    verify: bool = True,
    seed: int = 0,
) -> tuple[onnx.ModelProto, BlockReport]:
    """Delete removable blocks (names as ``inspect`` lists them: ``res:...``, ``chain:...``).

    Args:
        model_or_path: An ``.onnx`` path or a loaded model (not modified).
        names: Block names; they must not overlap.
        input_shapes: Concrete dims for some graph inputs (see :func:`inspect`).
        verify: Run both models on random inputs and report the largest relative output error.
        seed: Seed of the verification inputs.

    Raises:
        UsageError: No name given, an unknown block name, or overlapping blocks.
    """
    names = list(names)
    if not names:
        raise UsageError("no block given; name at least one block that `idap-onnx inspect` lists")
    model, info = _load(model_or_path)
    shapes = _concrete_shapes(model, input_shapes)
    # The same shapes ``inspect`` finds blocks with (analyze_model uses analysis_shapes too).
    blocks = find_blocks(model, GraphIndex(model, analysis_shapes(model, shapes)))
    from idap_onnx.passes.remove_blocks import remove_blocks as remove_blocks_pass

    out = remove_blocks_pass(model, names, blocks=blocks)
    before, after = model_cost(model, shapes), model_cost(out, shapes)
    by_name = {b.name: b for b in blocks}
    report = BlockReport(
        info, _freeze_shapes(shapes), tuple(_block_info(by_name[n], before) for n in names),
        Cost(before.params, before.macs), Cost(after.params, after.macs),
        _verify(model, out, shapes, seed) if verify else None,
    )
    return out, report


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def _load(model_or_path: ModelLike) -> tuple[onnx.ModelProto, ModelInfo]:
    if isinstance(model_or_path, onnx.ModelProto):
        model, path = normalized(model_or_path), None
        if model is model_or_path:
            model = _copy(model)  # the API's results never share the caller's proto
    else:
        model, path = load_model(model_or_path), os.fspath(model_or_path)
    return model, _model_info(model, path)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _model_info(model: onnx.ModelProto, path: str | None) -> ModelInfo:
    inits = {t.name for t in model.graph.initializer}

    def dims(value: onnx.ValueInfoProto) -> tuple[int | str | None, ...]:
        shape = value.type.tensor_type.shape
        return tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in shape.dim
        )

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return ModelInfo(
        path, int(opset), len(model.graph.node),
        tuple((v.name, dims(v)) for v in model.graph.input if v.name not in inits),
        tuple((v.name, dims(v)) for v in model.graph.output),
    )


def _concrete_shapes(model: onnx.ModelProto, given: InputShapes) -> dict[str, list[int]]:
    """Concrete dims of every graph input (``shapes.concrete_input_shapes`` rejects a name
    that is not a graph input)."""
    return concrete_input_shapes(model, dict(given or {}))


def _freeze_shapes(shapes: Mapping[str, Sequence[int]]) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return tuple((name, tuple(int(d) for d in dims)) for name, dims in shapes.items())


def _weight_refs(graph: DependencyGraph) -> dict[tuple[str, str, str], WeightRef]:
    """(group id, role, node) -> the node's weight input and axis sliced for that group.

    Of several SLICE edits of one node and role (a weight and a bias), the first on a constant
    of rank >= 2 wins, else the lowest input index.
    """
    group_of_space = {s: g.id for g in graph.groups for s in g.spaces}
    best: dict[tuple[str, str, str], tuple[tuple[int, int], WeightRef]] = {}
    for edit in graph.edits:
        if edit.kind != SLICE or edit.role not in ("producer", "consumer"):
            continue
        layout = graph.layouts.get(edit.tensor)
        node = graph.index.node_by_name.get(edit.node)
        if layout is None or node is None:
            continue
        rank = graph.index.rank(node.input[edit.input]) or 0
        rank_key = (0 if rank >= 2 else 1, edit.input)
        ref = WeightRef(edit.node, node.op_type, edit.input, edit.axis)
        for space in layout.spaces():
            gid = group_of_space.get(space)
            if gid is None:
                continue
            key = (gid, edit.role, edit.node)
            if key not in best or rank_key < best[key][0]:
                best[key] = (rank_key, ref)
    return {key: ref for key, (_, ref) in best.items()}


def _ref(graph: DependencyGraph, node_name: str) -> WeightRef:
    node = graph.index.node_by_name.get(node_name)
    return WeightRef(node_name, node.op_type if node is not None else "", None, None)


def _block_info(block: Block, cost: ModelCost) -> BlockInfo:
    by_name = cost.by_name()
    inside = [by_name[n] for n in block.nodes if n in by_name]
    return BlockInfo(
        block.name, block.kind, block.input, block.output, len(block.nodes),
        sum(n.params for n in inside), sum(n.macs for n in inside),
    )


def _verify(
    original: onnx.ModelProto, rewritten: onnx.ModelProto, shapes: Mapping[str, list[int]],
    seed: int,
) -> Verification:
    check = check_rewrite(original, rewritten, random_feeds(original, shapes, seed))
    return Verification(float(check.max_rel_err), check.output_shapes, int(seed))

