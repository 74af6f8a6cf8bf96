"""``score``: IDAP++ unit and block scores of a model on the user's calibration data.

The Python function behind ``idap-onnx score``. It composes the calibration pieces without
editing any graph:

1. ``model_io.load_offloaded`` reads the model without its large weights, which stay on disk
   for the whole pass (read back when a score needs one), so ONNX Runtime's session holds
   the only copy in memory;
2. ``calib.data.load_data`` reads and checks the data, ``split`` keeps only the calibration
   part (the validation part is never run), ``require`` asks for at least one full batch;
3. ``dependency.analyze_model`` at the calibration samples' own shapes (batch 1), so the
   per-sample output positions the scores use are the ones the data has;
4. ``calib.stats.collect`` runs the model once over the calibration batches with in-graph
   reductions (ONNX Runtime, the provider that actually ran is reported);
5. ``calib.scores.unit_scores`` (stage 1, METHOD.md Sec. 2: ``D_f`` per unit, or a baseline
   score) and ``block_divergence`` (stage 2, Sec. 3: ``D_l = E||y - x|| / E||y||``).

Lower scores mean less information lost by removal: the lowest-scored units and the blocks with
the lowest ``D_l`` go first. The report's ``to_dict()`` is the JSON ``idap-onnx score --json``
writes (``docs/CLI.md``, :data:`idap_onnx.api.SCHEMA_VERSION`).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import sys
import time
from collections.abc import Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from idap_onnx.api import SCHEMA_VERSION, InputShapes, ModelInfo, ModelLike, _load, _model_info
from idap_onnx.blocks import find_blocks
from idap_onnx.calib.data import (
    Dataset,
    ImageSpec,
    batches,
    load_data,
    model_inputs,
    require,
    split,
)
from idap_onnx.calib.scores import UNIT_SCORES, block_divergence, unit_scores
from idap_onnx.calib.stats import collect, plan_probes, providers
from idap_onnx.dependency import DependencyGraph, analyze_model
from idap_onnx.errors import UsageError
from idap_onnx.model_io import load_offloaded, offloaded

__all__ = ["DEVICES", "BlockScore", "GroupScores", "ScoreReport", "Timing", "UnitRank", "score"]

#: ``device`` values: ``auto`` takes CUDA when ONNX Runtime has it, else the CPU.
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class GroupScores:
    """One channel group's score per unit; frozen groups and fixed units are never removed."""

    id: str
    frozen: bool
    scores: tuple[float, ...]
    fixed_units: tuple[int, ...]
    producers: tuple[str, ...]
    unit_producers: tuple[tuple[str, int], ...]  # per unit: (first producer node, its channel)

    def to_dict(self) -> dict:
        return {
            "id": self.id, "frozen": self.frozen, "units": len(self.scores),
            "fixed_units": list(self.fixed_units), "producers": list(self.producers),
            "scores": [_finite(s) for s in self.scores],
        }


@dataclass(frozen=True)
class UnitRank:
    """One removable unit in the global ranking."""

    group: str
    unit: int
    score: float
    producer: str  # the node creating the unit's channel (the first, in a coupled group)
    channel: int  # the channel index in that node's output
    more_producers: int  # other nodes whose channel is removed with it

    def to_dict(self) -> dict:
        return {"group": self.group, "unit": self.unit, "score": _finite(self.score),
                "producer": self.producer, "channel": self.channel,
                "more_producers": self.more_producers}


@dataclass(frozen=True)
class BlockScore:
    """A removable block and its layer divergence ``D_l``."""

    name: str
    kind: str
    input: str
    output: str
    nodes: int
    divergence: float

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "input": self.input,
                "output": self.output, "nodes": self.nodes, "d_l": _finite(self.divergence)}


@dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of each step (``load`` = model and data, ``calibrate`` = the
    ONNX Runtime pass including session creation)."""

    load_s: float
    analyze_s: float
    calibrate_s: float
    score_s: float
    samples: int

    @property
    def total_s(self) -> float:
        return self.load_s + self.analyze_s + self.calibrate_s + self.score_s

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.calibrate_s if self.calibrate_s > 0 else 0.0

    def to_dict(self) -> dict:
        return {"load_s": self.load_s, "analyze_s": self.analyze_s,
                "calibrate_s": self.calibrate_s, "score_s": self.score_s,
                "total_s": self.total_s, "samples_per_s": self.samples_per_s}


@dataclass(frozen=True)
class ScoreReport:
    """What ``score`` measured. ``groups`` in analysis order, ``blocks`` by ``D_l`` ascending."""

    model: ModelInfo
    input_shapes: tuple[tuple[str, tuple[int, ...]], ...]
    data: str
    synthetic_data: bool
    samples: int
    validation_samples: int
    batch_size: int
    val_fraction: float
    seed: int
    score: str
    mean_compensation: bool
    device: str
    provider: str
    groups: tuple[GroupScores, ...]
    blocks: tuple[BlockScore, ...]
    timing: Timing

    def ranking(self) -> list[UnitRank]:
        """Every removable unit (non-frozen group, not fixed), lowest score first; ties keep
        group and unit order."""
        ranks = []
        for g in self.groups:
            if g.frozen:
                continue
            fixed = set(g.fixed_units)
            extra = max(len(g.producers) - 1, 0)
            for u, s in enumerate(g.scores):
                if u not in fixed:
                    node, chan = g.unit_producers[u]
                    ranks.append(UnitRank(g.id, u, s, node, chan, extra))
        order = sorted(range(len(ranks)), key=lambda i: (_sort_key(ranks[i].score), i))
        return [ranks[i] for i in order]

    def to_dict(self, top: int = 10) -> dict:
        ranking = self.ranking()
        least, most = _ends(ranking, top)
        return {
            "schema_version": SCHEMA_VERSION,
            "command": "score",
            "model": self.model.to_dict(),
            "input_shapes": {n: list(s) for n, s in self.input_shapes},
            "data": {"source": self.data, "synthetic": self.synthetic_data,
                     "samples": self.samples, "validation_samples": self.validation_samples,
                     "batch_size": self.batch_size, "val_fraction": self.val_fraction,
                     "seed": self.seed},
            "score": self.score,
            "mean_compensation": self.mean_compensation,
            "device": self.device,
            "provider": self.provider,
            "samples": self.samples,
            "removable_units": len(ranking),
            "least_important": [r.to_dict() for r in least],
            "most_important": [r.to_dict() for r in most],
            "groups": [g.to_dict() for g in self.groups],
            "blocks": [b.to_dict() for b in self.blocks],
            "timing": self.timing.to_dict(),
        }


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _sort_key(x: float) -> float:
    return x if math.isfinite(x) else math.inf


def _ends(ranking: list[UnitRank], k: int) -> tuple[list[UnitRank], list[UnitRank]]:
    """The ``k`` lowest-scored units (lowest first) and the ``k`` highest (highest first)."""
    k = max(int(k), 0)
    return ranking[:k], (ranking[::-1][:k] if k else [])


def score(
    model_or_path: ModelLike,
    calib: str | os.PathLike | Iterable[Mapping[str, np.ndarray]],
    *,
    score: str = "idap",
    mean_compensation: bool = True,
    val_fraction: float = 0.0,
    batch_size: int = 8,
    device: str = "auto",
    input_shapes: InputShapes = None,
    image: ImageSpec | None = None,
    tokenizer: str | os.PathLike | None = None,
    seq_len: int = 128,
    num_random: int = 64,
    seed: int = 0,
    progress: bool = False,
) -> ScoreReport:
    """Score every channel unit and every removable block of a model on calibration data.

    Args:
        model_or_path: An ``.onnx`` path or a loaded model (not modified).
        calib: Any source ``calib.data.load_data`` reads (a file, a folder, ``"random"``, an
            iterable of samples, a mapping of arrays).
        score: Unit score, one of ``calib.scores.UNIT_SCORES``; ``idap`` is the flow divergence.
        mean_compensation: ``idap`` counts only each channel's variance (its mean is folded
            into the consumer's bias on removal, METHOD.md Sec. 4).
        val_fraction: Fraction split off as validation data and *not* used here (so the scores
            match a later pruning run with the same split).
        batch_size: Samples per ONNX Runtime run; a model with a static batch dim needs exactly
            that size (a last partial batch is then dropped).
        device: ``auto``, ``cpu`` or ``cuda`` (``cuda`` fails when ONNX Runtime lacks it).
        input_shapes: Analysis shapes of some inputs; by default batch 1 and the shape of the
            first calibration sample. Non-batch dims must equal the samples'.
        image, tokenizer, seq_len, num_random: ``load_data`` options.
        seed: Seed of the split, of ``"random"`` data and of the ``random`` score.
        progress: Show a progress bar with samples/s on stderr while calibrating.

    Raises:
        DataError: The data does not fit the model, cannot be read, or has fewer calibration
            samples than one batch.
        UsageError: A bad option (score, device, batch size, val_fraction, input shapes).
        IdapError: The model cannot be loaded.
    """
    if score not in UNIT_SCORES:
        raise UsageError(f"unknown score '{score}'; choose one of {', '.join(UNIT_SCORES)}")
    if device not in DEVICES:
        raise UsageError(f"unknown device '{device}'; choose one of {', '.join(DEVICES)}")
    if int(batch_size) < 1:
        raise UsageError(f"batch size {batch_size} must be >= 1")
    batch_size = int(batch_size)
    providers(device)  # fails now, not after the analysis, when CUDA is asked for but absent
    started = time.perf_counter()
    # The model's large weights wait on disk for the whole pass (``model_io.load_offloaded``):
    # ONNX Runtime's session holds the only copy in memory.
    with _offloaded(model_or_path) as (model, info):
        data = load_data(calib, model, image=image, tokenizer=tokenizer, seq_len=seq_len,
                         num_random=num_random, seed=seed)
        cal, val = split(data, val_fraction, seed)
        static_batch = _static_batch(model, batch_size)
        require(cal, batch_size, "one batch", fix=f"--batch-size {len(cal)}"
                if not static_batch else None)
        shapes = _analysis_shapes(cal, input_shapes, static_batch or 1)
        loaded = time.perf_counter()

        graph = analyze_model(model, shapes)
        blocks = find_blocks(graph.model, graph.index)
        plan = plan_probes(graph, blocks, scores=(score,))
        analyzed = time.perf_counter()

        usable = len(cal) - len(cal) % batch_size if static_batch else len(cal)
        feeds = _calibration_batches(cal, batch_size, usable, progress)
        try:
            stats = collect(model, plan, feeds, device=device)
        except BaseException:
            with contextlib.suppress(_Failed, StopIteration):
                feeds.throw(_Failed())  # clears the bar before the error line is printed
            raise
        calibrated = time.perf_counter()

        per_unit = unit_scores(graph, stats, score, mean_compensation=mean_compensation,
                               seed=seed)
        groups = _group_scores(graph, per_unit)
        del graph, plan, model
    divergence = block_divergence(stats)
    order = sorted(range(len(blocks)),
                   key=lambda i: (_sort_key(divergence.get(blocks[i].name, math.nan)), i))
    ranked = [blocks[i] for i in order]
    block_scores = tuple(
        BlockScore(b.name, b.kind, b.input, b.output, len(b.nodes),
                   float(divergence.get(b.name, math.nan)))
        for b in ranked
    )
    done = time.perf_counter()
    timing = Timing(loaded - started, analyzed - loaded, calibrated - analyzed, done - calibrated,
                    stats.samples)
    return ScoreReport(
        info, tuple((n, tuple(int(d) for d in s)) for n, s in shapes.items()), cal.description,
        bool(cal.synthetic), stats.samples, len(val), batch_size, float(val_fraction), int(seed),
        score, bool(mean_compensation), device, stats.provider, groups, block_scores, timing,
    )


@contextlib.contextmanager
def _offloaded(model_or_path: ModelLike) -> Iterator[tuple[onnx.ModelProto, ModelInfo]]:
    """The model with its large weights on disk (``model_io.load_offloaded`` for a path,
    ``model_io.offloaded`` of a copy for a proto), and its description."""
    if isinstance(model_or_path, onnx.ModelProto):
        model, info = _load(model_or_path)
        with offloaded(model) as light:
            del model
            yield light, info
        return
    with load_offloaded(model_or_path) as light:
        yield light, _model_info(light, os.fspath(model_or_path))


def _static_batch(model: onnx.ModelProto, batch_size: int) -> int | None:
    """The model's static batch dim (None when symbolic); it must equal ``batch_size``."""
    for spec in model_inputs(model):
        dim = spec.shape[0] if spec.shape else None
        if isinstance(dim, int) and dim > 0:
            if dim != batch_size:
                raise UsageError(
                    f"model input {spec.name!r} has a static batch dim {dim}, so batches must "
                    f"hold exactly {dim} samples; use --batch-size {dim}"
                )
            return dim
    return None


