"""Mean compensation: fold the mean of removed input channels into each consumer's bias.

Removing input element e of consumer k drops the term ``W_k[o, e] * a_e`` from every output o.
Writing ``a_e = mu_e + (a_e - mu_e)`` with ``mu_e`` the calibration mean of ``a_e``, the mean
part is a constant per output, so it can be kept by adding it to the bias:

    b_k[o] += sum_{e removed} sum_kernel W_k[o, e, ...] * mu_e

(for a k x k Conv the kernel sum weights each tap by the share of outputs at which it reads
the image, see below), after which removal loses only the centred part (the variance
``var_e``). Per consumer op:

- Conv (group 1), W ``[O, I, k...]``: ``b[o] += sum_e sum_t W[o, e, t] cover[t] mu_e``, with
  ``cover[t]`` the fraction of output positions at which tap t reads the image rather than the
  zero padding (``idap_onnx.conv_taps``; 1 for every tap when nothing reads padding, or when
  the input's spatial size is not static). This is the constant that best replaces the mean
  (least squares over the output positions): border outputs, which see fewer taps, receive
  less of it than interior ones, and the bias gives each the average. It is the average at
  the image size the graph was analysed at (``optimize``: the calibration samples' own); on
  larger images the borders weigh less and it moves toward the whole-kernel sum. A Conv grouped
  by rows (``oprules.conv_gemm``) is taken as the group-1 Conv it equals
  (``conv_taps.dense_weight``); depthwise and whole-group Convs record no consumer edit.
- ConvTranspose (group 1), W ``[I, O, k...]``: ``b[o] += sum_e sum_k W[e, o, k] mu_e / prod(s)``
  for strides s (each output position receives about ``1 / prod(s)`` of the kernel taps).
- Gemm ``alpha A' B' + beta C`` (``transB`` respected): ``C += alpha / beta * mu_r B'[r]``;
  an absent C becomes a ``[N]`` initializer, a scalar or ``[1]`` C is widened to ``[N]``, a
  ``[M, N]`` or ``[1, N]`` C gets the vector added to every row; a non-constant C, or
  ``beta == 0``, gets an ``Add`` after the Gemm instead.
- MatMul ``X W`` with W ``[K, N]`` constant: the bias lives in a following ``Add`` with a
  constant ``[N]`` vector (either input order), which gets the correction; without one, an
  ``Add(matmul_out, bias)`` is inserted (the MatMul writes a new tensor; the Add takes over the
  old name, so its consumers and graph outputs are rewired without other edits).

Exact for 1x1 convs and Gemm/MatMul (every output position sums the same inputs);
approximate at the zero-padded borders of k x k convs (the spread of the border outputs about
their average is lost; ``calib.scores`` counts it in the ``idap`` score) and for strided
ConvTranspose. Biases and weights shared by several nodes (the legacy exporter deduplicates
equal constants) are copied before they are changed.

The compensated model is *not yet pruned* and has the same channel groups, unit indices and
group ids as the input: a bias input or a bias ``Add`` creates no channel space, so the caller
can re-run ``analyze_model`` on it and apply the same removal dict (``prune_with_compensation``).
Passes never run sessions.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from idap_onnx.conv_taps import dense_weight, tap_patterns
from idap_onnx.dependency import SLICE, DependencyGraph, analyze_model
from idap_onnx.errors import SurgeryError, UsageError
from idap_onnx.graph import GraphIndex, Shape, attr

#: Consumer ops whose input columns compensation folds, with the weight input index.
CONSUMER_OPS = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}


class Params:
    """Copy-on-write writes to the constant inputs of the nodes of ``model`` (edited in place).

    A write to an initializer read by one node input replaces it; one read by several inputs
    (directly or through ``Identity`` chains) or a ``Constant`` node's value becomes a new
    initializer for this node input alone. New names never clash with existing tensors.
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.index = GraphIndex(model)
        self.nodes: dict[str, onnx.NodeProto] = {n.name: n for n in model.graph.node}
        self.inits: dict[str, onnx.TensorProto] = {t.name: t for t in model.graph.initializer}
        self.refs: Counter[str] = Counter()
        for node in model.graph.node:
            for name in node.input:
                init = self.index.initializer_name(name) if name else None
                if init is not None:
                    self.refs[init] += 1
        self.names: set[str] = set(self.inits)
        self.names |= {i.name for i in model.graph.input} | {o.name for o in model.graph.output}
        for node in model.graph.node:
            self.names |= {t for t in list(node.input) + list(node.output) if t}
        self.node_names: set[str] = set(self.nodes)
        self.private: set[tuple[str, int]] = set()
        self.values: dict[str, np.ndarray] = {}

    def get(self, node: onnx.NodeProto, i: int) -> np.ndarray | None:
        """The value of constant input ``i`` of ``node`` (None when absent or not constant)."""
        if len(node.input) <= i or not node.input[i]:
            return None
        name = node.input[i]
        if name in self.values:
            return self.values[name]
        return self.index.constant(name)

    def set(self, node: onnx.NodeProto, i: int, value: np.ndarray) -> None:
        """Write ``value`` into input ``i`` of ``node``, appending the input when absent."""
        value = np.ascontiguousarray(value)
        key = (node.name, i)
        while len(node.input) <= i:
            node.input.append("")
        current = node.input[i]
        init = self.index.initializer_name(current) if current else None
        if key in self.private or (init is not None and init == current and self.refs[init] == 1):
            name = current
        else:
            source = init or current
            name = self.fresh(f"{source}__{node.name}_{i}" if source else f"{node.name}__in{i}")
            node.input[i] = name
            self.private.add(key)
        self._store(name, value)

    def add_initializer(self, base: str, value: np.ndarray) -> str:
        name = self.fresh(base)
        self._store(name, np.ascontiguousarray(value))
        return name

    def _store(self, name: str, value: np.ndarray) -> None:
        tensor = numpy_helper.from_array(value, name)
        if name in self.inits:
            self.inits[name].CopyFrom(tensor)
        else:
            self.model.graph.initializer.append(tensor)
            self.inits[name] = self.model.graph.initializer[-1]
            if self.model.ir_version < 4:  # initializers must be graph inputs before IR 4
                self.model.graph.input.append(
                    helper.make_tensor_value_info(name, tensor.data_type, value.shape)
                )
        self.values[name] = value
        self.names.add(name)

    def fresh(self, base: str) -> str:
        name, k = base, 0
        while name in self.names:
            k += 1
            name = f"{base}_{k}"
        self.names.add(name)
        return name

    def fresh_node(self, base: str) -> str:
        name, k = base, 0
        while name in self.node_names:
            k += 1
            name = f"{base}_{k}"
        self.node_names.add(name)
        return name


