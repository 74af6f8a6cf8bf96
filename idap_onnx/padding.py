"""Cut the padding of token samples, where the model is shown to ignore it.

Text read for calibration or training is padded to one length (``--seq-len``), but an encoder
with an attention mask computes the same output for a sentence cut to its own length: padded
positions are masked out of attention and out of a masked mean pool. Training on the cut
sentences skips the work on padding (``finetune`` batches samples of equal shape together).

``trim_padding`` finds the mask (an integer input named ``*mask*``, 0/1, a run of ones then
zeros in every sample), cuts every input of the mask's length to the sentence's token count
rounded up to ``multiple``, and keeps the cut only if the teacher, run in ONNX Runtime on the
``check`` samples with the most padding, gives outputs of the same shape that differ by at
most ``tol`` relative (max abs difference over max abs value). Otherwise it returns the samples
unchanged with the reason: a model whose output reads the padding (token-level outputs, a fixed
sequence length, a pool that ignores the mask) is never trained on cut samples.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx

Sample = Mapping[str, np.ndarray]


def trim_padding(
    samples: Sequence[Sample],
    model: onnx.ModelProto,
    *,
    multiple: int = 8,
    check: int = 8,
    tol: float = 1e-4,
) -> tuple[list[Sample], str]:
    """``(samples, note)``: the samples with their padding cut, or unchanged, and why."""
    samples = list(samples)
    if not samples:
        return samples, "no samples"
    mask = _mask_name(samples)
    if mask is None:
        return samples, "no 0/1 attention mask with right padding: nothing cut"
    width = len(samples[0][mask])
    seq = [k for k, v in samples[0].items() if np.ndim(v) >= 1 and np.shape(v)[0] == width]
    lengths = [
        min(-(-int(np.asarray(s[mask]).sum()) // multiple) * multiple, width) for s in samples
    ]
    if all(n == width for n in lengths):
        return samples, "no padding to cut"
    cut = [
        {k: (np.ascontiguousarray(v[:n]) if k in seq else v) for k, v in s.items()}
        for s, n in zip(samples, lengths, strict=True)
    ]
    order = np.argsort(lengths, kind="stable")[: max(check, 1)]
    why = _differs(model, [samples[i] for i in order], [cut[i] for i in order], tol)
    if why:
        return samples, f"padding kept: {why}"
    tokens = float(np.mean(lengths))
    return cut, f"padding cut: {tokens:.1f} positions per sample on average instead of {width}"


def _mask_name(samples: Sequence[Sample]) -> str | None:
    """The attention mask: an integer input named ``*mask*`` with one axis of per-sample 0/1
    values, ones first then zeros, in every sample."""
    for name, value in samples[0].items():
        a = np.asarray(value)
        if "mask" not in name.lower() or a.ndim != 1 or a.dtype.kind not in "iub":
            continue
        ok = True
        for s in samples:
            m = np.asarray(s[name]).astype(np.int64)
            n = int(m.sum())
            if m.shape != a.shape or not ((m == 0) | (m == 1)).all() or not m[:n].all():
                ok = False
                break
        if ok:
            return name
    return None


def _differs(model: onnx.ModelProto, padded, cut, tol: float) -> str | None:
    """None when ``model`` gives the same outputs on each padded sample and its cut; else why."""
    import onnxruntime as ort

    from idap_onnx.model_io import write_variant

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    with tempfile.TemporaryDirectory(prefix="idap-trim-") as tmp:
        path = write_variant(model, Path(tmp) / "m.onnx", nodes=model.graph.node)
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        for full, short in zip(padded, cut, strict=True):
            try:
                a = session.run(None, {k: full[k][None] for k in names})
                b = session.run(None, {k: short[k][None] for k in names})
            except Exception as exc:  # ONNX Runtime's own types: a fixed sequence length
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else "error"
                return f"the model does not run on cut samples ({first[:120]})"
            for x, y in zip(a, b, strict=True):
                if x.shape != y.shape:
                    return f"an output's shape follows the length ({x.shape} vs {y.shape})"
                scale = float(np.max(np.abs(x))) or 1.0
                diff = float(np.max(np.abs(x.astype(np.float64) - y))) / scale
                if not diff <= tol:
                    return f"the outputs change when the padding is cut ({diff:.1e} relative)"
    return None


def shape_groups(samples: Sequence[Sample], names: Sequence[str]) -> list[np.ndarray]:
    """Indices of ``samples`` grouped by their input shapes (first-seen order; within a group,
    data order). Samples of different shapes (text of different lengths) are never stacked
    into one batch."""
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(tuple(np.shape(s[n]) for n in names), []).append(i)
    return [np.asarray(g, dtype=np.int64) for g in groups.values()]


def stacked(samples: Sequence[Sample], size: int) -> list[dict[str, np.ndarray]]:
    """``samples`` as batches of at most ``size``, each of one input shape (``shape_groups``)."""
    if not samples:
        return []
    names = list(samples[0])
    return [
        {n: np.stack([samples[i][n] for i in g[k : k + size]]) for n in names}
        for g in shape_groups(samples, names)
        for k in range(0, len(g), size)
    ]
