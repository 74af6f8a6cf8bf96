"""Unit and block scores from calibration statistics (METHOD.md sections 2 and 3).

Unit scores (lower = removed first), per group, summed over the group's members:

- ``idap`` (flow divergence, paper Sec. 3.1 as specified in METHOD.md Sec. 2)::

      e_kc   = ||W_k[:, c]||^2 * (var_c + mu_c^2) * P_k      (var_c alone with mean
                                                              compensation)
      E_u    = sum_k sum_{c in u} e_kc / E||T_k||^2
      kappa_k = E||Y_k - r_k||^2 / sum_c e_kc                 (coherence of consumer k)
      kappa_g = max(1, sum_u sum_k kappa_k e_ku / sum_u E_u)   (of the group, E-weighted)
      D_f(u) = sqrt( E_u * (1 + 2 (kappa_g - 1) rank_g(u) / N_g) )

  over every consumer k of the group (``W_k[:, c]`` flattened over the kernel, ``P_k`` the output
  positions of k per sample, ``T_k`` the next flow tensor: k's output ``Y_k``, or, when k ends a
  residual branch, the block output ``y = x + f(x)`` that ``Y_k`` joins, since removing c changes
  ``y`` by exactly what it changes ``Y_k``; stage 2's D_l measures the same tensors): the relative
  change of each next flow tensor, summed over the consumers. With one consumer this is METHOD.md's
  formula; with several, METHOD.md pools the denominator (``sum_k e_kc / sum_k E||Y_k||^2``), which
  changes when one consumer is rescaled, while normalizing per consumer keeps the paper's scale
  invariance for every group (a deliberate choice, tested). Comparable across layers and
  additive over a head's channels.

  ``kappa`` (coherence; not in METHOD.md, issue 19) corrects the one assumption of ``e_kc``
  that fails across layers: that the channels' contributions to ``Y_k`` are uncorrelated, so
  that removing a set changes ``Y_k`` by the sum of its ``e_kc``. ``E||Y_k - r_k||^2`` is what
  removing *every* input channel of k changes its output by, measured from ``Y_k``'s
  per-channel moments (``r_k``: the per-channel mean that compensation restores, or the bias
  without it); ``sum_c e_kc`` is the additive estimate of the same. Channels that add up
  coherently (the pooled features before the SE/depthwise CNN's classifier: ``kappa`` 34;
  convolutions 1 to 3) carry more together than one at a time, and a global ranking of the
  additive score strips such a layer to a few channels. Removing the lowest fraction ``f`` of
  a group then costs about ``sum E_u (1 + (kappa_g - 1) f)``: additive for the first units,
  ``kappa_g`` times it for the whole group. ``D_f^2`` is that cost's increment per unit
  (``_marginal``), so the order within a group is unchanged and a layer gets dearer as it
  is cut. ``kappa_g`` is at least 1 (the additive score where channels are independent, or
  where ``Y_k`` was not probed). Scaling every unit by ``kappa_k`` instead (measured in
  BENCHMARKS as ``idap-linear``) saves the SE CNN too but costs up to 1.8 cosine points on
  MiniLM.

  A k x k Conv consumer whose border outputs read zero padding (static image size) counts
  ``||W_k[:, c]||^2 P_k`` over the taps that read the image, and, with mean compensation, adds
  the part of the mean a constant bias cannot restore there, ``mu_c^2 sum_p ||m_p - mbar||^2``
  (``_padded_conv_energy``, ``idap_onnx.conv_taps``). METHOD.md's ``var_c alone`` assumes the
  compensation exact, which it is only where every output reads the whole kernel: on the 4x4
  maps of the digits CNN, 12 of 16 outputs do not. Without padding both terms reduce to the
  formula above.
- ``paper``: the released code's ``(1/(C*H*W)) * mean_b ||ReLU(Y_{b,c})||_2 * ||W_c||_2`` on
  the producer output Y (for token tensors the norm runs over batch and tokens).
- ``wanda``: ``sqrt( sum_j W[c, j]^2 * ||X_j||^2 )``, the producer row weighted by its input
  channel norms (the structured Wanda score of onnxsim).
- ``l1``, ``l2``, ``random``: ``idap_onnx.planner.weight_scores``.

Block score (layer divergence, METHOD.md Sec. 3): ``D_l = E_x ||y - x|| / E_x ||y||``.
Scores are plain data: group id -> array per unit (NaN for a frozen group under the calibrated
scores: it is never removed, so its tensors are not probed), block name -> float. No graph is
edited.
"""

