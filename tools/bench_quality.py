"""Quality at matched MACs, without fine-tuning: IDAP++ scoring against the baselines.

For each model and MACs target (``--targets 0.5 0.3``: 50 % and 70 % of the MACs removed),
every variant runs ``idap_onnx.optimize.optimize`` stage 1 only (``stages=(1,)``), with the
same schedule ``p_t = p0 (1 + t/T)^alpha`` (``alpha=1.5``, ``T=10``), ``round_to=1``,
``max_group_ratio=0.9`` and a budget so loose that only the MACs target stops it
(``max_drop=1e9``): the variants differ only in the unit score and in whether the removed
channels' means are folded into the consumers' biases (mean compensation). Variants:

* ``idap`` with and without mean compensation (for ``idap`` the switch also changes the score:
  ``var_c`` instead of ``var_c + mu_c^2``);
* ``paper``, ``l1``, ``wanda`` and ``random`` (mean over ``--seeds``), each with and without
  mean compensation (the same recovery code path; only the ranking differs).

Models (both real, both cached by their ``tools/`` module):

* ``digits``: the residual CNN trained on scikit-learn's handwritten digits
  (``tools/digits.py``): calibration = the train images, the per-step validation = the val
  split (top-1 accuracy against the labels), and the test split reported too;
* ``minilm``: the pretrained all-MiniLM-L6-v2 sentence embedder (``tools/minilm.py``, sequence
  length 64): calibration = the first ``--minilm-calib`` calib sentences, metric = mean cosine
  similarity of the pruned model's sentence embeddings to the original's, on the val sentences
  (per step) and on the held-out test sentences (reported).

Each row reports the MACs reached (per sample; MiniLM at sequence length 64), the metric on the
validation and test sets, the relative output error on validation, ``idap``'s lead over the row
in metric points on test, the stage-1 steps, the wall time of ``optimize``, and the kept width
of each pruned layer. Nothing is fine-tuned.

Usage::

    python tools/bench_quality.py                                 # both models, both targets
    python tools/bench_quality.py --models digits --targets 0.5 --out -
    python tools/bench_quality.py --json runs.json --out docs/BENCHMARKS.md
    python tools/bench_quality.py --from-json runs.json --out docs/BENCHMARKS.md  # re-render

``--out FILE`` replaces (or appends) the section ``## Quality at matched MACs (no
fine-tuning)`` of FILE and leaves every other section alone; an ``### Observations``
subsection already in that section is kept. ``--out -`` prints the section only.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SECTION = "## Quality at matched MACs (no fine-tuning)"
OBSERVATIONS = "### Observations"
SCORES = ("idap", "paper", "l1", "random", "wanda", "idap-additive")
#: ``idap-additive``: ``idap`` without its coherence factor (``--no-coherence``), an ablation
DEFAULT_P0 = {"digits": 0.05, "minilm": 0.1, "minilm@dynamo": 0.1}
ALPHA, STEPS = 1.5, 10
MAX_GROUP_RATIO, ROUND_TO = 0.9, 1
LOOSE = 1e9  # a budget only the MACs target can stop
ONESHOT_P0 = 0.9  # one step asking for 90 % of the units; optimize shrinks it to the target


# ------------------------------------------------------------------------------------ the tasks


@dataclass
class Task:
    """One model with its data splits, as ``optimize`` and the evaluators need them."""

    name: str
    model: object  # onnx.ModelProto
    calib: list[dict[str, np.ndarray]]
    val: list[dict[str, np.ndarray]]
    test: list[dict[str, np.ndarray]]
    metric: str
    val_labels: np.ndarray | None = None
    test_labels: np.ndarray | None = None
    shapes: dict[str, list[int]] = field(default_factory=dict)
    data: str = ""
    kept: Callable[[dict], str] = lambda kept: ""

    def evaluators(self):
        """The validation and test evaluators (``idap_onnx.metrics.Evaluator``) of the task."""
        from idap_onnx.metrics import Evaluator

        return (Evaluator(self.model, self.val, labels=self.val_labels, metric=self.metric),
                Evaluator(self.model, self.test, labels=self.test_labels, metric=self.metric))


def _batches(arrays: dict[str, np.ndarray], size: int) -> list[dict[str, np.ndarray]]:
    n = len(next(iter(arrays.values())))
    return [{k: v[i : i + size] for k, v in arrays.items()} for i in range(0, n, size)]


def _npz(path: Path, limit: int | None = None) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    return {k: v[:limit] for k, v in arrays.items()} if limit else arrays


def short_name(name: str) -> str:
    """A node's module path, as in the kept widths: ``/stem/stem.3/Conv`` -> ``stem.3``."""
    parts = [p for p in name.split("/") if p]
    return "/".join(parts[-2:-1]) or name