def _analysis_shapes(
    cal: Dataset, given: InputShapes, batch: int
) -> dict[str, list[int]]:
    """Batch ``batch`` and the first calibration sample's dims; ``given`` must agree with them."""
    first = cal[0]
    shapes = {name: [batch, *a.shape] for name, a in first.items()}
    for name, dims in dict(given or {}).items():
        if name not in shapes:
            raise UsageError(
                f"the model has no input '{name}'; its inputs are: "
                + ", ".join(repr(n) for n in shapes)
            )
        dims = [int(d) for d in dims]
        if dims[1:] != shapes[name][1:]:
            sample = "x".join(str(d) for d in shapes[name][1:])
            raise UsageError(
                f"--input-shape {name}:{'x'.join(map(str, dims))} disagrees with the "
                f"calibration samples ({sample} per sample); drop it or give matching data"
            )
        shapes[name] = dims
    return shapes


class _Failed(Exception):
    """Thrown into the batch generator when calibration fails outside it."""


def _calibration_batches(
    cal: Dataset, batch_size: int, samples: int, show: bool
) -> Generator[dict[str, np.ndarray], None, None]:
    """Batches of the first ``samples`` calibration samples; with ``show``, a tqdm bar on
    stderr (samples/s) advances as each batch is consumed and is cleared on an error."""
    bar = None
    if show:
        from tqdm import tqdm

        bar = tqdm(total=samples, unit=" samples", desc="calibrate", file=sys.stderr,
                   dynamic_ncols=True)
    try:
        for feed in itertools.islice(batches(cal, batch_size), math.ceil(samples / batch_size)):
            yield feed
            if bar is not None:
                bar.update(len(next(iter(feed.values()))))
    except GeneratorExit:
        raise
    except BaseException:
        if bar is not None:
            bar.leave = False  # an error line follows: no half-filled bar above it
        raise
    finally:
        if bar is not None:
            bar.close()


def _group_scores(graph: DependencyGraph, per_unit: Mapping[str, np.ndarray]):
    spaces = {s.id: s for s in graph.spaces}
    out = []
    for g in graph.groups:
        values = np.asarray(per_unit.get(g.id, np.full(g.size, np.nan)), dtype=np.float64)
        producers = []
        for unit in g.units:
            space = min(unit)  # the first space of the unit: a stable choice
            producers.append((spaces[space].node, int(np.min(unit[space]))))
        out.append(GroupScores(
            g.id, g.frozen, tuple(float(v) for v in values),
            tuple(u for u, f in enumerate(g.fixed) if f), tuple(g.producers), tuple(producers),
        ))
    return tuple(out)