from __future__ import annotations

import numpy as np

from idap_onnx.calib.stats import WEIGHTED, CalibStats
from idap_onnx.conv_taps import (
    TapPatterns,
    dense_weight,
    mean_spread,
    tap_patterns,
    valid_energy,
)
from idap_onnx.dependency import SLICE, DependencyGraph
from idap_onnx.errors import UsageError
from idap_onnx.graph import attr
from idap_onnx.planner import weight_scores

UNIT_SCORES = ("idap", "paper", "wanda", "l1", "l2", "random")


def unit_scores(
    graph: DependencyGraph,
    stats: CalibStats | None,
    kind: str = "idap",
    *,
    mean_compensation: bool = True,
    seed: int = 0,
    coherence: bool = True,
) -> dict[str, np.ndarray]:
    """Group id -> one score per unit (module docstring); ``coherence=False`` drops
    ``kappa_k`` from ``idap`` (the additive form, for ablations)."""
    if kind in ("l1", "l2", "random"):
        return weight_scores(graph, kind, seed)
    if kind not in UNIT_SCORES:
        raise UsageError(f"unknown score '{kind}'; choose one of {', '.join(UNIT_SCORES)}")
    if stats is None:
        raise UsageError(f"score '{kind}' needs calibration data (--calib)")
    if kind == "idap":
        return _idap(graph, stats, mean_compensation, coherence)
    return _producer_scores(graph, stats, kind)


def _weighted_edits(graph: DependencyGraph, role: str):
    for edit in graph.edits:
        if edit.kind != SLICE or edit.role != role:
            continue
        node = graph.index.node_by_name[edit.node]
        if WEIGHTED.get(node.op_type) == edit.input:
            yield edit, node


def _accumulate(graph: DependencyGraph, tensor: str, values: np.ndarray, totals) -> None:
    """Add ``values`` (one per element of ``tensor``'s channel axis) into each element's unit."""
    group, unit = graph.element_units(tensor)
    n = min(len(values), len(group))
    group, unit, values = group[:n], unit[:n], values[:n]
    for gi in np.unique(group[group >= 0]):
        sel = (group == gi) & (unit >= 0)
        np.add.at(totals[gi], unit[sel], values[sel])


def _idap(graph: DependencyGraph, stats: CalibStats, mean_compensation: bool,
          coherence: bool = True):
    energy = [np.zeros(g.size) for g in graph.groups]  # sum_k e_kc / E||T_k||^2 per unit
    weighted = [np.zeros(g.size) for g in graph.groups]  # the same with kappa_k
    terms = _consumer_terms(graph, stats, mean_compensation)
    kappas = _kappas(graph, stats, terms, mean_compensation) if coherence else {}
    for node, x, e, out_energy in terms:
        _accumulate(graph, x, e / out_energy, energy)
        _accumulate(graph, x, kappas.get(node.name, 1.0) * e / out_energy, weighted)
    scores = []
    for e, ke in zip(energy, weighted, strict=True):
        total = float(e.sum())
        kappa = max(float(ke.sum()) / total, 1.0) if total > 0 else 1.0
        scores.append(np.sqrt(e * _marginal(e, kappa)))
    return _unmeasured_frozen(graph, scores)


def _marginal(e: np.ndarray, kappa: float) -> np.ndarray:
    """Per unit, ``1 + 2 (kappa - 1) r / N``: ``r`` its rank in its group (lowest ``e``
    first, 0-based), ``N`` the group's size. Removing the lowest fraction ``f`` of a group whose
    channels add up with coherence ``kappa`` changes the flow by about
    ``sum e (1 + (kappa - 1) f)``; this is that sum's increment per unit, so the first units
    cost their ``e`` and the last ``2 kappa - 1`` times it."""
    rank = np.empty(len(e))
    rank[np.argsort(e, kind="stable")] = np.arange(len(e))
    return 1.0 + 2.0 * (kappa - 1.0) * rank / max(len(e), 1)


