"""How stage 1 plans against latency: the widths kept, and ``--target-latency``.

- Widths (``round_to="auto"``, the default): kept counts are multiples of each group's stair
  step in a latency table (``deploy.latency_table``), or, where no table is measured, of the
  runtime's known multiple (16 channels for ONNX Runtime's CPU provider with AVX-512, 8 with
  AVX2; 8 for fp16 and 32 for INT8 on TensorRT). An integer ``round_to`` overrides both.
- Target (``target_latency``, needs a table, built here or loaded from ``latency_table``):
  units are ranked by score per millisecond saved, ``D_f^2 / (k dT_g/du + b dW_g/du)`` with
  ``dT_g/du`` the group's sub-graph time saved per unit cut (``GroupCurve.saving_per_unit``),
  ``dW_g/du`` its weight bytes per unit and ``k``, ``b`` the table's fitted mapping
  (``LatencyTable.unit_saving``), and stage 1 stops once the predicted latency ``L(w)``
  reaches the target.
- Landing (``refines``): with a target and a table measured by this run, ``optimize`` times
  its result against the original; more than ``LANDING_TOLERANCE`` off the target, the
  result joins the table's probes (``LatencyTable.add_result``) and stage 1 plans again from
  the original, at most ``LANDING_PASSES`` times, each pass timed. The pass measured nearest
  the target is kept, with the table as it was when it planned (``keep_probes``): the table
  saved beside the report gives that model again without timing anything.
- Stage 2 removes whole blocks, which the table does not hold: their saving is predicted in
  proportion to the MACs they remove.

Planning reads the table only: the same table and seed give the same model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from idap_onnx.deploy.latency_table import (
    LatencyTable,
    channels_per_unit,
    known_multiple,
    local_target,
    model_signature,
    parse_target_latency,
    units_for,
)
from idap_onnx.errors import UsageError


@dataclass
class LatencyPlan:
    """The widths rule and latency target of one ``optimize`` run (module docstring)."""

    round_to: int | None  # an explicit multiple (units); None: per group ("auto")
    fallback: int  # channels: the runtime's known multiple
    table: LatencyTable | None = None
    source: str = "known multiple"
    target_ms: float | None = None
    target_text: str | None = None
    measured_here: bool = False  # the table was measured by this run (not loaded)
    landing: list[dict] = field(default_factory=list)  # the measured passes (``optimize``)

    @staticmethod
    def prepare(model: onnx.ModelProto, calib: Sequence[Mapping[str, np.ndarray]], config,
                say: Callable[[str], None]) -> LatencyPlan:
        """Load or measure the table where ``config`` needs one (a target, or a saved
        table given), and resolve the target to milliseconds."""
        runtime = config.latency if config.latency != "off" else "onnxruntime"
        target = local_target(runtime, device=config.device, batch=config.latency_batch,
                              precision=config.precision)
        explicit = None if config.round_to == "auto" else int(config.round_to)
        plan = LatencyPlan(explicit, known_multiple(target))
        if config.latency_table:
            plan.table = LatencyTable.load(config.latency_table)
            plan.source = f"table {config.latency_table}"
            _check_table(plan.table, model, target, say)
        elif config.target_latency is not None:
            from idap_onnx.deploy.latency import example_feed
            from idap_onnx.deploy.latency_table import build_table

            say(f"latency table: measuring every group's widths on {target.describe()}")
            plan.table = build_table(model, target, example_feed(calib, target.batch),
                                     device=config.device, show=True)
            plan.source = "table measured for this run"
            plan.measured_here = True
            say(f"latency table: {len(plan.table.groups)} groups in "
                f"{plan.table.seconds:.1f} s; model {plan.table.model_ms:.3f} ms, "
                f"k {plan.table.scale:.2f}, b {plan.table.ms_per_mb:.4f} ms/MB")
        if config.target_latency is not None:
            kind, value = parse_target_latency(config.target_latency)
            plan.target_text = str(config.target_latency)
            plan.target_ms = value * plan.table.model_ms if kind == "fraction" else value
        return plan

    @property
    def refines(self) -> bool:
        """Whether ``optimize`` measures its result and plans again toward the target: with
        a target and a table this run measured. A loaded table is never re-measured, so the
        same table and seed give the same model."""
        return self.target_ms is not None and self.table is not None and self.measured_here

    def measure_against(self, original: onnx.ModelProto, result: onnx.ModelProto,
                        calib: Sequence[Mapping[str, np.ndarray]], device: str
                        ) -> tuple[float, float]:
        """(original ms, result ms): both timed in turns on the table's target."""
        from idap_onnx.deploy.latency import example_feed, measure

        t = self.table.target
        report = measure({"original": original, "result": result},
                         example_feed(calib, t.batch), backend=t.runtime, device=device,
                         threads=t.threads, rounds=25, per_round=10, warmup=3, max_seconds=30)
        return report.timings["original"].median_ms, report.timings["result"].median_ms

    def multiples(self, graph) -> dict[str, int] | None:
        """Group id -> kept counts are multiples of this (units); None with an explicit
        ``round_to`` (the planner's own)."""
        if self.round_to is not None:
            return None
        if self.table is not None:
            return self.table.multiples(graph)
        return {g.id: units_for(self.fallback, channels_per_unit(g)) for g in graph.groups}

    def predict(self, graph, removal: Mapping[str, Sequence[int]] | None = None
                ) -> float | None:
        """The table's latency of ``graph``'s model less ``removal`` (None without a table)."""
        return None if self.table is None else self.table.predict(graph, removal)

    def covers(self, graph, removal: Mapping[str, Sequence[int]]) -> bool:
        """True when ``removal`` cuts some group whose cut the table saw save time (a
        step without one moves no prediction: stage 1 stops there rather than cut blind)."""
        if self.table is None:
            return True
        for g in graph.groups:
            curve = self.table.groups.get(g.key)
            if removal.get(g.id) and curve is not None and curve.saving_per_unit(g.size) > 0:
                return True
        return False

    def ranked(self, graph, scores: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Scores per millisecond saved (module docstring); unchanged without a target.
        A group whose cut saves no measured time ranks after every other."""
        if self.target_ms is None or self.table is None:
            return dict(scores)
        out = {}
        for g in graph.groups:
            curve = self.table.groups.get(g.key)
            saving = self.table.unit_saving(curve, g.size) if curve else 0.0
            out[g.id] = np.asarray(scores[g.id], dtype=np.float64) / max(saving, 1e-9)
        return out

    def to_dict(self, predicted_ms: float | None) -> dict:
        """What the report says about widths and latency target."""
        t = self.table
        steps: dict[str, int] = {}
        if t is not None:
            for c in t.groups.values():
                k = str(c.multiple * c.channels_per_unit)
                steps[k] = steps.get(k, 0) + 1
        return {
            "round_to": "auto" if self.round_to is None else self.round_to,
            "widths": (f"multiples of {self.round_to}" if self.round_to is not None
                       else "stairs of the latency table" if t is not None
                       else f"multiples of {self.fallback} channels (the runtime's known "
                            "block; no table measured)"),
            "source": self.source,
            "known_multiple": self.fallback,
            "target_latency": self.target_text,
            "target_ms": None if self.target_ms is None else round(self.target_ms, 6),
            "table": None if t is None else {
                "target": t.target.describe(),
                "target_key": t.target.key,
                "groups": len(t.groups),
                "steps_in_channels": dict(sorted(steps.items(), key=lambda kv: int(kv[0]))),
                "seconds": round(t.seconds, 2),
                "scale": round(t.scale, 4),
                "ms_per_mb": round(t.ms_per_mb, 5),
                "probes": t.probes,
                "original_ms": t.model_ms,
                "path": None,
            },
            "predicted_ms": None if predicted_ms is None else round(predicted_ms, 6),
            "landing": self.landing,
        }


def _check_table(table: LatencyTable, model, target, say) -> None:
    """A table of another model or target is used as given, with a warning."""
    if table.model_signature and table.model_signature != model_signature(model):
        say("warning: the latency table was measured on another model; groups are matched "
            "by their producers and consumers, unmatched ones keep the known multiple")
    if table.target.key != target.key:
        say(f"warning: the latency table's target ({table.target.describe()}) is not this "
            f"run's ({target.describe()}); planning with it as given")
    if not table.groups:
        raise UsageError("the latency table holds no group; measure one with this model")
