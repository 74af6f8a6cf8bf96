"""Parameters and multiply-accumulates (MACs) of an ONNX graph, per node and in total.

An analysis: it reads a model and returns plain data; the caller's model is never edited.

Parameters are elements of float tensors that nodes read as data: float initializers and float
``Constant`` nodes (an unfolded export). Integer tensors (shapes, indices, axes) and the float
``roi``/``scales`` inputs of ``Resize``/``Upsample`` are not parameters. Each tensor counts once,
attributed to its first consumer in graph order. ``Identity`` hops are looked through: the
legacy torch exporter deduplicates equal constants as ``Identity(W)`` nodes, so the alias is
charged to the node that reads it, never to the ``Identity`` node, and the root ``W`` is not
counted a second time for it. Each alias is its own tensor (one per consuming layer, as in the
torch module), since the exporter merges by *value*: the zero biases of a random-init network
are merged although they belong to different layers.

MACs follow the fvcore/thop convention: only contractions count, once per multiply-add, for one
forward pass at the resolved input shapes; bias additions, element-wise ops, activations,
normalizations, pooling and resizes are 0. ``FLOPs = 2 * MACs``. The formulas:

- ``Conv``: ``N * C_out * prod(out_spatial) * (C_in / group) * prod(kernel)``
- ``ConvTranspose``: ``N * C_in * prod(in_spatial) * (C_out / group) * prod(kernel)``
- ``Gemm``: ``M * N * K`` (``transA``/``transB`` respected)
- ``MatMul``: ``prod(broadcast batch) * M * N * K`` (numpy rules, 1-D operands included),
  constant weights and activation x activation alike
- ``Einsum`` with two operands: the product of the sizes of all its index letters (ellipsis dims
  broadcast); one operand is a transpose or reduction (0); three or more are left unresolved
- ``Attention`` (opset 23): ``B * H_q * S_q * S_kv * (D_qk + D_v)`` (scores and weighted sum)
- ``RNN``/``GRU``/``LSTM``: ``seq * batch * (numel(W) + numel(R))``

Shapes come from ONNX shape inference with data propagation on a light copy of the model, with
graph input dims taken from ``input_shapes`` and every other unknown input dim set to
``default_dim``, then shape folding (``shapes.complete_shapes``). Where a MAC-bearing node's
shapes are still unknown (the attention masks that dynamo exports build with ``Range``, whose
unknown dims broadcast into the scores and everything after), the tensors it reads and writes
are measured by one ONNX Runtime run on generated inputs of those same dims
(``shapes.probe_shapes``), the last step of the channel analysis's ``shapes.analysis_shapes``.
The invariant: every Conv/ConvTranspose/Gemm/MatMul/Attention/RNN/GRU/LSTM node (and two-operand
``Einsum``) of a model that ONNX Runtime can run at those dims is resolved; ``unresolved`` lists
only nodes of models it cannot run (unknown custom ops) and Einsums of three or more operands.
The run happens only when static inference and folding leave such a node unresolved, so the
result on every other model is theirs alone. Sequence models (transformers) need their
sequence length given through ``input_shapes`` (``--input-shape`` on the command line): the
default of 1 gives one token; ``shapes.concrete_input_shapes`` gives the analysis's defaults
(batch 1, every other symbolic dim 32), which ``api.inspect`` passes.
Only the main graph is costed: nodes inside ``If``/``Loop`` bodies and model-local functions
count 0, though outer tensors they read are charged to the ``If``/``Loop`` node.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import onnx
from onnx import helper, shape_inference

from idap_onnx.conv_taps import conv_pads
from idap_onnx.errors import UsageError
from idap_onnx.shapes import complete_shapes, probe_shapes

__all__ = ["ModelCost", "NodeCost", "format_count", "model_cost"]

Shape = tuple[int | None, ...]
ShapeMap = Mapping[str, Shape]
MacRule = Callable[[onnx.NodeProto, ShapeMap], int | None]

_FLOAT_TYPES = frozenset(
    t
    for t in (
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.FLOAT16,
        onnx.TensorProto.BFLOAT16,
        onnx.TensorProto.DOUBLE,
        getattr(onnx.TensorProto, "FLOAT8E4M3FN", None),
        getattr(onnx.TensorProto, "FLOAT8E4M3FNUZ", None),
        getattr(onnx.TensorProto, "FLOAT8E5M2", None),
        getattr(onnx.TensorProto, "FLOAT8E5M2FNUZ", None),
        getattr(onnx.TensorProto, "FLOAT4E2M1", None),
    )
    if t is not None
)
# (op_type, input slot) pairs whose float tensors configure the op rather than feed it data.
_NON_DATA_SLOTS = frozenset({("Resize", 1), ("Resize", 2), ("Upsample", 1)})
# Float initializers up to this many elements stay in the shape-inference copy, so data
# propagation can read them (Resize scales); bigger ones become shape-only graph inputs.
_INLINE_LIMIT = 1024


@dataclass(frozen=True)
class NodeCost:
    """The cost of one node.

    Attributes:
        name: The node's name (``"<op_type>_<index>"`` when the node has none).
        op_type: The node's operator.
        params: Elements of the float tensors this node is the first to read as data.
        macs: Multiply-accumulates for one forward pass at the resolved input shapes.
    """

    name: str
    op_type: str
    params: int
    macs: int


@dataclass(frozen=True)
class ModelCost:
    """The cost of a model: totals, per-node costs in graph order, and what went uncounted.

    Attributes:
        params: Elements of all parameter tensors, each counted once.
        macs: Sum of the nodes' MACs.
        nodes: One entry per node of the main graph, in graph order.
        unresolved: Names of MAC-bearing nodes whose shapes could not be resolved (counted 0).
    """

    params: int
    macs: int
    nodes: tuple[NodeCost, ...]
    unresolved: tuple[str, ...]

    @property
    def flops(self) -> int:
        """Floating-point operations, ``2 * macs`` (a multiply and an add per MAC)."""
        return 2 * self.macs

    def by_name(self) -> dict[str, NodeCost]:
        """Returns the node costs keyed by node name (the first node wins on a repeated name)."""
        costs: dict[str, NodeCost] = {}
        for node in self.nodes:
            costs.setdefault(node.name, node)
        return costs


def model_cost(
    model: onnx.ModelProto,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    *,
    default_dim: int = 1,
) -> ModelCost:
    """Counts the parameters and MACs of ``model`` (formulas in the module docstring).

    Args:
        model: The model; not modified.
        input_shapes: Concrete shapes for graph inputs by name, overriding declared dims.
        default_dim: The value for every input dim still unknown or symbolic (batch, sequence).

    Returns:
        The totals, the per-node costs and the MAC-bearing nodes left unresolved.

    Raises:
        UsageError: ``input_shapes`` names an unknown input, has the wrong rank or a dim < 1,
            or ``default_dim`` is below 1.
    """
    graph = model.graph
    shapes = _resolved_shapes(model, input_shapes or {}, default_dim)
    params = _params_per_node(graph)
    nodes: list[NodeCost] = []
    unresolved: list[str] = []
    for index, node in enumerate(graph.node):
        name = node.name or f"{node.op_type}_{index}"
        rule = _MAC_RULES.get((_domain(node), node.op_type))
        macs = rule(node, shapes) if rule else 0
        if macs is None:
            unresolved.append(name)
            macs = 0
        nodes.append(NodeCost(name, node.op_type, params.get(index, 0), macs))
    return ModelCost(
        params=sum(n.params for n in nodes),
        macs=sum(n.macs for n in nodes),
        nodes=tuple(nodes),
        unresolved=tuple(unresolved),
    )


def format_count(n: int) -> str:
    """Formats a count with three significant digits and a unit: ``4.09 G``, ``25.6 M``, ``1.2 K``.

    Counts below 1000 are written in full (``"999"``).
    """
    units = ("", " K", " M", " G", " T", " P", " E")
    value, unit = float(n), 0
    while unit < len(units) - 1 and abs(float(f"{value:.3g}")) >= 1000:
        value, unit = value / 1000, unit + 1
    if unit == 0:
        return str(n)
    text = f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return text + units[unit]


# --- shapes -------------------------------------------------------------------------------


def _resolved_shapes(
    model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]], default_dim: int
) -> dict[str, Shape]:
    """The shapes the MAC rules read: :func:`_inferred_shapes`, then, only if some MAC-bearing
    node is still unresolved, the unknown tensors of those nodes measured by one ONNX Runtime
    run (``shapes.probe_shapes``) at the same input dims.

    Invariant: a tensor whose inferred shape is fully known is never replaced, so a model whose
    nodes all resolve statically gets exactly the shapes (and MACs) of static inference.
    """
    shapes = _inferred_shapes(model, input_shapes, default_dim)
    missing = _unresolved_tensors(model.graph, shapes)
    if not missing:
        return shapes
    dims = _input_dims(model.graph, input_shapes, default_dim)
    if dims is None:
        return shapes
    try:
        measured = probe_shapes(model, dims, missing, known=shapes)
    except (KeyError, TypeError, ValueError):  # an input ORT cannot be fed; best effort
        return shapes
    shapes.update((name, tuple(int(d) for d in shape)) for name, shape in measured.items())
    return shapes


def _unresolved_tensors(graph: onnx.GraphProto, shapes: ShapeMap) -> list[str]:
    """Inputs and outputs, not fully known, of the MAC-bearing nodes whose rule gives ``None``."""
    missing: dict[str, None] = {}
    for node in graph.node:
        rule = _MAC_RULES.get((_domain(node), node.op_type))
        if rule is None or rule(node, shapes) is not None:
            continue
        for name in (*node.input, *node.output):
            if name and not _known(shapes.get(name)):
                missing[name] = None
    return list(missing)


def _input_dims(
    source: onnx.GraphProto, input_shapes: Mapping[str, Sequence[int]], default_dim: int
) -> dict[str, list[int]] | None:
    """The dims :func:`_set_input_dims` gives each non-initializer graph input, or ``None`` when
    an input is not a tensor of known rank and element type (it cannot be generated)."""
    graph = onnx.GraphProto()
    graph.input.extend(source.input)
    _set_input_dims(graph, source, input_shapes, default_dim)
    weights = {init.name for init in source.initializer}
    dims: dict[str, list[int]] = {}
    for vi in graph.input:
        if vi.name in weights:
            continue
        tensor = vi.type.tensor_type
        if not (vi.type.HasField("tensor_type") and tensor.HasField("shape") and tensor.elem_type):
            return None
        dims[vi.name] = [d.dim_value for d in tensor.shape.dim]
    return dims


def _inferred_shapes(
    model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]], default_dim: int
) -> dict[str, Shape]:
    """Infers the shape of every tensor of the main graph on a light copy of ``model``."""
    if default_dim < 1:
        raise UsageError(f"default_dim is {default_dim}; pass a dim of 1 or more")
    light = _light_copy(model)
    _set_input_dims(light.graph, model.graph, input_shapes, default_dim)
    try:
        inferred = shape_inference.infer_shapes(light, data_prop=True)
        inferred = complete_shapes(inferred)  # dims that data propagation leaves unknown
    except (shape_inference.InferenceError, onnx.checker.ValidationError):
        inferred = light  # best effort: the nodes whose shapes stay unknown are unresolved
    g = inferred.graph
    shapes = {vi.name: _dims(vi.type) for vi in (*g.input, *g.value_info, *g.output)}
    for init in model.graph.initializer:
        shapes[init.name] = tuple(int(d) for d in init.dims)
    return {name: dims for name, dims in shapes.items() if dims is not None}


def _light_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """Copies the model for shape inference: no value_info, no output shapes, no large weights.

    Float initializers above ``_INLINE_LIMIT`` elements become graph inputs of the same type
    and shape, which shape inference needs; their data is not copied (no 2 GB limit).
    """
    source = model.graph
    light = onnx.ModelProto(ir_version=model.ir_version)
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    graph = light.graph
    graph.name = source.name
    graph.node.extend(source.node)
    graph.input.extend(source.input)
    graph.sparse_initializer.extend(source.sparse_initializer)
    for output in source.output:
        graph.output.add().CopyFrom(output)
        if output.type.HasField("tensor_type"):
            graph.output[-1].type.tensor_type.ClearField("shape")
    input_names = {vi.name for vi in source.input}
    for init in source.initializer:
        if init.data_type in _FLOAT_TYPES and math.prod(init.dims) > _INLINE_LIMIT:
            if init.name not in input_names:
                graph.input.append(
                    helper.make_tensor_value_info(init.name, init.data_type, list(init.dims))
                )
        else:
            graph.initializer.append(init)
    return light


def _set_input_dims(
    graph: onnx.GraphProto,
    source: onnx.GraphProto,
    input_shapes: Mapping[str, Sequence[int]],
    default_dim: int,
) -> None:
    """Writes ``input_shapes`` into the graph inputs and ``default_dim`` into unknown dims."""
    weights = {init.name for init in source.initializer}
    inputs = {vi.name: vi for vi in graph.input if vi.type.HasField("tensor_type")}
    available = [name for name in inputs if name not in weights]
    for name, dims in input_shapes.items():
        if name not in inputs:
            raise UsageError(
                f"input shape given for '{name}', which is not a graph input; "
                f"the inputs are: {', '.join(available)}"
            )
        if any(int(d) < 1 for d in dims):
            raise UsageError(f"input shape {list(dims)} for '{name}' has a dim below 1")
        shape = inputs[name].type.tensor_type.shape
        declared = len(shape.dim)
        if inputs[name].type.tensor_type.HasField("shape") and declared != len(dims):
            raise UsageError(
                f"input shape {list(dims)} for '{name}' has rank {len(dims)}, "
                f"but the model declares rank {declared}; give {declared} dims"
            )
        shape.ClearField("dim")
        for d in dims:
            shape.dim.add().dim_value = int(d)
    for name in available:
        for dim in inputs[name].type.tensor_type.shape.dim:
            if not dim.HasField("dim_value") or dim.dim_value < 1:
                dim.dim_value = default_dim


def _dims(type_proto: onnx.TypeProto) -> Shape | None:
    """Returns a tensor type's dims (``None`` for an unknown dim), or ``None`` without a shape."""
    if not type_proto.HasField("tensor_type") or not type_proto.tensor_type.HasField("shape"):
        return None
    return tuple(
        d.dim_value if d.HasField("dim_value") else None for d in type_proto.tensor_type.shape.dim
    )


