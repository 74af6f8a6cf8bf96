"""The sequential refit in one pass: the pruned graph run node by node over every batch.

``refit(sequential=True)`` refits layer after layer, each on the inputs that the refits before
it produce. Through ONNX Runtime that takes one pass over the calibration batches per layer,
each computing the graph from its inputs up to that layer. Here the pruned model runs as an
``OnnxModule`` (``torch_graph``), node by node, with every batch's live tensors held between
layers: the batches advance to the next layer to refit, its sampled input rows are taken,
its normal equations are solved and written, and the batches go on with the new weights
(``run_nodes`` overrides). The graph is computed once per call, whatever the number of
layers; the rows, the targets and the solve are those of the per-layer passes, so the result
agrees with them to float32 rounding (``tests/test_recovery.py``).

Threads: torch runs on one thread here (``single_thread``). The node-by-node execution is
many mid-size ops, and on the project's 2-core machines torch's two OpenMP threads ran it
about 10x slower than one (all-MiniLM-L6-v2 on 128 sentences: 11 s against 1.1 s); one
thread also keeps the sums' order, so the result, fixed.

Memory: the live tensors of all batches together. ``plan_frontier`` measures the largest
live set of one sample node by node, and the refit falls back to the per-layer passes when
that, times the samples, exceeds ``refit.FRONTIER_BYTES``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import numpy as np
import onnx
import torch

from idap_onnx.errors import UnsupportedModelError


@contextmanager
def single_thread() -> Iterator[None]:
    """torch's intra-op threads set to one inside the block (module docstring)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _nbytes(env: Mapping[str, torch.Tensor], skip: set[str]) -> int:
    return sum(t.numel() * t.element_size() for n, t in env.items()
               if n not in skip and isinstance(t, torch.Tensor))


class Stream:
    """``model``'s batches advanced together node by node (see the module docstring).

    Build with :meth:`open`, which returns None where the model cannot run in torch or its
    live tensors would not fit in ``max_bytes``.
    """

    def __init__(self, module, feeds: Sequence[Mapping[str, np.ndarray]]) -> None:
        self.module = module
        self.index = {name: k for k, name in enumerate(module.node_names)}
        with torch.inference_mode():
            self.envs = [module.start(feed) for feed in feeds]
        self.pos = 0
        self.overrides: dict[int, dict[int, torch.Tensor]] = {}
        self.added: dict[int, torch.Tensor] = {}

    @classmethod
    def open(
        cls,
        model: onnx.ModelProto,
        feeds: Sequence[Mapping[str, np.ndarray]],
        device: str,
        max_bytes: int,
    ) -> Stream | None:
        """A stream over ``feeds``, or None when ``model`` has local functions, nodes without
        distinct names, an op the torch executor lacks, or live tensors over all batches
        that exceed ``max_bytes``."""
        module = _module(model, device) if feeds else None
        if module is None:
            return None
        if frontier_bytes(module, feeds) > max_bytes:
            return None
        return cls(module, feeds)

    def advance(self, stop: int) -> list[dict[str, torch.Tensor]]:
        """Run every batch up to (not including) node ``stop`` (``index``); the batches' live
        tensors."""
        with torch.inference_mode(), single_thread():
            for env in self.envs:
                self.module.run_nodes(env, self.pos, stop, self.overrides, self.added)
        self.pos = stop
        return self.envs

    def write(self, writes: Sequence[tuple[str, int, np.ndarray]]) -> None:
        """Use refitted values from now on: (node, input index, value); index -1 adds the
        value to the node's first output (a bias ``Add`` the refit inserted)."""
        device = next(iter(self.envs[0].values())).device
        for name, i, value in writes:
            tensor = torch.from_numpy(np.ascontiguousarray(value)).to(device)
            if i < 0:
                self.added[self.index[name]] = tensor
            else:
                self.overrides.setdefault(self.index[name], {})[i] = tensor


def pulled(
    model: onnx.ModelProto,
    feeds: Sequence[Mapping[str, np.ndarray]],
    names: Sequence[str],
    device: str,
) -> Iterator[dict[str, np.ndarray]] | None:
    """``names`` (node outputs) of ``model`` on each feed in turn, computed in torch on one
    thread up to the last node that writes one of them; None where ``model`` cannot run in
    torch (as ``Stream.open``)."""
    module = _module(model, device)
    if module is None:
        return None
    wanted = set(names)
    stop = 1 + max(k for k, node in enumerate(model.graph.node) if wanted & set(node.output))

    def run() -> Iterator[dict[str, np.ndarray]]:
        module.tap(names)
        for feed in feeds:
            with torch.inference_mode(), single_thread():
                module.taps = {}
                module.run_nodes(module.start(feed), 0, stop)
                yield {n: module.taps[n].cpu().numpy() for n in names}

    return run()


def _module(model: onnx.ModelProto, device: str):
    """``model`` as an ``OnnxModule`` on ``device``, or None (local functions, nodes without
    distinct names, an op the torch executor lacks)."""
    names = [node.name for node in model.graph.node]
    if model.functions or "" in names or len(set(names)) < len(names):
        return None
    from idap_onnx.torch_graph import OnnxModule

    try:
        with single_thread():
            module = OnnxModule(model, trainable=False)
    except UnsupportedModelError:
        return None
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        module = module.to("cuda")
    return module


def frontier_bytes(module, feeds: Sequence[Mapping[str, np.ndarray]]) -> int:
    """About the bytes that the live tensors of all ``feeds`` together take at most: the
    largest live set of one sample of the feed with the most elements a sample (the longest
    text) times the number of samples (``plan_frontier``)."""
    sizes = [len(next(iter(f.values()))) for f in feeds]
    widest = max(range(len(feeds)),
                 key=lambda i: sum(np.size(v) for v in feeds[i].values()) / max(sizes[i], 1))
    one = {k: v[:1] for k, v in feeds[widest].items()}
    try:
        return plan_frontier(module, one) * sum(sizes)
    except RuntimeError:  # a fixed batch size: the whole batch, times the batches
        return plan_frontier(module, feeds[widest]) * len(feeds)


def plan_frontier(module, feed: Mapping[str, np.ndarray]) -> int:
    """The largest number of bytes that ``module``'s live intermediate tensors (graph inputs
    included, constants not) take at once while it runs on ``feed``."""
    with torch.inference_mode(), single_thread():
        env = module.start(feed)
        consts = set(env) - set(feed)
        peak = _nbytes(env, consts)
        for k in range(len(module.node_names)):
            module.run_nodes(env, k, k + 1)
            peak = max(peak, _nbytes(env, consts))
    return peak
