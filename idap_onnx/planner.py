"""Calibration-free pruning plans: weight-norm unit scores and a global ranking.

Unit score (Li et al. 2017, filter norms), summed over every producer of the group:

    l1(u) = sum_p sum |W_p[u]| / n_u        l2(u) = sqrt( sum_p sum W_p[u]^2 / n_u )

where ``W_p[u]`` is the slice of producer p's weight (Conv/Gemm/MatMul rows, embedding
columns) that unit u owns and ``n_u`` the number of those weights, so units of different
layers compare on one scale. ``random`` draws scores from the seed. A unit whose weights are
all zero scores 0 and is taken first.

Plan: rank all prunable units of all groups together, lowest first, and take
``round(ratio * N)``; each group keeps at least ``max(1, round_to)`` units and at most
``max_group_ratio`` of them go (of its width in the original model, ``original[group]``,
where an iterative run gives it: the bound holds over all steps, not per step); kept counts
are then rounded to multiples of ``round_to`` (or of ``multiples[group]``, a latency table's
stair steps, where given).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from idap_onnx.dependency import SLICE, ChannelGroup, DependencyGraph
from idap_onnx.errors import UsageError

SCORES = ("l1", "l2", "random")


@dataclass(frozen=True)
class PlanConfig:
    """How to turn unit scores into a removal."""

    ratio: float
    round_to: int = 1
    max_group_ratio: float = 1.0
    ignore: tuple[str, ...] = ()
    multiples: Mapping[str, int] | None = None  # group id -> its own round_to
    original: Mapping[str, int] | None = None  # group id -> its units in the original model

    def step(self, group_id: str) -> int:
        """Kept counts of this group are multiples of this."""
        return (self.multiples or {}).get(group_id, self.round_to)

    def check(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise UsageError(
                f"ratio {self.ratio} is outside [0, 1); pass the fraction of units to remove, "
                "such as 0.3"
            )
        if self.round_to < 1:
            raise UsageError(f"round_to {self.round_to} is below 1; pass 1 (exact) or 8")
        if not 0.0 < self.max_group_ratio <= 1.0:
            raise UsageError(
                f"max_group_ratio {self.max_group_ratio} is outside (0, 1]; pass e.g. 0.8"
            )


def weight_scores(graph: DependencyGraph, kind: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Group id -> score per unit (module docstring); ``kind`` in ``SCORES``."""
    if kind not in SCORES:
        raise UsageError(f"unknown score '{kind}'; choose one of {', '.join(SCORES)}")
    rng = np.random.default_rng(seed)
    if kind == "random":
        return {g.id: rng.random(g.size) for g in graph.groups}
    total = [np.zeros(g.size) for g in graph.groups]
    count = [np.zeros(g.size) for g in graph.groups]
    for edit in graph.edits:
        if edit.kind != SLICE or edit.role != "producer":
            continue
        node = graph.index.node_by_name[edit.node]
        weight = graph.index.constant(node.input[edit.input])
        if weight is None or weight.ndim < 2:
            continue  # biases and normalization parameters are not filters
        w = np.moveaxis(
            np.abs(weight) if kind == "l1" else weight.astype(np.float64) ** 2, edit.axis, 0
        )
        per_elem = w.reshape(w.shape[0], -1).sum(axis=1)
        n_elem = w.reshape(w.shape[0], -1).shape[1]
        group, unit = graph.element_units(edit.tensor)
        for gi in np.unique(group[group >= 0]):
            sel = (group == gi) & (unit >= 0)
            np.add.at(total[gi], unit[sel], per_elem[sel])
            np.add.at(count[gi], unit[sel], n_elem)
    scores = {}
    for gi, g in enumerate(graph.groups):
        mean = np.divide(total[gi], count[gi], out=np.zeros_like(total[gi]), where=count[gi] > 0)
        scores[g.id] = mean if kind == "l1" else np.sqrt(mean)
    return scores


def plan_removal(
    graph: DependencyGraph, scores: dict[str, np.ndarray], config: PlanConfig
) -> dict[str, list[int]]:
    """Group id -> units to remove (module docstring)."""
    config.check()
    ignored = set(config.ignore)
    candidates = []
    limit: dict[str, int] = {}
    for g in graph.groups:
        if g.frozen or ignored & (set(g.producers) | set(g.consumers)):
            continue
        keep_min = max(1, config.step(g.id))
        size0 = (config.original or {}).get(g.id, g.size)
        limit[g.id] = max(0, min(
            len(g.prunable_units),
            g.size - keep_min,
            int(np.floor(config.max_group_ratio * size0 + 1e-9)) - (size0 - g.size),
        ))
        candidates += [(float(scores[g.id][u]), g.id, u) for u in g.prunable_units]
    target = int(round(config.ratio * len(candidates)))
    candidates.sort(key=lambda t: (t[0], t[1], t[2]))
    taken: dict[str, list[int]] = {}
    for _score, gid, u in candidates:
        if target <= 0:
            break
        if len(taken.get(gid, [])) < limit[gid]:
            taken.setdefault(gid, []).append(u)
            target -= 1
    return {
        gid: removed
        for gid, units in taken.items()
        if units and (removed := _rounded(graph.group(gid), units, scores[gid],
                                          config.step(gid), limit[gid],
                                          floor=config.multiples is not None))
    }


def _rounded(
    group: ChannelGroup, units: list[int], score: np.ndarray, round_to: int, limit: int,
    floor: bool = False,
) -> list[int]:
    """Remove the lowest-scored units so the kept count is a multiple of ``round_to``: the
    nearest one, or with ``floor`` the one at or below the count wanted (the top of the
    stair a latency table measured); where ``limit`` forbids that, the next one up."""
    if round_to == 1:
        return sorted(units)
    kept = group.size - len(units)
    kept = (kept // round_to if floor else int(round(kept / round_to))) * round_to
    kept = max(round_to, kept)
    if group.size - kept > limit:
        kept = -(-(group.size - limit) // round_to) * round_to
    n_remove = max(0, group.size - kept)
    order = sorted(group.prunable_units, key=lambda u: (score[u], u))
    return sorted(order[:n_remove])