# --- parameters ---------------------------------------------------------------------------


def _params_per_node(graph: onnx.GraphProto) -> dict[int, int]:
    """Maps node index to the elements of the parameter tensors it is the first to read."""
    sizes = _float_tensor_sizes(graph)
    charged: set[str] = set()
    params: dict[int, int] = {}
    for index, node in enumerate(graph.node):
        if node.op_type == "Identity" and _domain(node) == "" and node.input[0] in sizes:
            sizes[node.output[0]] = sizes[node.input[0]]  # an alias, charged to its reader
            continue
        for slot, name in _data_inputs(node):
            data = (node.op_type, slot) not in _NON_DATA_SLOTS
            if data and name in sizes and name not in charged:
                charged.add(name)
                params[index] = params.get(index, 0) + sizes[name]
    return params


def _float_tensor_sizes(graph: onnx.GraphProto) -> dict[str, int]:
    """Element counts of the float initializers and float ``Constant`` outputs by name."""
    sizes = {
        init.name: math.prod(init.dims)
        for init in graph.initializer
        if init.data_type in _FLOAT_TYPES
    }
    for sparse in graph.sparse_initializer:
        if sparse.values.data_type in _FLOAT_TYPES:
            sizes[sparse.values.name] = math.prod(sparse.dims)
    for node in graph.node:
        if node.op_type != "Constant" or _domain(node) != "" or not node.attribute:
            continue
        attr = node.attribute[0]
        if attr.name == "value" and attr.t.data_type in _FLOAT_TYPES:
            sizes[node.output[0]] = math.prod(attr.t.dims)
        elif attr.name == "sparse_value" and attr.sparse_tensor.values.data_type in _FLOAT_TYPES:
            sizes[node.output[0]] = math.prod(attr.sparse_tensor.dims)
        elif attr.name == "value_float":
            sizes[node.output[0]] = 1
        elif attr.name == "value_floats":
            sizes[node.output[0]] = len(attr.floats)
    return sizes