def digits_task(batch: int, seed: int = 0) -> Task:
    """The digits CNN trained with ``seed`` (split and training; 0 is the cached default)."""
    from tools.digits import INPUT_NAME, build

    name = "digits" if seed == 0 else f"digits (model seed {seed})"
    return _image_task(name, build(seed=seed), INPUT_NAME, batch)


def mnist_se_task(batch: int) -> Task:
    """The depthwise / squeeze-excitation residual CNN trained on MNIST (``tools/mnist_se.py``)."""
    from tools.mnist_se import INPUT_NAME, build

    return _image_task("mnist_se", build(), INPUT_NAME, batch)


def _image_task(name: str, asset, input_name: str, batch: int) -> Task:
    """An image classifier asset (``tools/digits.py`` and alike): calibration = train images,
    validation and test with their labels, metric top-1."""
    import onnx

    (x_tr, _), (x_va, y_va), (x_te, y_te) = asset.train, asset.val, asset.test

    def kept(widths: dict) -> str:
        return ", ".join(
            f"{short_name(n)} {w['after']}/{w['before']}"
            for n, w in widths.items()
            if n.endswith("Conv")
        )

    return Task(
        name=name,
        model=onnx.load(asset.model_path),
        calib=_batches({input_name: x_tr}, batch),
        val=_batches({input_name: x_va}, batch),
        test=_batches({input_name: x_te}, batch),
        metric="top1",
        val_labels=y_va,
        test_labels=y_te,
        shapes={input_name: [1, *x_tr.shape[1:]]},
        data=(
            f"calibration: the {len(x_tr)} train images; validation (per step): the {len(x_va)} "
            f"val images; test: the {len(x_te)} test images; batches of {batch}"
        ),
        kept=kept,
    )


def minilm_task(batch: int, calib: int, val: int, test: int, dynamo: bool = False) -> Task:
    """MiniLM (its legacy export, or with ``dynamo`` its dynamo export: the same weights and
    sentences)."""
    import onnx

    from tools.minilm import build, dynamo_model

    asset = build()
    c, v, t = _npz(asset.calib_npz, calib), _npz(asset.val_npz, val), _npz(asset.test_npz, test)
    seq = next(iter(c.values())).shape[1]

    def kept(widths: dict) -> str:
        mlp, heads = [], []
        for name, w in widths.items():
            if "intermediate/dense" in name:
                mlp.append(str(w["after"]))
            elif "attention/self/query" in name:
                heads.append(str(round(12 * w["after"] / w["before"])))
        if not mlp and not heads:  # the dynamo export's nodes are named by op, not module
            return "-"
        return f"MLP {' '.join(mlp)}; heads {' '.join(heads)}"

    n = {k: len(next(iter(d.values()))) for k, d in (("c", c), ("v", v), ("t", t))}
    return Task(
        name="minilm@dynamo" if dynamo else "minilm",
        model=onnx.load(dynamo_model() if dynamo else asset.model_path),
        calib=_batches(c, batch),
        val=_batches(v, batch),
        test=_batches(t, batch),
        metric="cosine",
        shapes={k: [1, seq] for k in c},
        data=(
            f"calibration: {n['c']} calib sentences; validation (per step): {n['v']} val "
            f"sentences; test: {n['t']} held-out test sentences; sequence length {seq}; batches "
            f"of {batch}"
        ),
        kept=kept,
    )


def make_task(name: str, batch: int, minilm_calib: int = 128, minilm_val: int = 256,
              minilm_test: int = 256) -> Task:
    """The task of ``digits``, ``mnist_se`` or ``minilm`` (its sentence counts per split)."""
    if name == "digits":
        return digits_task(batch)
    if name == "mnist_se":
        return mnist_se_task(batch)
    return minilm_task(batch, minilm_calib, minilm_val, minilm_test,
                       dynamo=name == "minilm@dynamo")


