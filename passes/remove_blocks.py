"""Block surgery: delete residual branches and shape-preserving chains.

Invariant: for a residual block the result computes the original network with the branch
``f(x)`` forced to zero; for a chain, the original with the chain replaced by identity. Graph
inputs and outputs keep their names (an output that was a block's ``y`` becomes an Identity
of ``x``). Ends with ``cleanup.finalize`` (dead nodes dropped, shapes re-inferred, checker).
"""

from __future__ import annotations

from collections.abc import Iterable

import onnx

from idap_onnx.blocks import Block, find_blocks
from idap_onnx.errors import UsageError
from idap_onnx.graph import GraphIndex
from idap_onnx.passes.cleanup import finalize
from idap_onnx.shapes import analysis_shapes


def remove_blocks(
    model: onnx.ModelProto, names: Iterable[str], *, blocks: list[Block] | None = None
) -> onnx.ModelProto:
    """Return a copy of ``model`` without the named blocks (``res:...``/``chain:...``).

    Raises:
        UsageError: a name that is not a removable block of ``model``, or two blocks that
            overlap (remove them one at a time).
    """
    if blocks is None:
        blocks = find_blocks(model, GraphIndex(model, analysis_shapes(model)))
    by_name = {b.name: b for b in blocks}
    chosen = []
    for name in names:
        if name not in by_name:
            known = ", ".join(list(by_name)[:5]) or "none"
            raise UsageError(
                f"'{name}' is not a removable block (run `idap-onnx inspect`; e.g. {known})"
            )
        chosen.append(by_name[name])
    taken: set[str] = set()
    for b in chosen:
        if taken & set(b.nodes):
            raise UsageError(f"block '{b.name}' overlaps another block given; remove one at a time")
        taken |= set(b.nodes)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for b in chosen:
        _remove(out, b)
    return finalize(out)


def _remove(model: onnx.ModelProto, block: Block) -> None:
    graph = model.graph
    drop = set(block.nodes)
    keep = [n for n in graph.node if n.name not in drop]
    del graph.node[:]
    graph.node.extend(keep)
    outputs = {o.name for o in graph.output}
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name == block.output:
                node.input[k] = block.input
    if block.output in outputs:
        graph.node.append(
            onnx.helper.make_node(
                "Identity", [block.input], [block.output], name=f"{block.name}/id"
            )
        )