def coherence(
    graph: DependencyGraph, stats: CalibStats, *, mean_compensation: bool = True
) -> dict[str, tuple[float, float]]:
    """Consumer name -> ``(kappa_k, sum_c e_kc / E||T_k||^2)``: its coherence and the additive
    estimate of removing all its inputs, relative to its flow tensor (module docstring)."""
    terms = _consumer_terms(graph, stats, mean_compensation)
    kappas = _kappas(graph, stats, terms, mean_compensation)
    additive: dict[str, float] = {}
    for node, _x, e, out_energy in terms:
        additive[node.name] = additive.get(node.name, 0.0) + float(e.sum()) / out_energy
    return {name: (kappas[name], additive[name]) for name in kappas}


def _consumer_terms(graph: DependencyGraph, stats: CalibStats, mean_compensation: bool):
    """``(consumer node, its input, e_kc per input element, E||T_k||^2 per sample)`` for
    every weighted consumer whose input and flow tensor were measured."""
    n = max(stats.samples, 1)
    terms = []
    for edit, node in _weighted_edits(graph, "consumer"):
        x = edit.tensor
        if x not in stats.channel_sumsq:
            continue
        w = graph.index.constant(node.input[edit.input]).astype(np.float64)
        if node.op_type == "Conv":  # a grouped Conv pruned per group: its group-1 equal
            w = dense_weight(w, int(attr(node, "group", 1)))
        y = node.output[0]
        out_energy = stats.energy.get(stats.flow.get(y, y), 0.0) / n
        if out_energy <= 0:
            continue
        m2 = stats.variance(x) if mean_compensation else stats.second_moment(x)
        taps = tap_patterns(node, graph.index.shape(x), w.shape) if edit.axis == 1 else None
        if taps is not None and taps.padded:
            e = _padded_conv_energy(w, taps, stats.mean(x), m2, mean_compensation)
        else:
            col = np.moveaxis(w, edit.axis, 0).reshape(w.shape[edit.axis], -1)
            w2 = (col**2).sum(axis=1)  # ||W_k[:, c]||^2 per input element
            positions = _positions(graph.index.shape(y) or (), _out_channels(node, w))
            e = w2 * m2 * positions
        terms.append((node, x, e, out_energy))
    return terms


def _kappas(graph, stats, terms, mean_compensation: bool) -> dict[str, float]:
    """Consumer name -> kappa_k from its terms (all of its inputs' e_kc summed)."""
    additive: dict[str, float] = {}
    nodes = {}
    for node, _x, e, _ in terms:
        additive[node.name] = additive.get(node.name, 0.0) + float(e.sum())
        nodes[node.name] = node
    return {name: _coherence(graph, stats, nodes[name], additive[name], mean_compensation)
            for name in additive}


def _coherence(
    graph: DependencyGraph, stats: CalibStats, node, additive: float, mean_compensation: bool
) -> float:
    """``kappa_k = E||Y_k - r_k||^2 / sum_c e_kc``: what removing every input channel of
    consumer k changes its output by, measured, over the additive estimate (1 when the channels'
    contributions are uncorrelated). ``r_k`` is what stays: the per-channel mean of ``Y_k``
    with mean compensation, the bias without. 1 where ``Y_k``'s moments were not probed."""
    y = node.output[0]
    if y not in stats.channel_sum or additive <= 0:
        return 1.0
    s, q = stats.channel_sum[y], stats.channel_sumsq[y]
    count = max(stats.channel_count[y], 1.0)  # positions per channel, all samples
    if mean_compensation:
        joint = q - s**2 / count
    else:
        bias = _bias(graph, node, len(s))
        joint = q - 2 * bias * s + count * bias**2
    joint_per_sample = float(np.maximum(joint, 0.0).sum()) / max(stats.samples, 1)
    return joint_per_sample / additive if joint_per_sample > 0 else 1.0


def _bias(graph: DependencyGraph, node, channels: int) -> np.ndarray:
    """The consumer's own bias per output channel (Conv/ConvTranspose input 2, Gemm's C
    times beta); zeros for MatMul or where it is not a constant of that length."""
    slot = 2 if node.op_type in ("Conv", "ConvTranspose", "Gemm") else None
    b = graph.index.constant(node.input[slot]) if slot and len(node.input) > slot else None
    if b is None or b.size != channels:
        return np.zeros(channels)
    beta = next((a.f for a in node.attribute if a.name == "beta"), 1.0)
    return b.astype(np.float64).reshape(-1) * (beta if node.op_type == "Gemm" else 1.0)


