"""The two-stage IDAP++ pipeline (METHOD.md sections 4 and 5) under an accuracy budget.

Stage 1, iteration t = 0..T-1: re-measure the flow statistics on the calibration part,
score every unit (``idap`` by default), and remove the fraction

    p_t = p0 * (1 + t / T) ** alpha

of the remaining prunable units, lowest score first, ranked globally (``planner``), with the
removed inputs' means folded into the consumers' biases (mean compensation). The candidate is
evaluated on the validation part against the original model; a step that breaks the budget is
undone and retried with half the fraction; after ``retries`` failures stage 1 ends. It stops
early once the FLOPs/params/latency target is met (the last step is shrunk to land on the
target). With a target still unmet after the T steps, it goes on along the same formula
(t = T..4T-1, each step a little larger) until the target, the budget or the units run out:
the schedule sets the pace, the target where to stop (METHOD.md's T alone left MiniLM at 58 %
of its MACs under a 50 % target with the budget untouched; 2T, at 35.8 % under a 30 % target,
which it meets at t = 20).

Stage 2: blocks (residual branches, chains) ranked by layer divergence ``D_l`` ascending are
removed one at a time; a removal that breaks the budget is restored and the block marked
essential.

Landing (``--target-latency`` with a table this run measured, ``_land``): the result is
timed against the original; more than 5 % off the target, the table learns the measured
point and stages 1 and 2 run again from the original, at most twice; the pass measured
nearest the target is returned (``latency_target`` module docstring).

The model returned is always the last one inside the budget. Calibration data never serves
for the budget and validation data never for the scores.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from idap_onnx.accounting import model_cost
from idap_onnx.blocks import find_blocks
from idap_onnx.calib.scores import block_divergence, unit_scores
from idap_onnx.calib.stats import collect, plan_probes
from idap_onnx.dependency import DependencyGraph, analyze_model
from idap_onnx.deploy.latency import BACKENDS
from idap_onnx.errors import UsageError
from idap_onnx.group_costs import predict_macs
from idap_onnx.latency_target import LatencyPlan
from idap_onnx.metrics import Evaluator
from idap_onnx.model_io import normalized
from idap_onnx.passes.prune_channels import prune_channels
from idap_onnx.passes.remove_blocks import remove_blocks
from idap_onnx.planner import PlanConfig, plan_removal
from idap_onnx.shapes import shapes_as_input

Batch = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class OptimizeConfig:
    """Every setting of ``optimize`` (the CLI flags and ``--config`` mirror these fields).

    ``target_flops``/``target_params``: a fraction of the original kept (<= 1) or an
    absolute count (> 1). Budget: ``max_drop`` metric points (with labels; top-1 in percentage
    points) or ``max_error`` (relative output error / metric for ``rel-l2``).
    """

    target_flops: float | None = None
    target_params: float | None = None
    max_drop: float | None = None
    max_error: float | None = None
    metric: str = "auto"
    score: str = "idap"
    mean_compensation: bool = True
    coherence: bool = True  # idap's kappa_k (calib.scores); False: the additive score
    refit: bool = True
    p0: float = 0.05
    alpha: float = 1.5
    steps: int = 10
    round_to: int | str = "auto"  # "auto": a latency table's stairs, else the known multiple
    max_group_ratio: float = 0.9
    ignore: tuple[str, ...] = ()
    retries: int = 3
    stages: tuple[int, ...] = (1, 2)
    max_blocks: int | None = None
    batch_size: int = 8
    seed: int = 0
    device: str = "auto"
    finetune: bool = False
    finetune_epochs: int = 1
    latency: str = "onnxruntime"
    latency_batch: int = 1
    latency_fp16: bool = False
    precision: str = "fp32"  # the exported model's; the budget is judged on it (optimize_api)
    target_latency: str | None = None  # "0.5" (of the original's) or "12ms": needs a table
    latency_table: str | None = None  # a saved table (``deploy.latency_table``) to plan with

    def check(self) -> None:
        if self.max_drop is not None and self.max_error is not None:
            raise UsageError("give either max_drop (with labels) or max_error, not both")
        for name in ("target_flops", "target_params"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UsageError(f"{name} {value} must be > 0 (a kept fraction or a count)")
        if not 0 < self.p0 < 1 or self.steps < 1 or self.retries < 0:
            raise UsageError("p0 must be in (0, 1), steps >= 1 and retries >= 0")
        if self.finetune_epochs < 1:
            raise UsageError(f"finetune_epochs {self.finetune_epochs} must be >= 1")
        if not set(self.stages) <= {1, 2} or not self.stages:
            raise UsageError(f"stages {self.stages}: choose from 1 and 2, e.g. 1,2")
        if self.latency not in ("off", *BACKENDS):
            raise UsageError(
                f"latency '{self.latency}': choose off or one of {', '.join(BACKENDS)}"
            )
        if self.latency_batch < 1:
            raise UsageError(f"latency_batch {self.latency_batch} must be >= 1")
        if self.precision not in ("fp32", "fp16", "int8"):
            raise UsageError(f"precision '{self.precision}': choose fp32, fp16 or int8")
        if self.round_to != "auto" and (not isinstance(self.round_to, int) or self.round_to < 1):
            raise UsageError(f"round_to {self.round_to!r}: give auto or a channel count >= 1")
        if self.target_latency is not None:
            from idap_onnx.deploy.latency_table import parse_target_latency

            parse_target_latency(self.target_latency)
            if self.latency == "off" and self.latency_table is None:
                raise UsageError("target_latency needs a latency backend to measure a table "
                                 "(latency onnxruntime) or a saved table (latency_table)")


@dataclass
class Step:
    """One evaluated candidate (a stage-1 iteration try, or a stage-2 block)."""

    stage: int
    iteration: int
    attempt: int
    fraction: float
    units_removed: int
    blocks: list[str]
    params: int
    macs: int
    metric: float
    error: float
    drop: float
    accepted: bool
    seconds: float
    refit_seconds: float = 0.0  # of ``seconds``: the least-squares refit
    refitted: int = 0  # consumers the refit rewrote


@dataclass
class OptimizeResult:
    """The optimized model and everything the report says about how it was found."""

    model: onnx.ModelProto
    config: OptimizeConfig
    metric_name: str
    provider: str
    original: dict
    final: dict
    steps: list[Step] = field(default_factory=list)
    removed_blocks: list[str] = field(default_factory=list)
    essential_blocks: list[str] = field(default_factory=list)
    block_divergence: dict[str, float] = field(default_factory=dict)
    kept: dict[str, dict] = field(default_factory=dict)
    seconds: float = 0.0
    latency: dict | None = None  # ``latency.LatencyReport.to_dict()``, set by run_optimize
    # With ``config.precision`` other than fp32: every accepted model in order (``record``),
    # and the export of the result (``export`` for the report, ``exported`` the model), set
    # by run_optimize.
    accepted: list[onnx.ModelProto] = field(default_factory=list)
    export: dict | None = None
    exported: onnx.ModelProto | None = None
    # Widths and latency target (``latency_target.LatencyPlan.to_dict``), the table's
    # predicted latency of the current model, and the table itself (saved beside the report).
    latency_plan: dict | None = None
    predicted_ms: float | None = None
    table: object | None = None
    # Why stage 1 stopped, in words, and whether the MACs/params/latency targets were met
    # (None without a target); ``target_note``: what to change when they were not.
    stop: str = ""
    targets_met: bool | None = None
    target_note: str = ""

    def record(self, model: onnx.ModelProto) -> None:
        """Remember an accepted model, for stepping back when its export breaks the budget."""
        if self.config.precision != "fp32":
            self.accepted.append(model)

    def to_dict(self) -> dict:
        config = asdict(self.config)
        config["ignore"] = list(config["ignore"])
        config["stages"] = list(config["stages"])
        return {
            "schema_version": 1,
            "command": "optimize",
            "settings": config,
            "metric": self.metric_name,
            "provider": self.provider,
            "original": self.original,
            "final": self.final,
            "steps": [asdict(s) for s in self.steps],
            "removed_blocks": self.removed_blocks,
            "essential_blocks": self.essential_blocks,
            "block_divergence": self.block_divergence,
            "kept": self.kept,
            "stop": self.stop,
            "targets_met": self.targets_met,
            "target_note": self.target_note,
            "seconds": round(self.seconds, 3),
            "latency": self.latency,
            "export": self.export,
            "latency_plan": self.latency_plan,
        }


def _budget(config: OptimizeConfig, evaluator: Evaluator) -> tuple[str, float]:
    """('drop', points) or ('error', relative error): what the budget bounds."""
    if config.max_drop is not None:
        return "drop", config.max_drop
    if config.max_error is not None:
        return "error", config.max_error
    return ("drop", 1.0) if evaluator.labels is not None else ("error", 0.05)


def _target_macs(config: OptimizeConfig, macs: int, params: int) -> tuple[int | None, int | None]:
    def resolve(value, total):
        if value is None:
            return None
        return int(value * total) if value <= 1 else int(value)

    return resolve(config.target_flops, macs), resolve(config.target_params, params)


def _met(cost, targets, predicted_ms: float | None = None) -> bool:
    """Whether a target stops the run: the latency target (predicted), or the MACs and
    params targets together; whichever is met first."""
    target_macs, target_params, target_ms = targets
    if target_ms is not None and predicted_ms is not None and predicted_ms <= target_ms:
        return True
    if target_macs is None and target_params is None:
        return False
    return (target_macs is None or cost.macs <= target_macs) and (
        target_params is None or cost.params <= target_params
    )


def optimize(
    model: onnx.ModelProto,
    calib_batches: Sequence[Batch],
    evaluator: Evaluator,
    config: OptimizeConfig | None = None,
    *,
    input_shapes: Mapping[str, list[int]] | None = None,
    progress: Callable[[str], None] | None = None,
) -> OptimizeResult:
    """Run the stages of ``config`` on ``model`` (not modified); see the module docstring.

    Args:
        model: the original model.
        calib_batches: the calibration part (scores and statistics only).
        evaluator: judges candidates on the validation part against the original.
        config: targets, budget, schedule.
        input_shapes: concrete input shapes for the analysis (default: from the batches).
        progress: called with one line per evaluated step.
    """
    config = config or OptimizeConfig()
    config.check()
    model = normalized(model)  # as load_model leaves a file (an onnx.load proto is not)
    start = time.perf_counter()
    say = progress or (lambda _line: None)
    shapes = dict(input_shapes or {k: list(v.shape) for k, v in calib_batches[0].items()})
    shapes = {k: [1, *v[1:]] for k, v in shapes.items()}  # costs are per sample (batch 1)
    cost0 = model_cost(model, shapes)
    target_macs, target_params = _target_macs(config, cost0.macs, cost0.params)
    kind, limit = _budget(config, evaluator)
    lat = LatencyPlan.prepare(model, calib_batches, config, say)
    targets = (target_macs, target_params, lat.target_ms)
    base = evaluator.evaluate(model)
    result = OptimizeResult(
        model=model,
        config=config,
        metric_name=evaluator.metric_name,
        provider="CPUExecutionProvider",
        original={"params": cost0.params, "macs": cost0.macs, "metric": base.metric},
        final={},
    )
    result.table = lat.table
    train, cut = _training_samples(calib_batches, model) if config.finetune or config.refit else (
        None, False)
    refit_calib = _refit_batches(calib_batches, train, cut) if config.refit else calib_batches
    train = train if config.finetune else None

    def stages(result: OptimizeResult) -> tuple[onnx.ModelProto, object]:
        current, cost = model, cost0
        if 1 in config.stages:
            current, cost = _stage1(
                current, cost, calib_batches, evaluator, config, shapes, (kind, limit),
                targets, result, say, teacher=model, train=train, refit_calib=refit_calib,
                lat=lat,
            )
        if 2 in config.stages and not _met(cost, targets, result.predicted_ms):
            current, cost = _stage2(
                current, cost, calib_batches, evaluator, config, shapes, (kind, limit),
                targets, result, say,
            )
        return current, cost

    current, cost = stages(result)
    if lat.refines:
        current, cost, result = _land(model, current, cost, result, stages, lat, calib_batches,
                                      shapes, config.device, say)
    final = evaluator.evaluate(current)
    if config.finetune and current is not model:
        tuned = _finetuned(current, model, train, config, config.finetune_epochs, say)
        ev = evaluator.evaluate(tuned)
        ok = _within(ev, evaluator, (kind, limit))[0]
        if tuned is not current and ok and evaluator.drop(ev) <= evaluator.drop(final):
            current, final = tuned, ev
        else:
            say("final fine-tuning did not help; keeping the model before it")
    result.model = shapes_as_input(current, model)  # the runtime fuses as for the original
    result.final = {
        "params": cost.params,
        "macs": cost.macs,
        "metric": final.metric,
        "error": final.rel_error,
        "drop": evaluator.drop(final),
    }
    result.kept = _kept_counts(model, current)
    result.latency_plan = lat.to_dict(result.predicted_ms)
    _judge_targets(result, cost, cost0, targets, config)
    result.seconds = time.perf_counter() - start
    return result


LANDING_PASSES = 2  # with --target-latency and a table measured in this run: replans at most
LANDING_TOLERANCE = 0.05  # a measured result this close to the target (relative) is kept


def _land(model, current, cost, result, stages, lat: LatencyPlan, calib, shapes, device, say):
    """``--target-latency`` with a table this run measured: time the result against the
    original; more than ``LANDING_TOLERANCE`` off the target, the table learns the result
    (``LatencyTable.add_result``) and ``stages`` plan again from the original, at most
    ``LANDING_PASSES`` times. Returns the pass measured nearest the target as (model, cost,
    result), the table cut back to the probes that planned it (``keep_probes``), so the
    saved table replays it."""
    passes = []  # (|off|, pass, model, cost, result, probes that planned it)
    for attempt in range(LANDING_PASSES + 1):
        if result.removed_blocks:  # the table holds channel widths, not blocks
            break
        t_orig, t_cur = lat.measure_against(model, shapes_as_input(current, model), calib,
                                            device)
        off = (t_cur / t_orig) / (lat.target_ms / lat.table.model_ms) - 1
        lat.landing.append({"pass": attempt + 1, "original_ms": t_orig, "result_ms": t_cur,
                            "fraction": round(t_cur / t_orig, 4), "off": round(off, 4)})
        passes.append((abs(off), attempt, current, cost, result, len(lat.table.probes)))
        say(f"landing: the result measured {t_cur:.3f} ms against the original's {t_orig:.3f} "
            f"({t_cur / t_orig:.3f} of it; {off:+.1%} off the target)")
        if abs(off) <= LANDING_TOLERANCE or attempt == LANDING_PASSES:
            break
        widths = lat.table.widths_of(analyze_model(current, shapes))
        lat.table.add_result(f"result {attempt + 1}", widths, t_orig, t_cur)
        say(f"landing: the table learns the measured result (k {lat.table.scale:.3f}, b "
            f"{lat.table.ms_per_mb:.4f} ms/MB) and stage 1 plans again from the original")
        result = _fresh(result)
        current, cost = stages(result)
    if not passes:
        return current, cost, result
    _, kept, current, cost, result, probes = min(passes, key=lambda p: (p[0], p[1]))
    lat.table.keep_probes(probes)
    lat.landing[kept]["kept"] = True
    if kept + 1 < len(passes):
        say(f"landing: keeping pass {kept + 1}, the one measured nearest the target")
    return current, cost, result


def _fresh(result: OptimizeResult) -> OptimizeResult:
    """An empty result of the same run (a new landing pass starts from the original)."""
    return OptimizeResult(model=result.model, config=result.config,
                          metric_name=result.metric_name, provider=result.provider,
                          original=result.original, final={}, table=result.table)


def _judge_targets(result: OptimizeResult, cost, cost0, targets, config: OptimizeConfig) -> None:
    """Set ``targets_met`` and, when a target was missed, ``target_note``: what was reached,
    why stage 1 stopped and which setting to change."""
    target_macs, target_params, target_ms = targets
    if target_macs is None and target_params is None and target_ms is None:
        return
    result.targets_met = _met(cost, targets, result.predicted_ms)
    if result.targets_met:
        return
    got = []
    if target_macs is not None:
        got.append(f"MACs {cost.macs / max(cost0.macs, 1):.1%} of the original "
                   f"(target {target_macs / max(cost0.macs, 1):.1%})")
    if target_params is not None:
        got.append(f"params {cost.params / max(cost0.params, 1):.1%} "
                   f"(target {target_params / max(cost0.params, 1):.1%})")
    if target_ms is not None and result.predicted_ms is not None:
        got.append(f"predicted {result.predicted_ms:.3f} ms (target {target_ms:.3f} ms)")
    hint = {
        "steps": f"raise --p0 ({config.p0:g}) or --steps ({config.steps}) to remove more "
                 "per run",
        "budget": "the accuracy budget binds: loosen --max-drop/--max-error, or recover "
                  "more (--finetune)",
        "nothing left": "no prunable unit is left: `idap-onnx inspect` lists the frozen "
                        "groups and why",
    }.get(result.stop.split(":")[0], "")
    result.target_note = (f"target not met: {', '.join(got)}; stage 1 stopped on "
                          f"{result.stop or 'no stage 1'}" + (f"; {hint}" if hint else ""))


def _within(evaluation, evaluator: Evaluator, budget: tuple[str, float]) -> tuple[bool, float]:
    kind, limit = budget
    drop = evaluator.drop(evaluation)
    value = drop if kind == "drop" else evaluation.rel_error
    return value <= limit + 1e-12, drop


def _training_samples(calib, teacher) -> tuple[list[dict], bool]:
    """The calibration part as single samples, text padding cut where ``teacher`` is shown
    to ignore it (``padding.trim_padding``), and whether it was cut; made once per run."""
    from idap_onnx.padding import trim_padding

    samples = [
        {k: v[i] for k, v in batch.items()}
        for batch in calib
        for i in range(len(next(iter(batch.values()))))
    ]
    samples, note = trim_padding(samples, teacher)
    return samples, note.startswith("padding cut")


def _refit_batches(calib, samples: list[dict], cut: bool) -> list[dict]:
    """What the refit reads: the calibration part, or where its text padding was cut
    (``_training_samples``) the cut samples, those of one length stacked together: rows at
    padded positions are never fitted, and the runs skip their work."""
    from idap_onnx.calib.refit import MERGE_SAMPLES
    from idap_onnx.padding import stacked

    return stacked(samples, MERGE_SAMPLES) if cut else list(calib)


def _finetuned(candidate, teacher, samples, config, epochs, say):
    """``candidate`` after ``epochs`` of distillation from ``teacher`` on ``samples`` (the
    calibration part, ``_training_samples``; METHOD.md section 6); unchanged when fine-tuning
    is off or the graph cannot run in torch."""
    if not config.finetune or teacher is None:
        return candidate
    from idap_onnx.errors import UnsupportedModelError
    from idap_onnx.finetune import FinetuneConfig, finetune

    cfg = FinetuneConfig(epochs=epochs, seed=config.seed, patience=epochs)
    try:
        out = finetune(candidate, teacher, samples, config=cfg)
    except UnsupportedModelError as exc:
        say(f"fine-tuning skipped: {exc}")
        return candidate
    say(f"fine-tuned {epochs} epoch(s) in {out.seconds:.1f} s")
    return out.model


def _stage1(
    current, cost, calib, evaluator, config, shapes, budget, targets, result, say, teacher=None,
    train=None, refit_calib=None, lat=None,
):
    from idap_onnx.calib.refit import TargetCache

    cache = TargetCache() if config.refit else None  # each refit's result's targets, for the next
    steps = config.steps
    # a target unmet after the T steps: up to 3T more along the same formula (module docstring)
    limit = 4 * steps if any(x is not None for x in targets) else steps
    graph0 = analyze_model(current, shapes)
    widths0 = {g.key: g.size for g in graph0.groups}  # what max_group_ratio counts from
    if lat.table is not None:  # then kept current by each accepted step's removal
        result.predicted_ms = lat.predict(graph0)
    for t in range(limit):
        if _met(cost, targets, result.predicted_ms):
            result.stop = "target met"
            break
        graph = graph0 if t == 0 else analyze_model(current, shapes)  # t > 0: a step went
        stats = collect(
            current, plan_probes(graph, scores=(config.score,)), calib, device=config.device
        )
        result.provider = stats.provider
        scores = unit_scores(
            graph, stats, config.score, mean_compensation=config.mean_compensation,
            seed=config.seed, coherence=config.coherence,
        )
        scores = lat.ranked(graph, scores)
        fraction = config.p0 * (1 + t / steps) ** config.alpha
        accepted, timed = False, False
        for attempt in range(config.retries + 1):
            t0 = time.perf_counter()
            removal = _plan(graph, scores, config, fraction, cost, targets, lat, widths0)
            if not removal:
                say(f"stage 1 step {t}: nothing left to remove")
                result.stop = "nothing left: no prunable unit within the constraints"
                return current, cost
            candidate, refit_info = _prune(current, graph, removal, stats, config, shapes,
                                           refit_calib or calib, cache)
            candidate = _finetuned(candidate, teacher, train, config, 1, say)
            new_cost = model_cost(candidate, shapes)
            ev = evaluator.evaluate(candidate)
            ok, drop = _within(ev, evaluator, budget)
            units = sum(len(v) for v in removal.values())
            result.steps.append(
                Step(
                    1,
                    t,
                    attempt,
                    fraction,
                    units,
                    [],
                    new_cost.params,
                    new_cost.macs,
                    ev.metric,
                    ev.rel_error,
                    drop,
                    ok,
                    time.perf_counter() - t0,
                    *refit_info,
                )
            )
            refitted = f", {refit_info[1]} refitted" if config.refit else ""
            say(
                f"stage 1 step {t}.{attempt}: -{units} units{refitted}, MACs {new_cost.macs:,}, "
                f"{evaluator.metric_name} {ev.metric:.4f}, error {ev.rel_error:.4f} "
                f"-> {'accepted' if ok else 'undone'}"
            )
            if ok:
                current, cost, accepted = candidate, new_cost, True
                result.record(candidate)
                if lat.table is not None:
                    result.predicted_ms = lat.predict(graph, removal)
                    timed = lat.covers(graph, removal)
                break
            fraction /= 2
        if not accepted:
            say("stage 1: budget reached (retries exhausted)")
            result.stop = f"budget: step {t} broke it {config.retries + 1} times"
            break
        if targets[2] is not None and not timed:
            say("stage 1: what is left to prune has no measured saving in the latency table; "
                f"stopping at {result.predicted_ms:.3f} ms predicted (target {targets[2]:.3f} ms)")
            result.stop = "no measured saving: the table saw no time saved in what is left"
            break
    else:
        result.stop = ("target met" if _met(cost, targets, result.predicted_ms)
                       else f"steps: all {steps} steps ran" if limit == steps
                       else f"steps: all {limit} steps ran ({steps} of the schedule and "
                            f"{limit - steps} more toward the target)")
    return current, cost


def _plan(
    graph: DependencyGraph, scores, config: OptimizeConfig, fraction: float, cost, targets,
    lat: LatencyPlan, widths0: Mapping[str, int],
) -> dict[str, list[int]]:
    """The removal for ``fraction``, widths on ``lat``'s stairs, ``max_group_ratio`` of each
    group's original width (``widths0``, by ``ChannelGroup.key``) at most gone over all steps;
    shrunk by bisection so it does not overshoot the MACs or latency target by more than
    needed."""
    multiples = lat.multiples(graph)
    original = {g.id: widths0.get(g.key, g.size) for g in graph.groups}

    def removal_for(f: float):
        return plan_removal(
            graph,
            scores,
            PlanConfig(
                ratio=min(f, 0.95),
                round_to=lat.round_to or 1,
                max_group_ratio=config.max_group_ratio,
                ignore=config.ignore,
                multiples=multiples,
                original=original,
            ),
        )

    target_macs, _, target_ms = targets

    def overshoots(removal) -> bool:
        return (target_macs is not None and predict_macs(graph, cost, removal) < target_macs) or (
            target_ms is not None and lat.predict(graph, removal) < target_ms)

    removal = removal_for(fraction)
    if not removal or not overshoots(removal):
        return removal
    lo, hi = 0.0, fraction
    for _ in range(12):
        mid = (lo + hi) / 2
        if overshoots(removal_for(mid)):
            hi = mid
        else:
            lo = mid
    return removal_for(hi) or removal


def _prune(current, graph, removal, stats, config, shapes, calib, cache=None):
    """The candidate of one stage-1 try, and ``(refit seconds, consumers refitted)``;
    ``calib`` is what the refit reads (``_refit_batches``), ``cache`` its ``TargetCache``."""
    if config.mean_compensation:
        from idap_onnx.passes.compensate import prune_with_compensation

        means = {t: stats.mean(t) for t in stats.channel_sum}
        candidate = prune_with_compensation(current, removal, means, input_shapes=shapes)
    else:
        candidate = prune_channels(current, removal, graph=graph)
    if not config.refit:
        return candidate, (0.0, 0)
    from idap_onnx.calib.refit import refit

    t0, details = time.perf_counter(), []
    candidate = refit(current, candidate, calib, seed=config.seed, removal=removal,
                      device=config.device, details=details, cache=cache)
    return candidate, (time.perf_counter() - t0, sum(d.applied for d in details))


def _stage2(current, cost, calib, evaluator, config, shapes, budget, targets, result, say):
    graph = analyze_model(current, shapes)
    blocks = find_blocks(current, graph.index)
    stats = collect(current, plan_probes(graph, blocks, scores=()), calib, device=config.device)
    divergence = block_divergence(stats)
    result.block_divergence = dict(sorted(divergence.items(), key=lambda kv: kv[1]))
    order = list(result.block_divergence)
    limit = config.max_blocks if config.max_blocks is not None else len(order)
    for i, name in enumerate(order):
        if len(result.removed_blocks) >= limit or _met(cost, targets, result.predicted_ms):
            break
        t0 = time.perf_counter()
        try:
            candidate = remove_blocks(current, [name])
        except UsageError:
            continue  # no longer a block of the current model (a removal changed it)
        new_cost = model_cost(candidate, shapes)
        ev = evaluator.evaluate(candidate)
        ok, drop = _within(ev, evaluator, budget)
        result.steps.append(
            Step(
                2,
                i,
                0,
                0.0,
                0,
                [name],
                new_cost.params,
                new_cost.macs,
                ev.metric,
                ev.rel_error,
                drop,
                ok,
                time.perf_counter() - t0,
            )
        )
        say(
            f"stage 2 block {name} (D_l {divergence[name]:.4f}): "
            f"{evaluator.metric_name} {ev.metric:.4f} -> {'removed' if ok else 'essential'}"
        )
        if ok:
            if result.predicted_ms is not None and cost.macs:  # blocks: in proportion to MACs
                result.predicted_ms *= new_cost.macs / cost.macs
            current, cost = candidate, new_cost
            result.removed_blocks.append(name)
            result.record(candidate)
        else:
            result.essential_blocks.append(name)
    return current, cost


def _kept_counts(original, final) -> dict[str, dict]:
    """Per weighted node: output channels before and after (the 'kept fraction per layer')."""

    def widths(model):
        inits = {t.name: t for t in model.graph.initializer}
        out = {}
        for node in model.graph.node:
            if node.op_type in ("Conv", "Gemm", "MatMul", "ConvTranspose") and len(node.input) > 1:
                w = inits.get(node.input[1])
                if w is None or len(w.dims) < 2:
                    continue
                trans_b = any(a.name == "transB" and a.i for a in node.attribute)
                dim = {"Conv": 0, "ConvTranspose": 1}.get(node.op_type, 0 if trans_b else 1)
                out[node.name] = int(w.dims[dim])
        return out

    before, after = widths(original), widths(final)
    return {n: {"before": b, "after": after.get(n, 0)} for n, b in before.items()}
