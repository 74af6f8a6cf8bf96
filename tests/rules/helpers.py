"""Small helpers for the op-rule tests: build a tiny graph, analyze it, prune it, compare.

A test reads like an example::

    model = parse('''
        g (float[1,3,8,8] x) => (float[1,5,8,8] y) {
            a = Conv(x, W1)
            r = Relu(a)
            y = Conv(r, W2)
        }''', W1=(4, 3, 1, 1), W2=(5, 4, 1, 1))
    assert_exact(model, {"a": [0, 2]})   # remove units 0 and 2 of the group Conv 'a' produces

Nodes are named after their first output (``a = Conv(...)`` is node ``a``), so a removal names
a producer node and the helpers resolve it to its channel group.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort
from onnx import numpy_helper

from idap_onnx.dependency import ChannelGroup, DependencyGraph, analyze_model
from idap_onnx.passes.prune_channels import prune_channels, zero_units

OPSET = 17
REL_TOL = 1e-5

Shape = tuple[int, ...]


def _ir_version(opset: int) -> int:
    return 8 if opset <= 18 else 9 if opset <= 20 else 10


def parse(
    text: str,
    opset: int = OPSET,
    *,
    seed: int = 0,
    domains: Mapping[str, int] | None = None,
    **inits: Shape | list | np.ndarray,
) -> onnx.ModelProto:
    """Parse a graph written in the ONNX text syntax (without the ``<...>`` header) at
    ``opset`` (plus custom ``domains``: name -> version) and add each keyword as an
    initializer: an array as given, or a seeded random float32 tensor of the given shape.
    Unnamed nodes get the name of their first output."""
    imports = [f'"" : {opset}'] + [f'"{d}" : {v}' for d, v in (domains or {}).items()]
    header = f"<ir_version: {_ir_version(opset)}, opset_import: [{', '.join(imports)}]>\n"
    model = onnx.parser.parse_model(header + text)
    rng = np.random.default_rng(seed)
    for name, value in inits.items():
        if isinstance(value, np.ndarray):
            array = value
        else:
            array = (rng.standard_normal(tuple(value)) * 0.5).astype(np.float32)
        model.graph.initializer.append(numpy_helper.from_array(array, name))
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = node.output[0] if node.output and node.output[0] else f"n{i}"
    return model


def analyze(model: onnx.ModelProto) -> DependencyGraph:
    return analyze_model(model)


def group_of(graph: DependencyGraph, node: str) -> ChannelGroup:
    """The channel group whose producers include node ``node`` (or whose id is ``node``)."""
    hits = [g for g in graph.groups if node in g.producers]
    if not hits:
        hits = [g for g in graph.groups if g.id == node]
    assert len(hits) == 1, f"no single group produced by {node!r}: {[g.id for g in graph.groups]}"
    return hits[0]


def resolve(graph: DependencyGraph, removal: Mapping[str, Iterable[int]]) -> dict[str, list[int]]:
    """``{producer node or group id: units}`` -> ``{group id: units}``."""
    return {group_of(graph, key).id: list(units) for key, units in removal.items()}


def random_feeds(model: onnx.ModelProto, seed: int = 1) -> dict[str, np.ndarray]:
    """Standard-normal float32 feeds for every graph input (shapes must be concrete)."""
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims = [d.dim_value for d in tt.shape.dim]
        assert all(d > 0 for d in dims), f"input {vi.name!r} needs concrete dims or a feed"
        assert tt.elem_type == onnx.TensorProto.FLOAT, f"input {vi.name!r} needs a feed"
        feeds[vi.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


def run(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """All graph outputs of ``model`` under onnxruntime on CPU."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, dict(feeds))


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def constant_sizes(model: onnx.ModelProto) -> dict[tuple[str, int], int]:
    """(node name, input index) -> element count, for every initializer a node reads."""
    sizes = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
    return {
        (n.name, i): sizes[name]
        for n in model.graph.node
        for i, name in enumerate(n.input)
        if name in sizes
    }


