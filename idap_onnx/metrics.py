"""How a candidate (pruned) model is judged against the original on validation data.

Plain numpy metrics, plus an :class:`Evaluator` that runs the original once on a fixed list of
validation batches, caches its outputs, and then judges each candidate on the same batches.

Notation: ``y`` is a candidate's output, ``y0`` the original's, ``N`` the number of samples
(batches concatenated along axis 0). Every metric accepts one array or a list of per-batch arrays
(chunks of the samples axis 0, in order) and computes in float64.

* ``top1(logits, labels)   = (1/N) sum_i [argmax_c logits[i, c] == labels[i]]``
* ``agreement(y, y0)       = (1/N) sum_i [argmax_c y[i, c] == argmax_c y0[i, c]]``
* ``rel_l2(y, y0)          = ||y - y0||_2 / ||y0||_2`` over every element of every output
  (all outputs flattened and concatenated; ``||y - y0||`` when ``y0`` is all zeros)
* ``cosine(e, e0)          = (1/N) sum_i <e_i, e0_i> / (||e_i|| ||e0_i||)`` with each sample
  flattened to a vector (a pair of zero vectors counts as 1, one zero vector as 0)

:func:`per_sample` (and :meth:`Evaluator.evaluate_per_sample`) gives the terms of the three
means above one sample at a time, for paired comparisons of two models on the same data.

The arg-max is taken over the last axis, so ``[N, C]`` logits give one prediction per sample and
``[N, T, C]`` token logits one per token (labels then have shape ``[N, T]``).

:meth:`Evaluator.drop` turns an :class:`Evaluation` into the number an accuracy budget bounds:

* ``top1`` / ``agreement`` / ``cosine``: percentage points lost, ``(m0 - m) * 100``
* ``rel-l2``: the candidate's relative error itself (the original's is 0)
* a callable metric: ``m0 - m`` in the callable's own units (``m - m0`` when
  ``higher_is_better=False``, or when the function carries ``higher_is_better = False``)

:func:`load_metric` reads a user metric named ``module:function`` (an importable module, or a
``path/to/file.py``), as ``optimize --metric`` takes it.

A candidate whose metric is not finite, or whose judged output holds NaN/inf where the original's
does not, has an infinite drop.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

__all__ = [
    "METRICS",
    "Evaluation",
    "Evaluator",
    "MetricFn",
    "agreement",
    "cosine",
    "load_metric",
    "looks_like_logits",
    "per_sample",
    "rel_l2",
    "top1",
]

#: Built-in metric names accepted by :class:`Evaluator`.
METRICS = ("top1", "agreement", "rel-l2", "cosine")

#: A user metric: ``(outputs, ref_outputs, labels) -> float``; ``outputs[k]`` is graph output
#: ``k`` of the candidate with the validation batches concatenated along axis 0.
MetricFn = Callable[[list[np.ndarray], list[np.ndarray], np.ndarray | None], float]

ArrayLike = np.ndarray | Sequence[np.ndarray]
ModelLike = str | os.PathLike | onnx.ModelProto | bytes


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------


def _chunks(x: ArrayLike) -> list[np.ndarray]:
    if isinstance(x, np.ndarray):
        return [x]
    return [np.asarray(c) for c in x]


def _concat(x: ArrayLike) -> np.ndarray:
    chunks = _chunks(x)
    if not chunks:
        raise ValueError("no samples")
    return chunks[0] if len(chunks) == 1 else np.concatenate(chunks, axis=0)


def _predictions(logits: ArrayLike) -> np.ndarray:
    arr = _concat(logits)
    if arr.ndim < 2:
        raise ValueError(f"logits need a class axis (shape [N, ..., C]), got shape {arr.shape}")
    return np.argmax(arr, axis=-1).reshape(-1)


def top1(logits: ArrayLike, labels: np.ndarray) -> float:
    """Top-1 accuracy in [0, 1]: ``(1/N) sum_i [argmax_c logits[i, c] == labels[i]]``.

    ``labels`` are integer class ids aligned with the samples (shape ``logits.shape[:-1]``), or
    one-hot / score rows of the same shape as ``logits`` (their arg-max is taken).
    """
    return float(np.mean(_top1_hits(logits, labels)))


def _top1_hits(logits: ArrayLike, labels: np.ndarray) -> np.ndarray:
    pred = _predictions(logits)
    lab = np.asarray(labels)
    if lab.ndim >= 2 and lab.shape == _concat(logits).shape:
        lab = np.argmax(lab, axis=-1)
    lab = lab.reshape(-1)
    if lab.size != pred.size:
        raise ValueError(f"{lab.size} labels for {pred.size} predictions")
    if pred.size == 0:
        raise ValueError("no samples")
    return (pred == lab).astype(np.float64)


def agreement(logits: ArrayLike, ref_logits: ArrayLike) -> float:
    """Top-1 agreement with the original, in [0, 1]: ``(1/N) sum_i [argmax y_i == argmax y0_i]``."""
    return float(np.mean(_agreement_hits(logits, ref_logits)))


def _agreement_hits(logits: ArrayLike, ref_logits: ArrayLike) -> np.ndarray:
    pred, ref = _predictions(logits), _predictions(ref_logits)
    if pred.size != ref.size:
        raise ValueError(f"{pred.size} predictions against {ref.size} reference predictions")
    if pred.size == 0:
        raise ValueError("no samples")
    return (pred == ref).astype(np.float64)


def rel_l2(outputs: ArrayLike, ref_outputs: ArrayLike) -> float:
    """Relative L2 error ``||y - y0|| / ||y0||`` over the whole set (all arrays flattened).

    ``outputs`` and ``ref_outputs`` are one array each or matching lists of arrays (batches or
    graph outputs), compared pairwise and pooled: ``sqrt(sum ||y_k - y0_k||^2 / sum ||y0_k||^2)``.
    When ``y0`` is all zeros the absolute error ``||y - y0||`` is returned.
    """
    ys, y0s = _chunks(outputs), _chunks(ref_outputs)
    if len(ys) != len(y0s):
        raise ValueError(f"{len(ys)} arrays against {len(y0s)} reference arrays")
    num = den = 0.0
    for y, y0 in zip(ys, y0s, strict=True):
        if y.shape != y0.shape:
            raise ValueError(f"shape {y.shape} against reference shape {y0.shape}")
        y64, y064 = y.astype(np.float64, copy=False), y0.astype(np.float64, copy=False)
        num += float(np.sum(np.square(y64 - y064)))
        den += float(np.sum(np.square(y064)))
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)


def cosine(emb: ArrayLike, ref_emb: ArrayLike) -> float:
    """Mean per-sample cosine similarity ``(1/N) sum_i <e_i, e0_i> / (||e_i|| ||e0_i||)``.

    Each sample (row along axis 0) is flattened to a vector. Two zero vectors count as 1 (they
    agree), a zero vector against a non-zero one as 0.
    """
    return float(np.mean(_cosines(emb, ref_emb)))


def _cosines(emb: ArrayLike, ref_emb: ArrayLike) -> np.ndarray:
    es, e0s = _chunks(emb), _chunks(ref_emb)
    if len(es) != len(e0s):
        raise ValueError(f"{len(es)} arrays against {len(e0s)} reference arrays")
    sims = []
    for e, e0 in zip(es, e0s, strict=True):
        if e.shape != e0.shape:
            raise ValueError(f"shape {e.shape} against reference shape {e0.shape}")
        if e.ndim == 0:
            raise ValueError("embeddings need a sample axis")
        a = e.reshape(e.shape[0], -1).astype(np.float64)
        b = e0.reshape(e0.shape[0], -1).astype(np.float64)
        na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
        dot = np.sum(a * b, axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            sim = dot / (na * nb)  # NaN/inf samples stay NaN
        sims.append(
            np.where((na == 0) & (nb == 0), 1.0, np.where((na == 0) ^ (nb == 0), 0.0, sim))
        )
    if not sims or sum(len(x) for x in sims) == 0:
        raise ValueError("no samples")
    return np.concatenate(sims)


def per_sample(
    metric: str, outputs: ArrayLike, ref_outputs: ArrayLike, labels: np.ndarray | None = None
) -> np.ndarray:
    """The built-in ``metric`` sample by sample (token by token for ``[N, T, C]`` logits): the
    values whose mean is ``top1``, ``agreement`` or ``cosine``, for paired comparisons of two
    models on the same data. ``rel-l2`` pools its ratio over all samples, so it has none.

    Raises:
        ValueError: ``rel-l2`` or an unknown metric, ``top1`` without labels, or the errors of
            the metric itself.
    """
    if metric == "top1":
        if labels is None:
            raise ValueError("metric 'top1' needs labels")
        return _top1_hits(outputs, labels)
    if metric == "agreement":
        return _agreement_hits(outputs, ref_outputs)
    if metric == "cosine":
        return _cosines(outputs, ref_outputs)
    raise ValueError(
        f"metric {metric!r} has no per-sample values; choose top1, agreement or cosine"
    )


def looks_like_logits(output: ArrayLike) -> bool:
    """True for a 2-D float ``[N, C]`` output with ``C > 1`` (classification logits)."""
    chunks = _chunks(output)
    return bool(chunks) and all(
        c.ndim == 2 and c.shape[1] > 1 and np.issubdtype(c.dtype, np.floating) for c in chunks
    )


# ----------------------------------------------------------------------------------------------
# Evaluator
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Evaluation:
    """A model judged on the validation batches.

    Attributes:
        metric: The chosen metric's value (see the module docstring).
        rel_error: ``||y - y0|| / ||y0||`` of graph output 0 over all batches.
        agreement: Top-1 agreement with the original on output 0 when it looks like logits
            (2-D ``[N, C]``, ``C > 1``), else ``None``.
    """

    metric: float
    rel_error: float
    agreement: float | None


class Evaluator:
    """Judges candidates against the original model on fixed validation batches.

    The original runs once, at construction (ONNX Runtime, CPU provider), and its outputs are
    cached. :meth:`evaluate` runs a candidate on the same batches in one fresh session. Graph
    output 0 is the one judged (a callable metric receives every output).

    Args:
        model: The ORIGINAL model: a path, an ``onnx.ModelProto`` or serialized bytes.
        batches: Validation batches ``{input_name: array}`` (samples on axis 0); one dict is
            taken as one batch. Keys the model does not take are ignored.
        labels: Ground truth aligned with the concatenated samples (required by ``top1``).
        metric: ``"top1"``, ``"agreement"``, ``"rel-l2"``, ``"cosine"`` or a callable
            ``(outputs, ref_outputs, labels) -> float`` where ``outputs[k]`` is graph output
            ``k`` with the batches concatenated along axis 0.
        higher_is_better: Only for a callable metric (built-ins know their direction); the
            function's own ``higher_is_better`` attribute, where it has one, wins.
        threads: ONNX Runtime intra-op threads (0: its default).

    Raises:
        ValueError: Unknown metric, no batches, ``top1`` without labels, labels that do not match
            the samples, or outputs a metric cannot use.
    """

    def __init__(
        self,
        model: ModelLike,
        batches: Sequence[Mapping[str, np.ndarray]] | Mapping[str, np.ndarray],
        labels: np.ndarray | None = None,
        metric: str | MetricFn = "agreement",
        *,
        higher_is_better: bool = True,
        threads: int = 0,
    ) -> None:
        if isinstance(batches, Mapping):
            batches = [batches]
        self.batches: list[dict[str, np.ndarray]] = [
            {k: np.asarray(v) for k, v in b.items()} for b in batches
        ]
        if not self.batches:
            raise ValueError("Evaluator needs at least one validation batch")
        if callable(metric):
            self.metric_name = getattr(metric, "__name__", "custom")
            self._fn: MetricFn | None = metric
            self.higher_is_better = bool(getattr(metric, "higher_is_better", higher_is_better))
        elif metric in METRICS:
            self.metric_name = str(metric)
            self._fn = None
            self.higher_is_better = metric != "rel-l2"
        else:
            raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
        self.labels = None if labels is None else np.asarray(labels)
        if self.metric_name == "top1" and self._fn is None and self.labels is None:
            raise ValueError("metric 'top1' needs labels")
        self.threads = threads

        #: Per-output lists of per-batch arrays of the original model.
        self.ref_outputs: list[list[np.ndarray]] = self._run(model)
        self.output_is_logits = looks_like_logits(self.ref_outputs[0])
        if self.metric_name == "agreement" and self._fn is None and not self.output_is_logits:
            raise ValueError(
                "metric 'agreement' needs output 0 to be 2-D logits [N, C] with C > 1, got "
                f"shape {self.ref_outputs[0][0].shape}; use 'rel-l2' or 'cosine'"
            )
        self._ref_concat: list[np.ndarray] | None = None
        if self._fn is not None:
            self._ref_concat = self._concat_outputs(self.ref_outputs)
        #: The original model judged by itself.
        self.reference: Evaluation = self._judge(self.ref_outputs)

    # -- public --------------------------------------------------------------------------------

    @property
    def n_samples(self) -> int:
        """Number of validation samples (axis 0 of the batches, summed)."""
        return int(sum(c.shape[0] for c in self.ref_outputs[0])) if self.ref_outputs[0] else 0

    @property
    def original_metric(self) -> float:
        """The metric of the original model (1 for agreement/cosine, 0 for rel-l2)."""
        return self.reference.metric

    def evaluate(self, model: ModelLike) -> Evaluation:
        """Runs ``model`` on the validation batches (one session) and judges output 0."""
        return self._judge(self._run(model))

    def evaluate_per_sample(self, model: ModelLike) -> tuple[Evaluation, np.ndarray]:
        """Runs ``model`` once: :meth:`evaluate`'s result and the built-in metric per sample
        (:func:`per_sample`; its mean is the evaluation's metric).

        Raises:
            ValueError: for ``rel-l2`` or a callable metric, which have no per-sample values.
        """
        if self._fn is not None:
            raise ValueError("a callable metric has no per-sample values")
        outputs = self._run(model)
        values = per_sample(self.metric_name, outputs[0], self.ref_outputs[0], self.labels)
        return self._judge(outputs), values

    def drop(self, evaluation: Evaluation) -> float:
        """Metric points lost against the original (see the module docstring); ``inf`` if the
        candidate's metric or output 0 is not finite."""
        m, m0 = float(evaluation.metric), float(self.reference.metric)
        if not math.isfinite(m):
            return math.inf
        if not math.isfinite(evaluation.rel_error) and math.isfinite(self.reference.rel_error):
            return math.inf  # NaN/inf outputs where the original's are finite
        if self._fn is None:
            if self.metric_name == "rel-l2":
                return m
            return (m0 - m) * 100.0
        return m0 - m if self.higher_is_better else m - m0

    def within(self, evaluation: Evaluation, budget: float) -> bool:
        """True when ``drop(evaluation) <= budget``."""
        return self.drop(evaluation) <= budget

    # -- internals -----------------------------------------------------------------------------

    def _session(self, model: ModelLike) -> ort.InferenceSession:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if self.threads:
            opts.intra_op_num_threads = self.threads
        if isinstance(model, onnx.ModelProto):
            model = model.SerializeToString()
        elif not isinstance(model, bytes):
            model = os.fspath(model)
        return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])

    def _run(self, model: ModelLike) -> list[list[np.ndarray]]:
        sess = self._session(model)
        names = [i.name for i in sess.get_inputs()]
        missing = [n for n in names if n not in self.batches[0]]
        if missing:
            raise ValueError(
                f"validation batches lack model input(s) {missing}; they hold "
                f"{sorted(self.batches[0])}"
            )
        per_output: list[list[np.ndarray]] | None = None
        for batch in self.batches:
            outs = sess.run(None, {n: batch[n] for n in names})
            if per_output is None:
                per_output = [[] for _ in outs]
            for k, o in enumerate(outs):
                per_output[k].append(np.asarray(o))
        assert per_output is not None
        if not per_output:
            raise ValueError("the model has no outputs")
        return per_output

    @staticmethod
    def _concat_outputs(outputs: list[list[np.ndarray]]) -> list[np.ndarray]:
        try:
            return [_concat(chunks) for chunks in outputs]
        except ValueError as err:
            raise ValueError(
                "a callable metric gets each output concatenated over batches, but the batch "
                f"outputs do not concatenate along axis 0: {err}"
            ) from err

    def _judge(self, outputs: list[list[np.ndarray]]) -> Evaluation:
        y, y0 = outputs[0], self.ref_outputs[0]
        if len(y) != len(y0) or any(a.shape != b.shape for a, b in zip(y, y0, strict=True)):
            raise ValueError(
                f"candidate output 0 shapes {[a.shape for a in y]} differ from the original's "
                f"{[b.shape for b in y0]}"
            )
        rel = rel_l2(y, y0)
        agree = agreement(y, y0) if self.output_is_logits else None
        if self._fn is not None:
            assert self._ref_concat is not None
            value = float(self._fn(self._concat_outputs(outputs), self._ref_concat, self.labels))
        elif self.metric_name == "top1":
            assert self.labels is not None
            value = top1(y, self.labels)
        elif self.metric_name == "agreement":
            value = agree if agree is not None else agreement(y, y0)
        elif self.metric_name == "rel-l2":
            value = rel
        else:
            value = cosine(y, y0)
        return Evaluation(metric=value, rel_error=rel, agreement=agree)