def _padded_conv_energy(
    w: np.ndarray, taps: TapPatterns, mu: np.ndarray, m2: np.ndarray, mean_compensation: bool
) -> np.ndarray:
    """Per input channel c of a Conv whose border outputs read zero padding, the output
    energy per sample that removing c changes (``idap_onnx.conv_taps``)::

        e_c = m2_c * sum_p sum_{t valid at p} ||W[:, c, t]||^2
            + mu_c^2 * sum_p ||m_p(c) - mbar(c)||^2        (with mean compensation only)

    ``m2`` is ``var`` with mean compensation, ``var + mu^2`` without; ``m_p(c) = sum_{t valid
    at p} W[:, c, t]`` and ``mbar`` its average over positions, the bias that compensation
    adds. The first term is METHOD.md's ``||W[:, c]||^2 m2_c P`` counted over the taps that read
    the image; the second is the mean that a constant bias cannot restore at the borders. Both
    reduce to METHOD.md's formula when no tap reads padding.
    """
    e = m2 * valid_energy(w, taps)
    if mean_compensation:
        e = e + mu**2 * mean_spread(w, taps)
    return e


def _out_channels(node, w: np.ndarray) -> int:
    if node.op_type == "Conv":
        return int(w.shape[0])
    if node.op_type == "ConvTranspose":
        return int(w.shape[1])
    if node.op_type == "Gemm":
        trans_b = any(a.name == "transB" and a.i for a in node.attribute)
        return int(w.shape[0] if trans_b else w.shape[1])
    return int(w.shape[-1])


def _positions(shape, out_channels: int) -> float:
    """Output positions per sample of a consumer: elements of one sample / output channels."""
    dims = [d for d in shape if isinstance(d, int)]
    if len(dims) != len(shape) or not dims:
        return 1.0
    per_sample = float(np.prod(dims[1:])) if len(dims) > 1 else float(dims[0])
    return max(per_sample / max(out_channels, 1), 1.0)


def _producer_scores(graph: DependencyGraph, stats: CalibStats, kind: str):
    total = [np.zeros(g.size) for g in graph.groups]
    n = max(stats.samples, 1)
    for edit, node in _weighted_edits(graph, "producer"):
        y = edit.tensor
        w = graph.index.constant(node.input[edit.input]).astype(np.float64)
        rows = np.moveaxis(w, edit.axis, 0)
        rows = rows.reshape(rows.shape[0], -1)
        if kind == "paper":
            if y not in stats.relu_norm:
                continue
            shape = graph.index.shape(y) or ()
            size = float(np.prod([d for d in shape[1:] if isinstance(d, int)]) or 1.0)
            value = (stats.relu_norm[y] / n) * np.sqrt((rows**2).sum(axis=1)) / size
        else:
            x = node.input[0]
            if x not in stats.channel_sumsq:
                continue
            xnorm2 = stats.channel_sumsq[x]
            cols = rows.shape[1] // max(len(xnorm2), 1)
            weights = np.repeat(xnorm2, cols) if cols * len(xnorm2) == rows.shape[1] else 1.0
            value = np.sqrt((rows**2 * weights).sum(axis=1))
        _accumulate(graph, y, np.asarray(value, dtype=np.float64), total)
    return _unmeasured_frozen(graph, total)


def _unmeasured_frozen(graph: DependencyGraph, per_group: list[np.ndarray]):
    """Group id -> scores, NaN for frozen groups (never removed, so never probed)."""
    return {
        g.id: np.full(g.size, np.nan) if g.frozen else per_group[gi]
        for gi, g in enumerate(graph.groups)
    }


def block_divergence(stats: CalibStats) -> dict[str, float]:
    """Block name -> D_l = E||y - x|| / E||y|| (lowest = adds least = removed first)."""
    return {
        name: (stats.block_diff[name] / stats.block_out[name]) if stats.block_out[name] else 0.0
        for name in stats.block_diff
    }