# ------------------------------------------------------------------------------------- the runs


def run_variant(
    task: Task,
    target: float,
    score: str,
    mc: bool,
    seed: int,
    p0: float,
    evaluators,
    log: Callable[[str], None],
    oneshot: bool = False,
    steps: int = STEPS,
    round_to: int = ROUND_TO,
    refit: bool = False,
) -> dict:
    """One ``optimize`` run; the row's numbers. ``oneshot``: T = 1 step (the whole removal
    ranked on the original model's statistics, shrunk by ``optimize`` to land on the target)."""
    from idap_onnx.optimize import OptimizeConfig, optimize

    val_ev, test_ev = evaluators
    config = OptimizeConfig(
        target_flops=target,
        max_drop=LOOSE,
        metric=task.metric,
        score="idap" if score == "idap-additive" else score,
        coherence=score != "idap-additive",
        mean_compensation=mc,
        p0=ONESHOT_P0 if oneshot else p0,
        alpha=ALPHA,
        steps=1 if oneshot else steps,
        round_to=round_to,
        max_group_ratio=MAX_GROUP_RATIO,
        stages=(1,),
        seed=seed,
        refit=refit,
    )
    t0 = time.perf_counter()
    result = optimize(
        task.model,
        task.calib,
        val_ev,
        config,
        input_shapes=task.shapes,
        progress=lambda line: log(f"    {line}"),
    )
    seconds = time.perf_counter() - t0
    test, samples = test_ev.evaluate_per_sample(result.model)  # samples: the lead's interval
    accepted = sum(1 for s in result.steps if s.accepted)
    return {
        "model": task.name,
        "target": target,
        "score": score,
        "mc": mc,
        "seed": seed,
        "schedule": "one-shot" if oneshot else "iterative",
        "T": config.steps,
        "p0": config.p0,
        "macs0": result.original["macs"],
        "macs": result.final["macs"],
        "params0": result.original["params"],
        "params": result.final["params"],
        "val": result.final["metric"],
        "val_error": result.final["error"],
        "test": test.metric,
        "test_error": test.rel_error,
        "test_samples": [round(float(v), 6) for v in samples],
        "steps": accepted,
        "seconds": seconds,
        "kept": task.kept(result.kept),
        "target_met": result.final["macs"] <= 1.01 * target * result.original["macs"],
    }


def run_task(
    task: Task, targets, scores, seeds, p0: Callable[[float], float], log,
    oneshot: tuple[str, ...] = ()
) -> tuple[list[dict], dict]:
    """Every variant at every target; ``p0(target)`` is the schedule's first fraction."""

    t0 = time.perf_counter()
    val_ev, test_ev = task.evaluators()
    info = {
        "model": task.name,
        "data": task.data,
        "metric": task.metric,
        "val0": val_ev.original_metric,
        "test0": test_ev.original_metric,
        "p0": {str(t): p0(t) for t in targets},
        "setup_seconds": time.perf_counter() - t0,
    }
    rows = []
    for target in targets:
        for score in scores:
            for mc in (True, False):
                for seed in seeds if score == "random" else (0,):
                    log(f"{task.name} target {target} {score} mc={mc} seed={seed}")
                    row = run_variant(
                        task, target, score, mc, seed, p0(target), (val_ev, test_ev), log
                    )
                    log(
                        f"  -> MACs {row['macs'] / row['macs0']:.3f}, val {row['val']:.4f}, "
                        f"test {row['test']:.4f}, {row['seconds']:.1f} s"
                    )
                    rows.append(row)
        for score in oneshot:
            for seed in seeds if score == "random" else (0,):
                log(f"{task.name} target {target} {score} one-shot seed={seed}")
                row = run_variant(
                    task, target, score, True, seed, p0(target), (val_ev, test_ev), log,
                    oneshot=True
                )
                log(
                    f"  -> MACs {row['macs'] / row['macs0']:.3f}, val {row['val']:.4f}, "
                    f"test {row['test']:.4f}, {row['seconds']:.1f} s"
                )
                rows.append(row)
    return rows, info


