"""The surgery self-check: prune random units of a model and verify the result.

For one model and seed: pick random prunable groups and random units in each; then
- exact groups: ``prune_channels`` must compute what ``zero_units`` computes (rel L2 < tol);
- all picked groups together: the pruned model passes the full checker, runs in ONNX
  Runtime with the original's input/output names, dtypes and output shapes, and has exactly
  the MACs that ``group_costs.predict_macs`` predicts.
- blocks: removing a residual block computes what the original computes with that branch's
  output forced to zero (``Mul(f(x), 0)`` inserted before the Add); a removed chain leaves a
  valid model that runs.
This is what the zoo suite (tests, ``tools/zoo_coverage.py``) runs on every architecture.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx

from idap_onnx.accounting import model_cost
from idap_onnx.blocks import Block, find_blocks
from idap_onnx.dependency import DependencyGraph, analyze_model
from idap_onnx.group_costs import predict_macs, prunable_share
from idap_onnx.passes.prune_channels import prune_channels, zero_units
from idap_onnx.passes.remove_blocks import remove_blocks
from idap_onnx.verify import check_rewrite, rel_l2, run_model


@dataclass
class SelfCheck:
    """Outcome of ``self_check`` (errors empty when everything held)."""

    groups: int
    prunable_groups: int
    exact_groups_tested: int
    inexact_groups_tested: int
    prunable_share: float
    exact_error: float
    macs_before: int
    macs_after: int
    macs_predicted: int
    blocks: int = 0
    blocks_tested: int = 0
    block_error: float = 0.0
    frozen_reasons: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def pick_removal(
    graph: DependencyGraph, rng: np.random.Generator, group_fraction: float = 0.5
) -> dict[str, list[int]]:
    """Random units (at most half, at least one kept) from a random share of prunable groups."""
    removal = {}
    for g in graph.groups:
        units = g.prunable_units
        if g.frozen or rng.random() > group_fraction:
            continue
        k = int(rng.integers(1, max(2, len(units) // 2 + 1)))
        k = min(k, len(units) - 1, g.size - 1)
        if k > 0:
            removal[g.id] = sorted(int(u) for u in rng.choice(units, size=k, replace=False))
    return removal


def self_check(
    model: onnx.ModelProto,
    feeds: Mapping[str, np.ndarray],
    *,
    seed: int = 0,
    tol: float = 1e-5,
) -> SelfCheck:
    """Run the self-check on ``model`` with inputs ``feeds`` (see module docstring)."""
    shapes = {k: list(v.shape) for k, v in feeds.items()}
    graph = analyze_model(model, shapes)
    cost = model_cost(model, shapes)
    rng = np.random.default_rng(seed)
    removal = pick_removal(graph, rng)
    exact = {k: v for k, v in removal.items() if graph.group(k).exact}
    reasons: dict[str, int] = {}
    for g in graph.groups:
        if g.frozen:
            key = (g.frozen_reasons[0] if g.frozen_reasons else "a single unit").split("'")[0]
            reasons[key.strip()] = reasons.get(key.strip(), 0) + 1
    result = SelfCheck(
        groups=len(graph.groups),
        prunable_groups=sum(not g.frozen for g in graph.groups),
        exact_groups_tested=len(exact),
        inexact_groups_tested=len(removal) - len(exact),
        prunable_share=prunable_share(graph, cost),
        exact_error=0.0,
        macs_before=cost.macs,
        macs_after=cost.macs,
        macs_predicted=predict_macs(graph, cost, removal),
        frozen_reasons=reasons,
    )
    try:
        if exact:
            pruned = prune_channels(model, exact, graph=graph)
            zeroed = zero_units(model, exact, graph=graph)
            got, want = run_model(pruned, feeds), run_model(zeroed, feeds)
            result.exact_error = max(rel_l2(a, b) for a, b in zip(got, want, strict=True))
            if result.exact_error > tol:
                result.errors.append(f"exact groups differ from zeroed: {result.exact_error:.2e}")
        if removal:
            pruned = prune_channels(model, removal, graph=graph)
            check_rewrite(model, pruned, feeds)
            result.macs_after = model_cost(pruned, shapes).macs
            if result.macs_after != result.macs_predicted:
                result.errors.append(
                    f"MACs {result.macs_after} != predicted {result.macs_predicted}"
                )
    except Exception as exc:  # report, the suite decides
        result.errors.append(
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        )
    _check_blocks(model, graph, feeds, rng, result, tol)
    return result


def zero_branch(model: onnx.ModelProto, block: Block) -> onnx.ModelProto:
    """The reference for removing a residual block: ``model`` with ``Mul(f(x), 0)`` feeding
    the block's Add instead of ``f(x)``."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    zero, zeroed = f"{block.branch}__zero", f"{block.branch}__zeroed"
    dtype = np.float32
    out.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros((), dtype), zero))
    for node in out.graph.node:
        if node.name == block.nodes[-1]:
            node.input[list(node.input).index(block.branch)] = zeroed
    out.graph.node.append(onnx.helper.make_node("Mul", [block.branch, zero], [zeroed]))
    return _topo(out)


def _topo(model: onnx.ModelProto) -> onnx.ModelProto:
    """Nodes in topological order (the appended Mul must come before its reader)."""
    ready = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer}
    pending, ordered = list(model.graph.node), []
    while pending:
        rest = []
        for node in pending:
            if all(not i or i in ready for i in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            ordered += rest
            break
        pending = rest
    del model.graph.node[:]
    model.graph.node.extend(ordered)
    return model


def _check_blocks(model, graph, feeds, rng, result: SelfCheck, tol: float) -> None:
    blocks = find_blocks(model, graph.index)
    result.blocks = len(blocks)
    residual = [b for b in blocks if b.kind == "residual"]
    chains = [b for b in blocks if b.kind == "chain"]
    picked = [residual[i] for i in rng.permutation(len(residual))[:2]]
    picked += [chains[i] for i in rng.permutation(len(chains))[:1]]
    try:
        for block in picked:
            removed = remove_blocks(model, [block.name], blocks=blocks)
            result.blocks_tested += 1
            if block.kind == "residual":
                want = run_model(zero_branch(model, block), feeds)
                got = run_model(removed, feeds)
                err = max(rel_l2(a, b) for a, b in zip(got, want, strict=True))
                result.block_error = max(result.block_error, err)
                if err > tol:
                    result.errors.append(
                        f"block {block.name} differs from zeroed branch: {err:.2e}"
                    )
            else:
                check_rewrite(model, removed, feeds)
    except Exception as exc:  # report, the suite decides
        result.errors.append(
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        )