def _data_inputs(node: onnx.NodeProto) -> Iterator[tuple[int, str]]:
    """Yields ``(slot, name)`` for the node's inputs, then ``(-1, name)`` for outer-scope names
    read inside its subgraphs (``If``/``Loop``/``Scan`` bodies)."""
    yield from ((slot, name) for slot, name in enumerate(node.input) if name)
    for attr in node.attribute:
        for sub in (*([attr.g] if attr.HasField("g") else []), *attr.graphs):
            local = {i.name for i in (*sub.input, *sub.initializer)}
            for inner in sub.node:
                for _, name in _data_inputs(inner):
                    if name not in local:
                        yield -1, name
                local.update(inner.output)


def _domain(node: onnx.NodeProto) -> str:
    return "" if node.domain == "ai.onnx" else node.domain


# --- MAC rules ----------------------------------------------------------------------------


def _known(dims: Shape | None) -> bool:
    return dims is not None and all(d is not None for d in dims)


def _shape(
    shapes: ShapeMap, node: onnx.NodeProto, slot: int, *, output: bool = False
) -> Shape | None:
    """The shape of the node's input (or output) ``slot``; ``None`` if absent or unknown."""
    names = node.output if output else node.input
    return shapes.get(names[slot]) if slot < len(names) and names[slot] else None


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    """The value of the node's attribute ``name`` (bytes for strings), or ``default``."""
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def _conv_macs(node: onnx.NodeProto, shapes: ShapeMap) -> int | None:
    """``N * C_out * prod(out_spatial) * (C_in / group) * prod(kernel)``.

    The weight ``[C_out, C_in / group, *kernel]`` gives all but ``N`` and the output spatial
    dims, which come from the inferred output or else from the attributes.
    """
    x, w, y = _shape(shapes, node, 0), _shape(shapes, node, 1), _shape(shapes, node, 0, output=True)
    if not _known(w):
        return None
    if not (_known(y) and len(y) == len(w)):
        y = _conv_output_shape(node, x, w) if _known(x) and len(x) == len(w) else None
    return math.prod(y[:1]) * math.prod(y[2:]) * math.prod(w) if _known(y) else None