def sweep_steps(task: Task, targets, scores, seeds, steps_list, log) -> str:
    """Diagnostic: the same run with T = 1, 2, ... steps (MC on, p0 = min(0.9, 0.5 / T),
    0.9 for T = 1); a markdown table of val and test metric and val error per T."""

    val_ev, test_ev = task.evaluators()
    head = " | ".join(f"T={t} (p0 {_sweep_p0(t):.3g})" for t in steps_list)
    lines = [
        f"{task.name}, MC on; each cell: val % / test % / val err (MACs % kept)",
        "",
        f"| target | score | {head} |",
        "|---|---|" + "---|" * len(steps_list),
    ]
    for target in targets:
        for score in scores:
            cells = []
            for t in steps_list:
                runs = [
                    run_variant(
                        task,
                        target,
                        score,
                        True,
                        seed,
                        _sweep_p0(t),
                        (val_ev, test_ev),
                        log,
                        steps=t,
                    )
                    for seed in (seeds if score == "random" else (0,))
                ]
                val, test = (float(np.mean([r[k] for r in runs])) for k in ("val", "test"))
                err = float(np.mean([r["val_error"] for r in runs]))
                macs = float(np.mean([r["macs"] / r["macs0"] for r in runs]))
                cells.append(f"{_pct(val)} / {_pct(test)} / {err:.3f} ({100 * macs:.1f})")
                log(f"{task.name} {target} {score} T={t}: {cells[-1]}")
            lines.append(f"| {100 * target:.0f} % | `{score}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def model_seeds(
    targets, scores, seeds, model_seeds, batch: int, p0: float, log, round_to: int = ROUND_TO,
    refit: bool = False,
) -> str:
    """Diagnostic: the digits comparison (MC on, the benchmark's schedule) repeated on CNNs
    trained with each of ``model_seeds`` (each its own split and initialization); a markdown
    table per target of the test metric per trained model, the mean, and ``idap``'s lead over
    each score's mean, then a summary per score (``paired_leads``). One trained model's test
    split has 360 images (1 image = 0.28 points), so a single model cannot separate scores
    closer than that."""

    runs_of: dict[tuple[float, str], list[dict]] = {}  # one averaged row per trained model
    originals = []
    for ms in model_seeds:
        task = digits_task(batch, ms)
        val_ev, test_ev = task.evaluators()
        originals.append(test_ev.original_metric)
        for target in targets:
            for score in scores:
                runs = [run_variant(task, target, score, True, seed, p0, (val_ev, test_ev), log,
                                    round_to=round_to, refit=refit)
                        for seed in (seeds if score == "random" else (0,))]
                row = {k: float(np.mean([r[k] for r in runs]))
                       for k in ("val", "test", "test_error")}
                row["macs"] = float(np.mean([r["macs"] / r["macs0"] for r in runs]))
                runs_of.setdefault((target, score), []).append(row)
                log(f"model seed {ms} target {target} {score}: test {row['test']:.4f}")
    head = " | ".join(f"seed {ms}" for ms in model_seeds)
    lines = ["Original test top-1 per model seed: "
             + ", ".join(f"{100 * o:.2f}" for o in originals), ""]
    for target in targets:
        rounding = "" if round_to == 1 else f", widths rounded to {round_to}"
        rounding += ", least-squares refit" if refit else ""
        if "random" in scores:
            rounding += f"; random: mean of {len(seeds)} seeds"
        lines += [f"MACs target {100 * target:g} % kept (test top-1 %, MC on{rounding}):", "",
                  f"| score | {head} | mean | idap lead (mean) | MACs % (mean, range) |",
                  "|---|" + "---|" * (len(model_seeds) + 3)]
        col = {score: np.array([[r[k] for k in ("val", "test", "test_error", "macs")]
                                for r in runs_of[target, score]]) for score in scores}
        idap = col.get("idap")
        for score in scores:
            vals, m = col[score][:, 1], col[score][:, 3]
            lead = "" if idap is None or score == "idap" else (
                f"{100 * (idap[:, 1].mean() - vals.mean()):+.2f}")
            lines.append(f"| `{score}` | " + " | ".join(f"{100 * v:.2f}" for v in vals)
                         + f" | {100 * vals.mean():.2f} | {lead} | {100 * m.mean():.1f} "
                         f"({100 * m.min():.1f}-{100 * m.max():.1f}) |")
        lines += ["", *paired_leads(col), ""]
    return "\n".join(lines)


