"""An ONNX graph as a trainable ``torch.nn.Module``, and the way back.

:class:`OnnxModule` runs the graph node by node with torch operators (``ops.OPS``). Float
initializers that feed an operator as *data* (conv/gemm/matmul weights and biases, norm
scales and biases, per-channel Add/Mul/Sub/Div constants, embedding tables, PRelu slopes,
position embeddings, class tokens ...) are ``nn.Parameter``s; integer constants, constants
used as shapes, indices or axes, single-value constants, BatchNormalization running
statistics and constants holding non-finite values are buffers. ``onnx_names`` maps every
parameter's torch name to its ONNX initializer name (``bn_stat_names`` does the same for the
BatchNormalization running statistics).

:func:`write_back` copies the current parameter values (and running statistics) into a copy of
the model's initializers; nothing else in the model changes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from idap_onnx.errors import UnsupportedModelError, UsageError
from idap_onnx.torch_graph.ops import OPS, Node, Runtime

__all__ = ["OnnxModule", "unsupported_ops", "write_back"]

_DEFAULT_DOMAINS = ("", "ai.onnx")
#: Constant inputs up to this many elements get a host copy (reading them needs no sync).
_HOST_CONST_MAX = 4096
_FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.BFLOAT16,
}


def _default_opset(model: onnx.ModelProto) -> int:
    for opset in model.opset_import:
        if opset.domain in _DEFAULT_DOMAINS:
            return opset.version
    return 0


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for a in node.attribute:
        value = helper.get_attribute_value(a)
        if isinstance(value, bytes):
            value = value.decode("utf-8")
        elif isinstance(value, onnx.TensorProto):
            value = numpy_helper.to_array(value)
        elif isinstance(value, list) and value and isinstance(value[0], bytes):
            value = [v.decode("utf-8") for v in value]
        out[a.name] = value
    return out


def _unsupported(model: onnx.ModelProto) -> list[tuple[str, str, int, str]]:
    """(domain, op_type, opset, reason) of every distinct node the executor cannot run."""
    versions = {o.domain: o.version for o in model.opset_import}
    opset = _default_opset(model)
    found: dict[tuple[str, str, int, str], None] = {}
    for node in model.graph.node:
        domain = node.domain or ""
        if domain in _DEFAULT_DOMAINS:
            op = OPS.get(node.op_type)
            if op is None:
                found[("", node.op_type, opset, "")] = None
            elif op.check is not None:
                reason = op.check(node, _attrs(node), opset)
                if reason:
                    found[("", node.op_type, opset, reason)] = None
        else:
            found[(domain, node.op_type, versions.get(domain, 1), "")] = None
    return list(found)


def _format(entry: tuple[str, str, int, str], with_opset: bool = True) -> str:
    domain, op, version, reason = entry
    name = f"{domain}.{op}" if domain else op
    if reason:
        name += f" with {reason}"
    return f"{name} (opset {version})" if with_opset else name


def unsupported_ops(model: onnx.ModelProto) -> list[str]:
    """The operators of ``model`` that :class:`OnnxModule` does not implement.

    Args:
        model: The model (model-local functions are inlined first, as the module does).

    Returns:
        One string per distinct (domain, op_type, opset, reason), e.g. ``"Loop (opset 17)"``,
        ``"com.microsoft.FusedConv (opset 1)"`` or ``"MaxPool with Indices output (opset 12)"``
        (supported op types whose attribute combination is not); empty when it all runs.
    """
    return [_format(e) for e in _unsupported(_inlined(model))]


def _unsupported_message(entries: list[tuple[str, str, int, str]]) -> str:
    versions = {(d, v) for d, _, v, _ in entries}
    if len(versions) == 1:
        body = ", ".join(_format(e, with_opset=False) for e in entries)
        body += f" (opset {entries[0][2]})"
    else:
        body = ", ".join(_format(e) for e in entries)
    verb = "ops" if len(entries) > 1 else "op"
    are = "are" if len(entries) > 1 else "is"
    return (
        f"cannot convert to torch: {verb} {body} {are} not supported; "
        "fine-tune in the original framework or replace these operators"
    )


def _inlined(model: onnx.ModelProto) -> onnx.ModelProto:
    if not model.functions:
        return model
    import onnx.inliner

    return onnx.inliner.inline_local_functions(model)


_NAME_RE = re.compile(r"[^0-9A-Za-z_]")


class OnnxModule(torch.nn.Module):
    """Executes an ONNX graph with torch operators; float weights are trainable parameters.

    Args:
        model: A self-contained model (use :func:`idap_onnx.model_io.load_model` for files: it
            folds ``Constant`` nodes into initializers, so that their values are trainable).
        trainable: False for inference only: every initializer becomes a buffer (no
            ``nn.Parameter`` and no scan of the weights for non-finite values).

    Raises:
        UnsupportedModelError: A node uses an operator (or attribute combination) this
            executor does not implement; the one-line message lists all of them.

    ``forward(*inputs)`` takes the graph inputs positionally in graph order, ``forward(**feeds)``
    or ``forward(feeds_dict)`` by name (numpy arrays are converted; inputs are moved to the
    device of the module's parameters and buffers); it returns the outputs as a tuple in graph
    order, or one tensor when the graph has one output.

    The module starts in eval mode: BatchNormalization uses its running statistics and Dropout
    is the identity. In train mode BatchNormalization normalizes with batch statistics and
    updates its running-statistics buffers like ``torch.nn.BatchNorm`` (torch momentum =
    1 - ONNX momentum; the running variance takes the unbiased batch variance), and Dropout
    drops with its ratio (its ``training_mode`` input is ignored: the module's mode decides).
    """

    def __init__(self, model: onnx.ModelProto, trainable: bool = True) -> None:
        super().__init__()
        model = _inlined(model)
        bad = _unsupported(model)
        if bad:
            raise UnsupportedModelError(_unsupported_message(bad))
        opset = _default_opset(model)
        graph = model.graph
        inits = {t.name: t for t in graph.initializer}
        self.input_names: list[str] = [i.name for i in graph.input if i.name not in inits]
        #: Graph inputs that have an initializer as default value (IR < 4 style).
        self._optional_inputs = [i.name for i in graph.input if i.name in inits]
        self.output_names: list[str] = [o.name for o in graph.output]
        #: torch parameter name -> ONNX initializer name.
        self.onnx_names: dict[str, str] = {}
        #: torch buffer name -> ONNX initializer name (every initializer held as a buffer).
        self.onnx_buffer_names: dict[str, str] = {}
        #: torch buffer name -> ONNX initializer name of BatchNormalization running statistics.
        self.bn_stat_names: dict[str, str] = {}
        self._tensor_attr: dict[str, str] = {}  # ONNX initializer name -> attribute name

        # Decide each used initializer's role from the inputs it feeds.
        as_param: set[str] = set()
        bn_stats: set[str] = set()
        used: set[str] = set()
        for node in graph.node:
            op = OPS[node.op_type]
            non_data = op.non_data_at(opset)
            for i, name in enumerate(node.input):
                if name not in inits:
                    continue
                used.add(name)
                tensor = inits[name]
                if node.op_type == "BatchNormalization" and i in (3, 4):
                    bn_stats.add(name)
                if tensor.data_type not in _FLOAT_TYPES or i in non_data:
                    continue
                numel = int(np.prod(tensor.dims)) if len(tensor.dims) else 1
                if i in op.weights or numel > 1:
                    as_param.add(name)
        for o in graph.output:
            if o.name in inits:
                used.add(o.name)
        used.update(self._optional_inputs)

        taken: set[str] = set(dir(self))
        for name in graph.initializer:
            onnx_name = name.name
            if onnx_name not in used:
                continue
            arr = _to_torch(name)
            attr = _sanitize(onnx_name, taken)
            taken.add(attr)
            self._tensor_attr[onnx_name] = attr
            if (
                trainable
                and onnx_name in as_param
                and onnx_name not in bn_stats
                and bool(torch.isfinite(arr).all())
            ):
                self.register_parameter(attr, torch.nn.Parameter(arr))
                self.onnx_names[attr] = onnx_name
            else:
                self.register_buffer(attr, arr)
                self.onnx_buffer_names[attr] = onnx_name
                if onnx_name in bn_stats:
                    self.bn_stat_names[attr] = onnx_name

        # Prepare the nodes; host copies of small constant inputs that are not parameters.
        self._nodes: list[Node] = []
        for node in graph.node:
            prepared = Node(
                op_type=node.op_type,
                name=node.name,
                opset=opset,
                attrs=_attrs(node),
                inputs=list(node.input),
                outputs=list(node.output),
                fn=OPS[node.op_type].fn,
            )
            for i, name in enumerate(node.input):
                if name in inits and name not in as_param and name not in bn_stats:
                    t = inits[name]
                    numel = int(np.prod(t.dims)) if len(t.dims) else 1
                    if numel <= _HOST_CONST_MAX and t.data_type in _HOST_TYPES:
                        prepared.const[i] = numpy_helper.to_array(t)
            self._nodes.append(prepared)

        #: Intermediate tensors to keep from each forward (``tap``), by ONNX name.
        self._tap: frozenset[str] = frozenset()
        self.taps: dict[str, torch.Tensor] = {}

        # Free every intermediate tensor after its last use.
        keep = set(self.output_names)
        last: dict[str, int] = {}
        for k, node in enumerate(self._nodes):
            for name in node.inputs:
                if name:
                    last[name] = k
            for name in node.outputs:
                if name:
                    last.setdefault(name, k)
        self._free_after: list[list[str]] = [[] for _ in self._nodes]
        for name, k in last.items():
            if name not in keep and name not in self._tensor_attr:
                self._free_after[k].append(name)
        self.eval()

    # ---------------------------------------------------------------------------- forward

    def _device(self) -> torch.device:
        for t in self.parameters():
            return t.device
        for t in self.buffers():
            return t.device
        return torch.device("cpu")

    def _feeds(self, args: tuple, kwargs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        if len(args) == 1 and isinstance(args[0], Mapping) and not kwargs:
            kwargs, args = args[0], ()
        if len(args) > len(self.input_names):
            raise UsageError(
                f"OnnxModule takes {len(self.input_names)} inputs "
                f"({', '.join(self.input_names)}), got {len(args)}; pass one per graph input"
            )
        feeds = dict(zip(self.input_names, args, strict=False))
        for name, value in kwargs.items():
            if name not in self.input_names and name not in self._optional_inputs:
                raise UsageError(
                    f"OnnxModule has no input '{name}' (inputs: {', '.join(self.input_names)}); "
                    "pass the graph's input names"
                )
            if name in feeds:
                raise UsageError(f"input '{name}' given twice; pass it once")
            feeds[name] = value
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise UsageError(
                f"OnnxModule is missing inputs {', '.join(missing)}; pass every graph input"
            )
        device = self._device()
        out = {}
        for name, value in feeds.items():
            if not isinstance(value, torch.Tensor):
                value = torch.from_numpy(np.asarray(value))
            out[name] = value.to(device)  # no-op when already there
        return out

    def tap(self, names) -> None:
        """Keep these intermediate tensors of every later forward in ``self.taps`` (for
        feature distillation); an empty list stops it."""
        self._tap = frozenset(names)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor | tuple[torch.Tensor, ...]:
        self.taps = {}
        env = self.start(self._feeds(args, kwargs))
        self.run_nodes(env, 0, len(self._nodes))
        outs = tuple(env[name] for name in self.output_names)
        return outs[0] if len(outs) == 1 else outs

    # ------------------------------------------------------------------- node by node

    @property
    def node_names(self) -> list[str]:
        """The ONNX node names in execution (graph) order: ``run_nodes`` counts in these."""
        return [node.name for node in self._nodes]

    def start(self, feeds: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The environment before the first node: every initializer and the graph inputs
        ``feeds`` (by name; numpy arrays are converted and moved to the module's device)."""
        env: dict[str, torch.Tensor] = {
            onnx_name: getattr(self, attr) for onnx_name, attr in self._tensor_attr.items()
        }
        env.update(self._feeds((feeds,), {}))
        return env

    def run_nodes(
        self,
        env: dict[str, torch.Tensor],
        start: int,
        stop: int,
        overrides: Mapping[int, Mapping[int, torch.Tensor]] | None = None,
        added: Mapping[int, torch.Tensor] | None = None,
    ) -> None:
        """Execute nodes ``start:stop`` on ``env`` in place (``start`` returns one), freeing
        every intermediate tensor after its last reader, so ``env`` holds the live set.

        ``overrides`` maps node index -> input index -> the value that input reads instead of
        its tensor, and ``added`` node index to a value added to its first output (a refit's
        new weights and inserted bias, without editing the module or the graph).
        """
        bn = {name: env[name] for name in self.bn_stat_names.values()}
        rt = Runtime(training=self.training, device=self._device(), bn_buffers=bn)
        for k in range(start, stop):
            node, free = self._nodes[k], self._free_after[k]
            x = [env[name] if name else None for name in node.inputs]
            changed = overrides.get(k) if overrides else None
            if changed:
                x += [None] * (max(changed) + 1 - len(x))  # an input the node lacked
                x = [changed.get(i, t) for i, t in enumerate(x)]
                node = replace(node, const={
                    i: c for i, c in node.const.items() if i not in changed})
            try:
                result = node.fn(node, rt, x)
            except Exception as exc:
                shapes = ", ".join(
                    "None" if t is None else f"{tuple(t.shape)}:{str(t.dtype)[6:]}" for t in x
                )
                raise RuntimeError(
                    f"{node.op_type} node '{node.name}' failed on inputs [{shapes}]: {exc}"
                ) from exc
            if isinstance(result, torch.Tensor):
                env[node.outputs[0]] = result
            else:
                for name, value in zip(node.outputs, result, strict=False):
                    if name:
                        env[name] = value
            if added and k in added:
                env[node.outputs[0]] = env[node.outputs[0]] + added[k]
            if self._tap:
                self.taps.update((n, env[n]) for n in node.outputs if n in self._tap)
            for name in free:
                env.pop(name, None)

    def extra_repr(self) -> str:
        return (
            f"nodes={len(self._nodes)}, inputs={self.input_names}, outputs={self.output_names}, "
            f"parameters={len(self.onnx_names)}"
        )


_HOST_TYPES = {
    onnx.TensorProto.INT64,
    onnx.TensorProto.INT32,
    onnx.TensorProto.INT16,
    onnx.TensorProto.INT8,
    onnx.TensorProto.UINT8,
    onnx.TensorProto.BOOL,
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.DOUBLE,
}


def _sanitize(onnx_name: str, taken: set[str]) -> str:
    base = _NAME_RE.sub("_", onnx_name) or "t"
    if base[0].isdigit():
        base = "t_" + base
    name, k = base, 1
    while name in taken:
        name = f"{base}_{k}"
        k += 1
    return name


def _to_torch(tensor: onnx.TensorProto) -> torch.Tensor:
    arr = numpy_helper.to_array(tensor)
    if tensor.data_type == onnx.TensorProto.BFLOAT16:
        return torch.from_numpy(np.array(arr, dtype=np.float32)).to(torch.bfloat16)
    return torch.from_numpy(np.array(arr))


def write_back(module: OnnxModule, model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose initializers hold ``module``'s current values.

    Every parameter (``module.onnx_names``) and BatchNormalization running statistic
    (``module.bn_stat_names``) replaces the data of the initializer it came from, in that
    initializer's data type; nodes, inputs, outputs, other initializers and metadata are
    unchanged.

    Args:
        module: A module built from ``model`` (or from a model with the same initializers).
        model: The model to copy; it is not modified.

    Raises:
        UsageError: An initializer is missing from ``model`` or a value changed shape.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    values: dict[str, torch.Tensor] = {}
    for attr, onnx_name in module.onnx_names.items():
        values[onnx_name] = getattr(module, attr)
    for attr, onnx_name in module.bn_stat_names.items():
        values[onnx_name] = getattr(module, attr)
    for onnx_name, value in values.items():
        init = inits.get(onnx_name)
        if init is None:
            raise UsageError(
                f"cannot write back '{onnx_name}': the model has no such initializer; pass the "
                "model the module was built from"
            )
        if tuple(value.shape) != tuple(init.dims):
            raise UsageError(
                f"cannot write back '{onnx_name}': shape {tuple(value.shape)} differs from the "
                f"initializer's {tuple(init.dims)}; rebuild the module after changing shapes"
            )
        arr = value.detach().to("cpu", torch.float32 if value.dtype == torch.bfloat16 else None)
        arr = arr.numpy()
        np_dtype = helper.tensor_dtype_to_np_dtype(init.data_type)
        new = numpy_helper.from_array(arr.astype(np_dtype), onnx_name)
        doc = init.doc_string
        init.CopyFrom(new)
        if doc:
            init.doc_string = doc
    return out
