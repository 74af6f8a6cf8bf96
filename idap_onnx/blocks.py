"""Removable blocks: residual branches ``y = x + f(x)`` and shape-preserving chains.

- **residual**: an ``Add(x, b)`` whose branch ``b = f(x)``, holding at least one weighted op,
  is computed only from ``x`` (plus
  constants and side inputs such as an attention mask) by nodes nothing else reads. Removing
  it deletes the branch and the Add and rewires the readers of ``y`` to ``x``: exactly the
  original network with ``f(x)`` forced to zero (ResNet bottlenecks, MobileNet inverted
  residuals, ConvNeXt blocks, transformer attention and MLP sub-layers, pre- or post-norm).
- **chain**: a single-input run of nodes holding one weighted op (Conv/Gemm/MatMul) whose
  output has its input's shape (VGG's 3x3 layers); removing it rewires ``y`` to ``x``.

Analysis only: ``passes.remove_blocks`` edits the graph.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import onnx

from idap_onnx.graph import GraphIndex

WEIGHTED = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


@dataclass(frozen=True)
class Block:
    """A removable sub-graph: readers of ``output`` are rewired to ``input``."""

    name: str
    kind: str  # "residual" | "chain"
    input: str
    output: str
    nodes: tuple[str, ...]
    branch: str  # the tensor f(x) for a residual block; equal to ``output`` for a chain


def find_blocks(model: onnx.ModelProto, index: GraphIndex | None = None) -> list[Block]:
    """All residual blocks, then the shape-preserving chains, in graph order.

    ``model`` must carry inferred shapes (``dependency.analyze_model`` prepares them).
    """
    index = index or GraphIndex(model)
    blocks = [b for node in index.nodes if (b := _residual(index, node)) is not None]
    inside = {n for b in blocks for n in b.nodes}
    chains = [b for node in index.nodes if (b := _chain(index, node)) is not None]
    return blocks + [c for c in chains if not inside & set(c.nodes)]


def _same_shape(index: GraphIndex, a: str, b: str) -> bool:
    sa, sb = index.shape(a), index.shape(b)
    return sa is not None and sa == sb and all(d is not None for d in sa)


def _residual(index: GraphIndex, add: onnx.NodeProto) -> Block | None:
    if add.op_type != "Add" or len(add.input) != 2:
        return None
    if any(index.is_constant(i) for i in add.input):
        return None
    for skip, branch in (add.input, reversed(add.input)):
        if not (_same_shape(index, skip, add.output[0]) and _same_shape(index, branch, skip)):
            continue
        nodes = _branch_nodes(index, skip, branch)
        if nodes is None:
            continue
        removable = _exclusive(index, nodes, add)
        weighted = any(n.op_type in WEIGHTED for n in nodes if n.name in removable)
        if weighted and index.producer[branch].name in removable:
            order = [n.name for n in index.nodes if n.name in removable] + [add.name]
            return Block(f"res:{add.name}", "residual", skip, add.output[0], tuple(order), branch)
    return None


def _exclusive(index: GraphIndex, nodes: list[onnx.NodeProto], add: onnx.NodeProto) -> set[str]:
    """The branch nodes nothing outside the branch needs: a node whose output is read
    elsewhere (a Shape shared with later layers) stays, and so do the nodes it reads."""
    keep = {n.name for n in nodes}
    by_name = {n.name: n for n in nodes}
    outputs = set(index.output_names)
    changed = True
    while changed:
        changed = False
        for name in list(keep):
            n = by_name[name]
            needed = any(
                out in outputs
                or any(
                    c.name not in keep and c.name != add.name for c in index.consumers.get(out, [])
                )
                for out in n.output
            )
            if needed:
                keep.discard(name)
                changed = True
    return keep


def _branch_nodes(index: GraphIndex, skip: str, branch: str) -> list[onnx.NodeProto] | None:
    """Nodes that are ancestors of ``branch`` and descendants of ``skip`` (None if skip is
    not an ancestor of branch)."""
    down: set[str] = set()
    queue = deque(index.consumers.get(skip, []))
    while queue:
        n = queue.popleft()
        if n.name in down:
            continue
        down.add(n.name)
        for out in n.output:
            queue.extend(index.consumers.get(out, []))
    start = index.producer.get(branch)
    if start is None or start.name not in down:
        return None
    seen: set[str] = set()
    stack = [start]
    while stack:
        n = stack.pop()
        if n.name in seen or n.name not in down:
            continue
        seen.add(n.name)
        for i in n.input:
            p = index.producer.get(i)
            if p is not None:
                stack.append(p)
    return [n for n in index.nodes if n.name in seen]


def _chain(index: GraphIndex, first: onnx.NodeProto) -> Block | None:
    if first.op_type not in WEIGHTED or not first.input or index.is_constant(first.input[0]):
        return None
    x = first.input[0]
    if index.shape(x) is None:
        return None
    chain = [first]
    node = first
    for _ in range(6):
        out = node.output[0]
        if out in index.output_names:
            return None
        if _same_shape(index, x, out) and all(
            index.is_constant(i) for n in chain for i in n.input[1:] if i
        ):
            names = tuple(n.name for n in chain)
            return Block(f"chain:{first.name}", "chain", x, out, names, out)
        users = index.consumers.get(out, [])
        if len(users) != 1:
            return None
        node = users[0]
        if node.op_type in WEIGHTED or node.input[0] != out:
            return None
        if any(i and not index.is_constant(i) for i in node.input[1:]):
            return None
        chain.append(node)
    return None


# Ops that carry a tensor on to the next without rescaling it (a constant ``Add`` is a bias).
_CARRY = frozenset({"Identity", "Dropout", "Reshape", "Transpose", "Flatten", "Squeeze",
                    "Unsqueeze"})


def residual_flows(index: GraphIndex, blocks: list[Block]) -> dict[str, str]:
    """Output of the last weighted node of each residual branch -> the block's output.

    In ``y = x + f(x)`` the flow tensor that this node's output joins is ``y``, not ``f(x)``:
    removing one of its input channels changes ``f(x)``, and with it ``y``, by the same
    amount. The walk from ``f(x)`` back to the node passes only ops that carry a tensor
    unscaled (``_CARRY``, and ``Add`` of a constant bias); a branch ending in anything else
    (a BatchNormalization, a scaling ``Mul``) maps nothing.
    """
    flows: dict[str, str] = {}
    for block in blocks:
        if block.kind != "residual":
            continue
        tensor = block.branch
        node = index.producer.get(tensor)
        while node is not None and node.op_type not in WEIGHTED:
            data = [i for i in node.input if i and not index.is_constant(i)]
            carries = node.op_type in _CARRY or (node.op_type == "Add" and len(data) == 1)
            if not carries or len(data) != 1:
                node = None
                break
            tensor = data[0]
            node = index.producer.get(tensor)
        if node is not None:
            flows[node.output[0]] = block.output
    return flows