def paired_leads(col: dict[str, np.ndarray]) -> list[str]:
    """Markdown table: per score, the means over the trained models of validation top-1, test
    top-1 and test relative output error ``||y - y0|| / ||y0||``, and ``idap``'s lead in test
    top-1 as a paired comparison over the models: the mean of the per-model differences
    ``d_m = idap_m - score_m`` with its 95 % t-interval ``mean(d) +- t_{0.975, n-1} sd(d) /
    sqrt(n)``, and on how many models ``idap`` is ahead / level / behind. An interval that
    contains 0 does not separate the two scores. ``col``: score -> array [models, (val, test,
    test_error, macs)], metrics as fractions."""
    lines = ["| score | val top-1 % | test top-1 % | test rel. error | idap lead, test "
             "(95 % CI) | idap ahead / level / behind |", "|---|---|---|---|---|---|"]
    idap = col.get("idap")
    for score, a in col.items():
        cells = [f"`{score}`", f"{100 * a[:, 0].mean():.2f}", f"{100 * a[:, 1].mean():.2f}",
                 f"{a[:, 2].mean():.4f}"]
        if idap is None or score == "idap" or len(a) < 2:
            cells += ["", ""]
        else:
            d = 100 * (idap[:, 1] - a[:, 1])
            mean, half = t_interval(d)
            ahead, level = int((d > 1e-9).sum()), int((np.abs(d) <= 1e-9).sum())
            cells += [f"{mean:+.2f} ({mean - half:+.2f} to {mean + half:+.2f})",
                      f"{ahead} / {level} / {len(d) - ahead - level}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _sweep_p0(steps: int) -> float:
    return ONESHOT_P0 if steps == 1 else min(ONESHOT_P0, 0.5 / steps)


# -------------------------------------------------------------------------------------- machine


def machine() -> dict:
    """``machine.describe()`` and the ONNX Runtime version."""
    import onnxruntime

    from tools.machine import describe

    return {**describe(), "onnxruntime": onnxruntime.__version__}


# ---------------------------------------------------------------------------------- the report


def _group(rows: list[dict]) -> list[dict]:
    """Rows of one (model, target) merged over random seeds: mean, with the seeds' range."""
    merged: dict[tuple, list[dict]] = {}
    for r in rows:
        merged.setdefault((r["score"], r["mc"], r.get("schedule", "iterative")), []).append(r)
    out = []
    for group in merged.values():
        row = dict(group[0])
        for key in ("macs", "params", "val", "val_error", "test", "test_error", "seconds", "steps"):
            row[key] = float(np.mean([g[key] for g in group]))
        row["n"] = len(group)
        samples = [g.get("test_samples") for g in group]
        if all(samples) and len({len(x) for x in samples}) == 1:
            row["test_samples"] = np.mean(np.array(samples, dtype=np.float64), axis=0)
        else:
            row["test_samples"] = None  # rows from before per-sample values were kept
        row["target_met"] = all(g["target_met"] for g in group)
        row["test_range"] = (min(g["test"] for g in group), max(g["test"] for g in group))
        row["val_range"] = (min(g["val"] for g in group), max(g["val"] for g in group))
        if len(group) > 1:
            row["kept"] = f"(seed {group[0]['seed']}) {group[0]['kept']}"
        out.append(row)
    return out


def _label(row: dict) -> str:
    name = row["score"] + (f" (mean of {row['n']} seeds)" if row.get("n", 1) > 1 else "")
    return f"`{name}`" if row["score"] != "idap" or not row["mc"] else f"**`{name}`**"


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def _fmt_metric(value: float, rng: tuple[float, float] | None, n: int) -> str:
    text = _pct(value)
    if rng and n > 1:
        text += f" ({_pct(rng[0])}-{_pct(rng[1])})"
    return text


def t_interval(d: np.ndarray) -> tuple[float, float]:
    """Mean of the paired differences ``d`` and the half-width of its 95 % t-interval,
    ``t_{0.975, n-1} sd(d) / sqrt(n)`` (NaN for fewer than 2 values)."""
    from scipy import stats as st

    d = np.asarray(d, dtype=np.float64)
    if len(d) < 2:
        return float(np.mean(d)) if len(d) else float("nan"), float("nan")
    return float(d.mean()), float(st.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)))