@functools.cache
def load_metric(spec: str) -> MetricFn:
    """The function ``spec`` names, ``module:function`` or ``path/to/file.py:function``;
    loaded once per process (as ``import`` caches modules: the CLI's early check and the run
    share one load, and a ``file.py`` is executed once).

    Raises:
        UsageError: ``spec`` is not of that form, the module cannot be imported, or it has no
            callable of that name (one line, naming what to fix).
    """
    import importlib
    import importlib.util
    import sys
    from pathlib import Path

    from idap_onnx.errors import UsageError

    module_name, sep, name = spec.rpartition(":")
    if not sep or not module_name or not name.isidentifier():
        raise UsageError(f"--metric {spec!r}: give a built-in ({', '.join(METRICS)}) or "
                         "module:function (a module on the path, or file.py:function)")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise UsageError(f"--metric {spec!r}: {path} does not exist")
            loaded = importlib.util.spec_from_file_location(f"idap_metric_{path.stem}", path)
            module = importlib.util.module_from_spec(loaded)
            loaded.loader.exec_module(module)
        else:
            if "" not in sys.path and str(Path.cwd()) not in sys.path:
                sys.path.insert(0, str(Path.cwd()))
            module = importlib.import_module(module_name)
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001 (any import failure is the user's module's)
        raise UsageError(f"--metric {spec!r}: cannot import {module_name} "
                         f"({type(exc).__name__}: {exc})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UsageError(f"--metric {spec!r}: {module_name} has no function {name!r}")
    return fn