def bias_add(model: onnx.ModelProto, index: GraphIndex, node: onnx.NodeProto):
    """The ``Add`` that holds the bias of MatMul ``node``: ``(add, input index of the bias)``.

    It must be the only reader of the MatMul's output (which is no graph output), and its
    other input an initializer with ``N`` elements on the last axis (``[N]``, ``[1, N]`` ...).
    None otherwise.
    """
    out = node.output[0]
    users = index.consumers.get(out, [])
    if len(users) != 1 or users[0].op_type != "Add" or out in index.output_names:
        return None
    add = users[0]
    if len(add.input) != 2 or add.input[0] == add.input[1]:
        return None
    j = 1 if add.input[0] == out else 0
    w = index.constant(node.input[1])
    value = index.constant(add.input[j])
    if w is None or value is None or index.initializer_name(add.input[j]) is None:
        return None
    n = int(w.shape[-1])
    if value.ndim == 0 or value.shape[-1] != n or value.size != n:
        return None
    return add, j


def insert_bias_add(params: Params, node: onnx.NodeProto, bias: np.ndarray) -> onnx.NodeProto:
    """Insert ``Add(node_out, bias)`` after ``node``: the node writes a new tensor and the Add
    takes over the old name, so every reader (and graph output) now sees the biased value."""
    graph = params.model.graph
    old = node.output[0]
    new = params.fresh(f"{old}__nobias")
    node.output[0] = new
    bias_name = params.add_initializer(f"{node.name}__bias", bias)
    add = helper.make_node(
        "Add", [new, bias_name], [old], name=params.fresh_node(f"{node.name}__bias_add")
    )
    position = next(k for k, n in enumerate(graph.node) if n.name == node.name) + 1
    graph.node.insert(position, add)
    params.nodes[add.name] = graph.node[position]
    return graph.node[position]