def _lead(ref: dict, g: dict) -> str:
    """``idap``'s lead over row ``g`` on test, in points; with both rows' per-sample values,
    the 95 % t-interval of the mean per-sample difference (the same test samples, paired)."""
    text = f"{100 * (ref['test'] - g['test']):+.2f}"
    a, b = ref.get("test_samples"), g.get("test_samples")
    if a is not None and b is not None and len(a) == len(b):
        mean, half = t_interval(100 * (np.asarray(a) - np.asarray(b)))
        text += f" ({mean - half:+.2f} to {mean + half:+.2f})"
    return text


def _row(g: dict) -> str:
    macs = 100 * g["macs"] / g["macs0"]
    miss = "" if g["target_met"] else " (missed)"
    return (
        f"| {_label(g)} | {'yes' if g['mc'] else 'no'} | {macs:.1f}{miss} | "
        f"{_fmt_metric(g['val'], g['val_range'], g['n'])} | "
        f"{_fmt_metric(g['test'], g['test_range'], g['n'])} | {g['val_error']:.3f} |"
    )


def render(rows: list[dict], infos: list[dict], meta: dict) -> str:
    lines = [SECTION, ""]
    lines += [
        "Stage 1 of `idap_onnx.optimize.optimize` only (no block removal, **no fine-tuning**), "
        "stopped by the MACs target alone (budget `max_drop=1e9`): every variant uses the same "
        f"schedule p_t = p0 (1 + t/T)^alpha with alpha = {ALPHA}, T = {STEPS}, re-scoring every "
        f"step, `round_to={ROUND_TO}`, `max_group_ratio={MAX_GROUP_RATIO}`; the variants "
        "differ only in the unit score and in mean compensation (MC: the removed channels' "
        "calibration means folded into the consumers' biases; for `idap` it also switches the "
        "score from var+mean^2 to var). The last step of each run is shrunk to land on the "
        "target, so the MACs reached match across the variants that reach it (a run still "
        "above it after its T steps is marked *missed*).",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']['cpu']}, {meta['machine']['cores']} cores, "
        f"{meta['machine']['ram_gib']} GiB RAM; Python {meta['machine']['python']}, ONNX Runtime "
        f"{meta['machine']['onnxruntime']} (CPU provider); {meta['date']}.",
        "",
        "Columns: *MACs* per sample reached, as % of the original (target in the heading); "
        "*val*/*test*: the metric x 100 (top-1 in %, cosine x 100) on the validation split "
        "(the one `optimize` judges steps on) and on the held-out test split; *val err*: "
        "relative output error ||y - y0|| / ||y0|| on validation; *idap lead*: **`idap`** "
        "(with MC) minus the row on test, in points (positive: `idap` is better), with the 95 % "
        "t-interval of the mean per-sample difference in brackets (the two models paired on "
        "the same test samples: per image 1 or 0 correct, per sentence the cosine; a random "
        "row's per-sample values are the mean over its seeds, so its interval covers the "
        "test samples, not the seeds; rows kept from runs before per-sample values were "
        "recorded have none); *steps*: "
        "accepted stage-1 steps; *time*: wall time of `optimize` (mean per run for random). "
        "Random rows give the mean over seeds and the seeds' range in brackets.",
        "",
    ]
    for info in infos:
        model_rows = [r for r in rows if r["model"] == info["model"]]
        metric = {
            "top1": "top-1 accuracy",
            "cosine": "mean cosine similarity to the original's embeddings",
        }[info["metric"]]
        lines += [
            f"### {info['model']}",
            "",
            f"Metric: {metric}. Original: val {_pct(info['val0'])}, test "
            f"{_pct(info['test0'])}. {info['data'][0].upper()}{info['data'][1:]}.",
            "",
        ]
        for target in sorted({r["target"] for r in model_rows}, reverse=True):
            at = [r for r in model_rows if r["target"] == target]
            group = _group([r for r in at if r.get("schedule", "iterative") == "iterative"])
            ref = next((g for g in group if g["score"] == "idap" and g["mc"]), None)
            p0s = sorted({r["p0"] for r in at if r.get("schedule", "iterative") == "iterative"})
            lines += [
                f"#### {info['model']}: {100 * (1 - target):.0f} % of MACs removed "
                f"(target {100 * target:.0f} % kept)",
                "",
                f"Schedule: p0 = {', '.join(f'{v:g}' for v in p0s)}, T = {STEPS}.",
                "",
                "| score | MC | MACs % | val % | test % | val err | idap lead (test) | "
                "steps | time s |",
                "|---|---|---|---|---|---|---|---|---|",
            ]
            for g in sorted(group, key=lambda g: -g["test"]):
                lead = "" if ref is None or g is ref else _lead(ref, g)
                if lead and not ref["target_met"]:
                    lead += " (not matched)"
                lines.append(_row(g) + f" {lead} | {g['steps']:.0f} | {g['seconds']:.1f} |")
            missed = [g for g in group if not g["target_met"]]
            if missed:
                lines += [
                    "",
                    "*(missed)*: the run ended after its T = "
                    f"{STEPS} steps above the target; its MACs are not matched, so its "
                    "lead is not a like-for-like comparison.",
                ]
            lines += ["", "Kept widths (after/before):", ""]
            lines += [
                f"- {_label(g)}, MC {'on' if g['mc'] else 'off'}: {g['kept']}"
                for g in sorted(group, key=lambda g: (SCORES.index(g["score"]), not g["mc"]))
            ]
            lines.append("")
            shots = _group([r for r in at if r.get("schedule") == "one-shot"])
            if shots:
                iterative = {g["score"]: g for g in group if g["mc"]}
                lines += [
                    "One-shot ablation (T = 1, MC on: the whole removal ranked on the original "
                    "model's statistics, shrunk to the target; *iterative test* repeats the "
                    "table above):",
                    "",
                    "| score | MC | MACs % | val % | test % | val err | iterative test % | "
                    "one-shot - iterative (test) |",
                    "|---|---|---|---|---|---|---|---|",
                ]
                for g in sorted(shots, key=lambda g: -g["test"]):
                    it = iterative.get(g["score"])
                    gain = "" if it is None else f"{100 * (g['test'] - it['test']):+.2f}"
                    it_test = "" if it is None else _pct(it["test"])
                    lines.append(_row(g) + f" {it_test} | {gain} |")
                lines += ["", "One-shot kept widths:", ""]
                lines += [
                    f"- {_label(g)}: {g['kept']}"
                    for g in sorted(shots, key=lambda g: SCORES.index(g["score"]))
                ]
                lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def merge(old: dict, rows: list[dict], infos: list[dict], meta: dict):
    """``old``'s rows for the (model, target, score, schedule) runs not in ``rows``, then
    ``rows``; the command of ``old`` then this one."""

    def key(r: dict) -> tuple:
        return r["model"], r["target"], r["score"], r.get("schedule", "iterative")

    done = {key(r) for r in rows}
    kept = [r for r in old["rows"] if key(r) not in done]
    new_models = {i["model"] for i in infos}
    merged_infos = [i for i in old["infos"] if i["model"] not in new_models] + infos
    order = [i["model"] for i in old["infos"]] + [i["model"] for i in infos]
    merged_infos.sort(key=lambda i: order.index(i["model"]))
    command = f"{old['meta']['command']}`, then `{meta['command']}"
    return kept + rows, merged_infos, {**meta, "command": command}