def io_names(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    inits = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits], [
        o.name for o in model.graph.output
    ]


def _prune_checked(
    model: onnx.ModelProto, removal: Mapping[str, Iterable[int]], graph: DependencyGraph
) -> onnx.ModelProto:
    clean = resolve(graph, removal)
    pruned = prune_channels(model, clean, graph=graph)
    onnx.checker.check_model(pruned, full_check=True)
    assert io_names(pruned) == io_names(model)
    before, after = constant_sizes(model), constant_sizes(pruned)
    shrunk = [k for k, n in after.items() if n < before.get(k, n)]
    assert shrunk, "pruning shrank no constant"
    return pruned


def assert_exact(
    model: onnx.ModelProto,
    removal: Mapping[str, Iterable[int]],
    feeds: Mapping[str, np.ndarray] | None = None,
) -> onnx.ModelProto:
    """The groups are exact, and pruning their units computes what zeroing them computes
    (rel L2 < 1e-5 on every output). Returns the pruned model."""
    graph = analyze(model)
    for key in removal:
        group = group_of(graph, key)
        assert group.exact, f"group of {key!r} is inexact: {group.inexact_reasons}"
    pruned = _prune_checked(model, removal, graph)
    zeroed = zero_units(model, resolve(graph, removal), graph=graph)
    feeds = dict(feeds) if feeds is not None else random_feeds(model)
    got, want = run(pruned, feeds), run(zeroed, feeds)
    assert len(got) == len(want)
    for name, g, w in zip(io_names(model)[1], got, want, strict=True):
        assert g.shape == w.shape, f"output {name!r}: {g.shape} != {w.shape}"
        err = rel_l2(g, w)
        assert err < REL_TOL, f"output {name!r}: pruned vs zeroed rel L2 {err:.3g}"
    return pruned


def assert_valid(
    model: onnx.ModelProto,
    removal: Mapping[str, Iterable[int]],
    feeds: Mapping[str, np.ndarray] | None = None,
) -> onnx.ModelProto:
    """Pruning passes the full checker, keeps the graph's input/output names and output
    shapes, and runs in onnxruntime. Returns the pruned model."""
    graph = analyze(model)
    pruned = _prune_checked(model, removal, graph)
    feeds = dict(feeds) if feeds is not None else random_feeds(model)
    got, want = run(pruned, feeds), run(model, feeds)
    assert [g.shape for g in got] == [w.shape for w in want]
    assert all(np.isfinite(g).all() for g in got if g.dtype.kind == "f")
    return pruned


def node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    (hit,) = [n for n in model.graph.node if n.name == name]
    return hit


def attr(model: onnx.ModelProto, node_name: str, name: str):
    for a in node(model, node_name).attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return None


def init(model: onnx.ModelProto, name: str) -> np.ndarray:
    """The initializer feeding input ``name`` (after surgery it may have been renamed: the
    argument may also be ``node_name:index``)."""
    if ":" in name:
        node_name, index = name.rsplit(":", 1)
        name = node(model, node_name).input[int(index)]
    (hit,) = [t for t in model.graph.initializer if t.name == name]
    return numpy_helper.to_array(hit)


def reason_matches(reasons: Iterable[str], phrase: str) -> bool:
    return any(re.search(phrase, r) for r in reasons)


def assert_frozen(graph: DependencyGraph, node_name: str, phrase: str) -> None:
    """The group produced by ``node_name`` is frozen with a reason matching ``phrase``."""
    group = group_of(graph, node_name)
    assert group.frozen, f"group of {node_name!r} is not frozen: {group.prunable_units}"
    assert reason_matches(group.frozen_reasons, phrase), group.frozen_reasons


def assert_declined(graph: DependencyGraph, node_name: str, phrase: str) -> None:
    """Node ``node_name`` was declined for a reason matching ``phrase``."""
    assert node_name in graph.declined, f"{node_name!r} not declined: {graph.declined}"
    assert re.search(phrase, graph.declined[node_name]), graph.declined[node_name]