def _conv_output_shape(node: onnx.NodeProto, x: Shape, w: Shape) -> Shape:
    """The Conv output ``[N, C_out, *spatial]`` from its attributes (ONNX Conv formula:
    ``(size + pad_begin + pad_end - span) // stride + 1``, pads from ``conv_taps.conv_pads``)."""
    spatial = len(x) - 2
    kernel = _attr(node, "kernel_shape", None) or list(w[2:])
    strides = _attr(node, "strides", None) or [1] * spatial
    dilations = _attr(node, "dilations", None) or [1] * spatial
    pads = conv_pads(node, x[2:], kernel, strides, dilations)
    out = []
    for i in range(spatial):
        span = dilations[i] * (kernel[i] - 1) + 1
        out.append((x[i + 2] + pads[i] + pads[i + spatial] - span) // strides[i] + 1)
    return (x[0], w[0], *out)


def _conv_transpose_macs(node: onnx.NodeProto, shapes: ShapeMap) -> int | None:
    """``N * C_in * prod(in_spatial) * (C_out / group) * prod(kernel)``.

    Every input pixel is multiplied by the ``[C_in, C_out / group, *kernel]`` weight once.
    """
    x, w = _shape(shapes, node, 0), _shape(shapes, node, 1)
    if not (_known(x) and _known(w)):
        return None
    return x[0] * math.prod(x[2:]) * math.prod(w)


def _gemm_macs(node: onnx.NodeProto, shapes: ShapeMap) -> int | None:
    """``M * N * K`` for ``A'[M, K] @ B'[K, N]``, ``A'``/``B'`` transposed per transA/transB."""
    a, b, y = _shape(shapes, node, 0), _shape(shapes, node, 1), _shape(shapes, node, 0, output=True)
    if _known(a) and len(a) == 2:
        m, k = reversed(a) if _attr(node, "transA", 0) else a
    elif _known(y) and _known(b) and len(b) == 2:
        m, k = y[0], (b[1] if _attr(node, "transB", 0) else b[0])
    else:
        return None
    if _known(b) and len(b) == 2:
        n = b[0] if _attr(node, "transB", 0) else b[1]
    elif _known(y) and len(y) == 2:
        n = y[1]
    else:
        return None
    return m * n * k


def _matmul_macs(node: onnx.NodeProto, shapes: ShapeMap) -> int | None:
    """``prod(broadcast batch) * M * N * K``, i.e. ``numel(output) * K``, by numpy rules.

    A 1-D ``A`` of ``[K]`` has no ``M``, a 1-D ``B`` of ``[K]`` has no ``N``.
    """
    a, b, y = _shape(shapes, node, 0), _shape(shapes, node, 1), _shape(shapes, node, 0, output=True)
    if not a or not b:
        return None
    k = a[-1] if a[-1] is not None else b[-2] if len(b) >= 2 else b[0]
    out = _matmul_output(a, b) if _known(a) and _known(b) else y
    return math.prod(out) * k if k is not None and _known(out) else None


def _matmul_output(a: Shape, b: Shape) -> Shape:
    n = b[-1:] if len(b) >= 2 else ()
    return (*_broadcast(a[:-2], b[:-2]), *a[-2:-1], *n)


def _broadcast(*shapes: Shape) -> Shape:
    rank = max((len(s) for s in shapes), default=0)
    padded = [(1,) * (rank - len(s)) + tuple(s) for s in shapes]
    return tuple(max(dims) for dims in zip(*padded, strict=True))


def _einsum_macs(node: onnx.NodeProto, shapes: ShapeMap) -> int | None:
    """Two operands: ``prod(size of every index letter) * prod(broadcast ellipsis dims)``.

    That is the multiply-adds of a direct pairwise contraction (``bhsd,bhtd->bhst`` gives
    ``B * H * S * T * D``). One operand (a transpose, trace or sum) is 0; three or more are
    unresolved, since their cost depends on the contraction order.
    """
    terms = _attr(node, "equation", b"").decode().replace(" ", "").split("->")[0].split(",")
    if len(terms) == 1:
        return 0
    operands = [_shape(shapes, node, i) for i in range(len(node.input))]
    if len(terms) != 2 or len(operands) != 2 or not all(_known(s) for s in operands):
        return None
    letters: dict[str, int] = {}
    ellipses = []
    for term, dims in zip(terms, operands, strict=True):
        head, dots, tail = term.partition("...")
        ellipsis_rank = len(dims) - len(head) - len(tail)
        if ellipsis_rank < 0 or (ellipsis_rank and not dots):
            return None  # the equation does not match the operand's rank
        ellipses.append(dims[len(head) : len(head) + ellipsis_rank])
        sizes = (*dims[: len(head)], *dims[len(head) + ellipsis_rank :])
        for letter, size in zip(head + tail, sizes, strict=True):
            letters[letter] = max(size, letters.get(letter, 1))
    return math.prod(letters.values()) * math.prod(_broadcast(*ellipses))


def _attention_macs(node: onnx.NodeProto, shapes: ShapeMap) -> int | None:
    """``B * H_q * S_q * S_kv * (D_qk + D_v)``: ``Q K^T`` plus ``softmax(.) V``.

    4-D inputs are ``[B, H, S, D]``; 3-D inputs are ``[B, S, H * D]`` with the head counts in
    ``q_num_heads``/``kv_num_heads``. ``S_kv`` includes the ``past_key`` length.
    """
    q, k, v = (_shape(shapes, node, i) for i in range(3))
    past = _shape(shapes, node, 4)
    if not (_known(q) and _known(k) and _known(v)) or (past is not None and not _known(past)):
        return None
    past_len = past[2] if past else 0
    if len(q) == 4:
        batch, q_heads, q_len, d_qk = q
        return batch * q_heads * q_len * (k[2] + past_len) * (d_qk + v[3])
    q_heads, kv_heads = _attr(node, "q_num_heads", 0), _attr(node, "kv_num_heads", 0)
    if not (q_heads and kv_heads):
        return None
    return q[0] * q[1] * (k[1] + past_len) * (q[2] + v[2] * q_heads // kv_heads)


def _recurrent_macs(node: onnx.NodeProto, shapes: ShapeMap) -> int | None:
    """``seq * batch * (numel(W) + numel(R))``: every gate of every direction, every step.

    ``W`` is ``[directions, gates * hidden, input]`` and ``R`` ``[directions, gates * hidden,
    hidden]``; ``X`` is ``[seq, batch, input]`` (``[batch, seq, input]`` when ``layout=1``).
    """
    x, w, r = (_shape(shapes, node, i) for i in range(3))
    if not (_known(x) and _known(w) and _known(r)):
        return None
    return x[0] * x[1] * (math.prod(w) + math.prod(r))


_MAC_RULES: dict[tuple[str, str], MacRule] = {
    ("", "Conv"): _conv_macs,
    ("", "ConvTranspose"): _conv_transpose_macs,
    ("", "Gemm"): _gemm_macs,
    ("", "MatMul"): _matmul_macs,
    ("", "Einsum"): _einsum_macs,
    ("", "Attention"): _attention_macs,
    ("", "RNN"): _recurrent_macs,
    ("", "GRU"): _recurrent_macs,
    ("", "LSTM"): _recurrent_macs,
}