def write_section(path: Path, section: str) -> None:
    """Replace (or append) SECTION in ``path``; keep the other sections and our Observations."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start = text.find(SECTION + "\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        nxt = re.search(r"^## ", text[start + len(SECTION) :], flags=re.M)
        end = start + len(SECTION) + nxt.start() if nxt else len(text)
        old = text[start:end]
        obs = old.find(OBSERVATIONS + "\n")
        if obs >= 0 and OBSERVATIONS not in section:
            section = section.rstrip("\n") + "\n\n" + old[obs:].rstrip("\n") + "\n"
        tail = text[end:]
        text = text[:start] + section + ("\n" + tail if tail else "")
    path.write_text(text)


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models", nargs="+", default=["digits", "minilm"],
        choices=["digits", "minilm", "minilm@dynamo"],
        help="minilm@dynamo: MiniLM's dynamo export (the same weights and sentences)"
    )
    parser.add_argument(
        "--targets",
        nargs="+",
        type=float,
        default=[0.5, 0.3],
        help="kept MACs fractions (0.5: 50 %% removed)",
    )
    parser.add_argument("--scores", nargs="+", default=list(SCORES[:-1]), choices=SCORES,
                        help="unit scores to compare (default: all but the idap-additive "
                        "ablation)")
    parser.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=[0, 1, 2],
        help="seeds of the random score (averaged)",
    )
    parser.add_argument(
        "--p0",
        nargs="*",
        default=[],
        metavar="MODEL[@TARGET]=P0",
        help=f"first-step fraction per model, or per model and target, e.g. minilm@0.3=0.2 "
        f"(default {DEFAULT_P0})",
    )
    parser.add_argument(
        "--oneshot",
        nargs="*",
        default=list(SCORES[:-1]),
        choices=SCORES,
        help="scores also run as a one-shot ablation (T = 1, MC on); give none to skip it",
    )
    parser.add_argument(
        "--sweep-steps",
        nargs="+",
        type=int,
        metavar="T",
        help="diagnostic instead of the benchmark: rerun --scores (MC on) with these step "
        "counts T and print a table to stdout (never written to --out)",
    )
    parser.add_argument(
        "--model-seeds",
        nargs="+",
        type=int,
        metavar="S",
        help="diagnostic instead of the benchmark: repeat the digits comparison (--scores, "
        "MC on) on CNNs trained with these seeds and print a table to stdout",
    )
    parser.add_argument(
        "--round-to",
        type=int,
        default=ROUND_TO,
        help=f"kept widths rounded to multiples of N, for --model-seeds only ({ROUND_TO})",
    )
    parser.add_argument(
        "--refit",
        action="store_true",
        help="the least-squares refit after every step (optimize --refit), for --model-seeds only",
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument(
        "--minilm-calib", type=int, default=128, help="MiniLM calibration sentences (of 512)"
    )
    parser.add_argument("--minilm-val", type=int, default=256)
    parser.add_argument("--minilm-test", type=int, default=256)
    parser.add_argument(
        "--out",
        default="docs/BENCHMARKS.md",
        help="markdown file whose section is replaced, or - for stdout",
    )
    parser.add_argument("--json", help="also write the raw rows here")
    parser.add_argument("--from-json", help="render the rows of an earlier --json, run nothing")
    parser.add_argument(
        "--merge-json",
        help="an earlier --json whose rows for the (model, target, score, schedule) runs not "
        "made now are kept (rerun some, keep the rest)",
    )
    args = parser.parse_args(argv)

    def log(line: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)

    def task_of(name: str) -> Task:
        return make_task(name, args.batch, args.minilm_calib, args.minilm_val, args.minilm_test)

    if args.sweep_steps:
        for name in args.models:
            print(
                sweep_steps(
                    task_of(name), args.targets, args.scores, args.seeds, args.sweep_steps, log
                )
            )
        return 0
    if args.model_seeds:
        print(model_seeds(args.targets, args.scores, args.seeds, args.model_seeds, args.batch,
                          DEFAULT_P0["digits"], log, round_to=args.round_to, refit=args.refit))
        return 0
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        rows, infos, meta = saved["rows"], saved["infos"], saved["meta"]
    else:
        p0 = dict(DEFAULT_P0)
        for item in args.p0:
            name, _, value = item.partition("=")
            p0[name] = float(value)

        def p0_for(model: str) -> Callable[[float], float]:
            return lambda target: p0.get(f"{model}@{target:g}", p0[model])

        meta = {
            "command": "python tools/bench_quality.py " + shlex.join(argv or sys.argv[1:]),
            "machine": machine(),
            "date": time.strftime("%Y-%m-%d"),
        }
        rows, infos = [], []
        for name in args.models:
            task = task_of(name)
            task_rows, info = run_task(
                task, args.targets, args.scores, args.seeds, p0_for(name), log,
                tuple(args.oneshot)
            )
            rows += task_rows
            infos.append(info)
            if args.json:  # keep what is done so far
                Path(args.json).write_text(
                    json.dumps({"rows": rows, "infos": infos, "meta": meta}, indent=1)
                )
        if args.merge_json:
            rows, infos, meta = merge(json.loads(Path(args.merge_json).read_text()), rows,
                                      infos, meta)
            if args.json:
                Path(args.json).write_text(
                    json.dumps({"rows": rows, "infos": infos, "meta": meta}, indent=1)
                )
    section = render(rows, infos, meta)
    print(section)
    if args.out != "-":
        write_section(Path(args.out), section)
        log(f"section written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
