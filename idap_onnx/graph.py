"""A read-only index over an ONNX graph: producers, consumers, constants and shapes.

Analyses (the dependency graph, block enumeration, accounting) read the model through this
index; nothing here edits a graph.
"""

from __future__ import annotations

from collections import defaultdict
from functools import cached_property

import numpy as np
import onnx
from onnx import numpy_helper

from idap_onnx.model_io import tensor_array

# Constants up to this size are cached as arrays by ``GraphIndex.constant``; larger ones (the
# weights) are decoded on each call, so an analysis does not hold a second copy of the model.
_CACHED_BYTES = 1 << 16

Dim = int | str | None
Shape = tuple[Dim, ...]


class GraphIndex:
    """Producers, consumers, constants and inferred shapes of one model's main graph.

    The model must carry inferred shapes (``idap_onnx.shapes.infer_shapes``) for the shape
    queries to answer; nodes must have unique names (``idap_onnx.model_io.load_model``).
    """

    def __init__(self, model: onnx.ModelProto, shapes: dict[str, Shape] | None = None) -> None:
        self.model = model
        self._given_shapes = shapes
        self.graph = model.graph
        self.nodes: list[onnx.NodeProto] = list(model.graph.node)
        self.node_by_name: dict[str, onnx.NodeProto] = {n.name: n for n in self.nodes}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.nodes:
            for out in node.output:
                if out:
                    self.producer[out] = node
            for inp in node.input:
                if inp:
                    self.consumers[inp].append(node)
        self.initializers: dict[str, onnx.TensorProto] = {t.name: t for t in self.graph.initializer}
        self.input_names: list[str] = [
            i.name for i in self.graph.input if i.name not in self.initializers
        ]
        self.output_names: list[str] = [o.name for o in self.graph.output]
        self._arrays: dict[str, np.ndarray] = {}

    @cached_property
    def opset(self) -> int:
        """The default-domain opset version."""
        for imp in self.model.opset_import:
            if imp.domain in ("", "ai.onnx"):
                return int(imp.version)
        return 1

    @cached_property
    def shapes(self) -> dict[str, Shape]:
        """Tensor name -> shape (int, symbolic name, or None per dim) for every known tensor:
        the shapes given to the index, else the model's ``value_info``, inputs and outputs."""
        shapes: dict[str, Shape] = {}
        if self._given_shapes is not None:
            shapes.update(self._given_shapes)
            for name, t in self.initializers.items():
                shapes[name] = tuple(int(d) for d in t.dims)
            return shapes
        infos = list(self.graph.value_info) + list(self.graph.input) + list(self.graph.output)
        for vi in infos:
            tt = vi.type.tensor_type
            if not tt.HasField("shape"):
                continue
            shapes[vi.name] = tuple(
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                for d in tt.shape.dim
            )
        for name, t in self.initializers.items():
            shapes[name] = tuple(int(d) for d in t.dims)
        return shapes

    def shape(self, name: str) -> Shape | None:
        """The inferred shape of ``name``, or None when unknown."""
        return self.shapes.get(name)

    def rank(self, name: str) -> int | None:
        shape = self.shape(name)
        return None if shape is None else len(shape)

    def initializer_name(self, name: str) -> str | None:
        """The initializer behind ``name``, through ``Identity`` chains (legacy exporter dedup)."""
        seen = 0
        while name not in self.initializers:
            node = self.producer.get(name)
            if node is None or node.op_type != "Identity" or seen > 16:
                return None
            name, seen = node.input[0], seen + 1
        return name

    def constant(self, name: str) -> np.ndarray | None:
        """The value of ``name`` when it is an initializer, an Identity of one, or a Constant
        (a weight that ``model_io.offloaded`` holds on disk is read from its file)."""
        init = self.initializer_name(name)
        if init is not None:
            if init in self._arrays:
                return self._arrays[init]
            array = tensor_array(self.initializers[init])
            if array.nbytes <= _CACHED_BYTES:  # shapes, axes, indices: read again and again
                self._arrays[init] = array
            return array
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
                if attr.name == "value_ints":
                    return np.array(list(attr.ints), dtype=np.int64)
                if attr.name == "value_int":
                    return np.array(attr.i, dtype=np.int64)
                if attr.name == "value_float":
                    return np.array(attr.f, dtype=np.float32)
                if attr.name == "value_floats":
                    return np.array(list(attr.floats), dtype=np.float32)
        return None

    def is_constant(self, name: str) -> bool:
        return self.constant(name) is not None

    def node(self, name: str) -> onnx.NodeProto:
        return self.node_by_name[name]


def needed_indices(graph: onnx.GraphProto, names) -> list[int] | None:
    """Indices (ascending, so in graph order) of the nodes that tensors ``names`` depend on;
    None (all nodes) when one of them has a subgraph (its body may read outer tensors that
    are not node inputs). Indices, not node objects: protobuf wrappers are not stable keys."""
    nodes = graph.node
    producer = {out: i for i, node in enumerate(nodes) for out in node.output}
    need: set[int] = set()
    stack = list(names)
    while stack:
        i = producer.get(stack.pop())
        if i is None or i in need:
            continue
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for a in nodes[i].attribute):
            return None
        need.add(i)
        stack.extend(t for t in nodes[i].input if t)
    return sorted(need)


def attr(node: onnx.NodeProto, name: str, default=None):
    """The value of attribute ``name`` of ``node`` (python types), or ``default``."""
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default