def compensate_means(
    model: onnx.ModelProto,
    graph: DependencyGraph,
    removal: Mapping[str, Iterable[int]],
    means: Mapping[str, np.ndarray],
) -> onnx.ModelProto:
    """Return a copy of ``model`` (not yet pruned) whose consumers absorb the removed means.

    For every consumer edit (Conv/ConvTranspose/Gemm/MatMul weight columns) whose input tensor
    T loses elements under ``removal``: ``b_k[o] += sum_{e removed} sum_kernel W_k[o, e, ...]
    * mu_e`` (see the module docstring for the per-op forms; a k x k Conv weights its taps by
    ``conv_taps.TapPatterns.cover`` when its input's image size is static). Exact for 1x1 conv
    and Gemm/MatMul; approximate at zero-padded borders of k x k convs.

    Args:
        model: the model ``graph`` was computed from (not modified).
        graph: its dependency graph (``analyze_model(model)``).
        removal: group id -> unit indices, as for ``prune_channels``.
        means: consumer input tensor T -> mean of each element of its channel axis
            (``CalibStats.mean(T)``; ``means_from_stats`` builds the mapping).

    Raises:
        UsageError: a tensor that loses elements has no mean, or one of the wrong length.
        KeyError: an unknown group id.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    removal = {gid: [int(u) for u in units] for gid, units in removal.items()}
    dead = graph.removed_channels(removal)
    params = Params(out)
    done: set[str] = set()
    for edit in graph.edits:
        if edit.kind != SLICE or edit.role != "consumer" or edit.node in done:
            continue
        node = params.nodes.get(edit.node)
        if node is None or CONSUMER_OPS.get(node.op_type) != edit.input:
            continue
        removed = ~graph.layouts[edit.tensor].keep_mask(dead)
        if not removed.any():
            continue
        if edit.tensor not in means:
            raise UsageError(
                f"no calibration mean for '{edit.tensor}' (input of '{edit.node}'); "
                "collect statistics with plan_probes on this model's graph"
            )
        mu = np.asarray(means[edit.tensor], dtype=np.float64).reshape(-1)
        if mu.shape[0] != removed.shape[0]:
            raise UsageError(
                f"mean of '{edit.tensor}' has {mu.shape[0]} entries, its channel axis "
                f"{removed.shape[0]}; collect statistics on this model"
            )
        done.add(edit.node)
        shape = graph.index.shape(edit.tensor)
        _COMPENSATE[node.op_type](params, node, removed, mu[removed], shape)
    return out


def means_from_stats(stats) -> dict[str, np.ndarray]:
    """``{tensor: mean per channel-axis element}`` for every tensor a ``CalibStats`` measured."""
    return {t: stats.mean(t) for t in stats.channel_sum}


def prune_with_compensation(
    model: onnx.ModelProto,
    removal: Mapping[str, Iterable[int]],
    means: Mapping[str, np.ndarray],
    input_shapes: dict[str, list[int]] | None = None,
) -> onnx.ModelProto:
    """Compensate the removed means, re-analyse, and prune ``removal`` (same group ids).

    Raises:
        SurgeryError: the compensated model's channel groups differ from the original's (a
            bug: compensation must not change them), or ``prune_channels`` fails.
    """
    from idap_onnx.passes.prune_channels import prune_channels

    graph = analyze_model(model, input_shapes)
    compensated = compensate_means(model, graph, removal, means)
    graph2 = analyze_model(compensated, input_shapes)
    if group_signature(graph) != group_signature(graph2):
        raise SurgeryError("mean compensation changed the channel groups; prune without it")
    return prune_channels(compensated, removal, graph=graph2)


def group_signature(graph: DependencyGraph) -> list[tuple]:
    """Group ids, producers, consumers, fixed flags and unit channels, comparable with ``==``."""
    return [
        (
            g.id,
            g.spaces,
            g.producers,
            g.consumers,
            g.fixed,
            tuple(tuple((s, tuple(c.tolist())) for s, c in sorted(u.items())) for u in g.units),
        )
        for g in graph.groups
    ]


# -- per-op compensation ------------------------------------------------------------------------


def _weight(params: Params, node: onnx.NodeProto) -> np.ndarray:
    w = params.get(node, 1)
    if w is None:
        raise SurgeryError(f"node '{node.name}': weight is not a constant")
    return w


def _add_to_bias(params: Params, node: onnx.NodeProto, i: int, delta: np.ndarray, dtype) -> None:
    """``input[i] += delta`` for a ``[N]`` bias input, creating a zero bias when absent."""
    bias = params.get(node, i)
    if bias is None:
        bias = np.zeros(delta.shape[0], dtype=dtype)
    new = (bias.astype(np.float64) + delta.reshape(bias.shape)).astype(bias.dtype)
    params.set(node, i, new)


def _conv(params: Params, node: onnx.NodeProto, removed: np.ndarray, mu: np.ndarray,
          shape: Shape | None) -> None:
    w = _weight(params, node)
    # grouped by rows (the only grouped Convs with a consumer edit): its group-1 equal
    dense = dense_weight(w, int(attr(node, "group", 1)))
    cols = dense[:, removed].astype(np.float64)  # [O, r, k...]
    cols = cols.reshape(cols.shape[0], cols.shape[1], -1)
    taps = tap_patterns(node, shape, w.shape)
    cover = taps.cover if taps is not None else np.ones(cols.shape[2])
    delta = (cols @ cover) @ mu
    _add_to_bias(params, node, 2, delta, w.dtype)


def _conv_transpose(params: Params, node: onnx.NodeProto, removed: np.ndarray,
                    mu: np.ndarray, shape: Shape | None) -> None:
    if int(attr(node, "group", 1)) != 1:
        return
    w = _weight(params, node)
    rows = w[removed].astype(np.float64)  # [r, O, k...]
    taps = rows.reshape(rows.shape[0], rows.shape[1], -1).sum(axis=2)
    strides = attr(node, "strides", None) or [1]
    delta = (mu @ taps) / float(np.prod(strides))
    _add_to_bias(params, node, 2, delta, w.dtype)


def _gemm(params: Params, node: onnx.NodeProto, removed: np.ndarray, mu: np.ndarray,
          shape: Shape | None) -> None:
    w = _weight(params, node)
    b = w.T if int(attr(node, "transB", 0)) else w  # [K, N]
    alpha = float(attr(node, "alpha", 1.0))
    beta = float(attr(node, "beta", 1.0))
    delta = alpha * (mu @ b[removed].astype(np.float64))  # [N]
    n = delta.shape[0]
    has_c = len(node.input) > 2 and bool(node.input[2])
    c = params.get(node, 2) if has_c else None
    if beta == 0.0 or (has_c and c is None):  # C ignored, or computed at run time
        insert_bias_add(params, node, delta.astype(w.dtype))
        return
    if c is None:
        if beta != 1.0:
            delta = delta / beta
        params.set(node, 2, delta.astype(w.dtype))
        return
    c64 = c.astype(np.float64)
    if c64.ndim <= 1 and c64.size in (1, n):
        new = np.broadcast_to(c64.reshape(-1), (n,)) + delta / beta
    elif c64.ndim == 2 and c64.shape[1] in (1, n):
        new = np.broadcast_to(c64, (c64.shape[0], n)) + delta / beta
    else:
        insert_bias_add(params, node, delta.astype(w.dtype))
        return
    params.set(node, 2, new.astype(c.dtype))


def _matmul(params: Params, node: onnx.NodeProto, removed: np.ndarray, mu: np.ndarray,
            shape: Shape | None) -> None:
    w = _weight(params, node)
    delta = mu @ w[removed].astype(np.float64)  # [N]
    found = bias_add(params.model, params.index, node)
    if found is None:
        insert_bias_add(params, node, delta.astype(w.dtype))
        return
    add, j = found
    add = params.nodes[add.name]
    _add_to_bias(params, add, j, delta, w.dtype)


_COMPENSATE = {
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "Gemm": _gemm,
    "MatMul": _matmul,
}
