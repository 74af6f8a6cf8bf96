"""Reading and writing ONNX models safely.

Invariants:

* :func:`load_model` returns a self-contained model: external data is read into memory, the
  opset is one idap-onnx supports, the ONNX checker passes, every main-graph node has a unique
  non-empty name and (by default) every foldable ``Constant`` node of the main graph is an
  initializer. The input file is only ever read.
* :func:`save_model` never leaves a half-written file at the destination: it writes a temporary
  file in the destination directory, syncs it to disk and renames it over the destination. Models
  whose serialized size reaches :data:`EXTERNAL_DATA_THRESHOLD` (protobuf cannot serialize 2 GB)
  are written as ``<name>`` plus one external data file ``<name>.data`` beside it.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import IO

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper, numpy_helper

from idap_onnx.errors import ModelLoadError, UnsupportedModelError, UsageError

__all__ = [
    "EXTERNAL_DATA_THRESHOLD",
    "KNOWN_DOMAINS",
    "SUPPORTED_OPSETS",
    "assign_node_names",
    "fold_constant_nodes",
    "is_large_weight",
    "iter_tensors",
    "load_model",
    "load_offloaded",
    "model_opset",
    "normalized",
    "offloaded",
    "save_model",
    "tensor_array",
    "write_text_atomic",
    "write_variant",
]

#: Serialized size (bytes) from which :func:`save_model` writes tensors to an external file.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**20
#: Operator-set domains idap-onnx knows (besides the domains of model-local functions).
KNOWN_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})
#: Default-domain opset versions idap-onnx supports.
SUPPORTED_OPSETS = range(7, 26)

_DEFAULT_DOMAINS = ("", "ai.onnx")
# Tensors smaller than this stay inside the model file when saving with external data.
_EXTERNAL_TENSOR_MIN_BYTES = 1024
# Offsets of tensors in the external data file are multiples of this (lets runtimes mmap).
_EXTERNAL_ALIGNMENT = 64


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def load_model(path: str | os.PathLike, *, fold_constants: bool = True) -> onnx.ModelProto:
    """Loads an ONNX model, with its external data, and validates it.

    Args:
        path: The ``.onnx`` file. External data files are looked up relative to its directory.
        fold_constants: Turn every main-graph ``Constant`` node holding a dense tensor, float(s)
            or int(s) into an initializer named after the node's output.

    Returns:
        A self-contained model (no external data references) whose main-graph nodes all have
        unique, non-empty names.

    Raises:
        ModelLoadError: The file is missing, a directory, not ONNX, truncated, fails the ONNX
            checker, or its external data is missing or short.
        UnsupportedModelError: The model imports an unknown operator domain or a default-domain
            opset outside :data:`SUPPORTED_OPSETS`.
    """
    path = pathlib.Path(path)
    model = _parse_model_file(path)
    _check_opsets(model, path)
    _load_external_data(model, path)
    _run_checker(model, path)
    if fold_constants:
        fold_constant_nodes(model.graph, ir_version=model.ir_version)
    assign_node_names(model.graph)
    return model


def _fail(path: pathlib.Path, reason: str, fix: str) -> ModelLoadError:
    return ModelLoadError(f"cannot load model '{path}': {reason}; {fix}")


def _looks_like_onnx(data: bytes) -> bool:
    """Whether ``data`` starts like a serialized ModelProto (field 1, ``ir_version``, 1..31)."""
    return len(data) >= 2 and data[0] == 0x08 and 1 <= data[1] < 32


def _parse_model_file(path: pathlib.Path) -> onnx.ModelProto:
    if not path.exists():
        raise _fail(path, "the file does not exist", "check the path")
    if path.is_dir():
        raise _fail(path, "it is a directory", "pass the .onnx file inside it")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _fail(path, f"it cannot be read ({exc.strerror})", "check its permissions") from exc
    truncated = (
        "the file looks like ONNX but is truncated or corrupted",
        "re-export or re-download it",
    )
    not_onnx = ("it is not an ONNX model", "pass a .onnx file exported by an ONNX exporter")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise _fail(path, *(truncated if _looks_like_onnx(data) else not_onnx)) from exc
    if not model.HasField("graph") or len(model.graph.node) == 0 or model.ir_version == 0:
        raise _fail(path, *(truncated if _looks_like_onnx(data) else not_onnx))
    return model


def _check_opsets(model: onnx.ModelProto, path: pathlib.Path) -> None:
    local_domains = {function.domain for function in model.functions}
    for opset in model.opset_import:
        if opset.domain in _DEFAULT_DOMAINS and opset.version not in SUPPORTED_OPSETS:
            raise UnsupportedModelError(
                f"model '{path}' uses default-domain opset {opset.version}, outside the "
                f"supported {SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1}; convert it "
                "with onnx.version_converter or re-export it with a supported opset"
            )
        if opset.domain not in KNOWN_DOMAINS and opset.domain not in local_domains:
            known = ", ".join(repr(d) for d in sorted(KNOWN_DOMAINS))
            raise UnsupportedModelError(
                f"model '{path}' imports unknown operator domain '{opset.domain}' "
                f"(known: {known}); re-export it without custom operators"
            )
    if not any(opset.domain in _DEFAULT_DOMAINS for opset in model.opset_import):
        raise UnsupportedModelError(
            f"model '{path}' has no default-domain (ai.onnx) opset import; re-export it with "
            "an opset in the supported range"
        )


def _run_checker(model: onnx.ModelProto, path: pathlib.Path) -> None:
    # A model over 2 GB (its external data loaded) cannot be serialized for the checker; its
    # file on disk, which refers to the data instead of holding it, can be checked.
    too_large = model.ByteSize() >= EXTERNAL_DATA_THRESHOLD
    try:
        onnx.checker.check_model(str(path) if too_large else model, full_check=False)
    except (onnx.checker.ValidationError, ValueError) as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise _fail(
            path, f"the ONNX checker rejects it ({first_line})", "fix or re-export the model"
        ) from exc


def _load_external_data(model: onnx.ModelProto, path: pathlib.Path) -> None:
    base_dir = path.parent
    for tensor in iter_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        info = external_data_helper.ExternalDataInfo(tensor)
        data_path = base_dir / info.location
        if not info.location or not data_path.is_file():
            raise _fail(
                path,
                f"external data file '{data_path}' of tensor '{tensor.name}' is missing",
                "copy the data file next to the model",
            )
        try:
            external_data_helper.load_external_data_for_tensor(tensor, str(base_dir))
            tensor.ClearField("data_location")  # as if the data had always been inline
        except (OSError, ValueError, RuntimeError, onnx.checker.ValidationError) as exc:
            reason = " ".join(str(exc).split())
            raise _fail(
                path,
                f"external data file '{data_path}' cannot be read for tensor "
                f"'{tensor.name}' ({reason})",
                "re-export the model or copy its complete data file",
            ) from exc


def iter_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Yields every dense tensor of a model, in a fixed order.

    Covers initializers, sparse initializers' values and indices, and tensors held in node
    attributes, in the main graph, in all subgraphs and in model-local functions.

    Args:
        model: The model to walk.

    Yields:
        The tensors themselves (mutable), not copies.
    """
    yield from _iter_graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from _iter_node_tensors(node)


def _iter_graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        yield from _iter_node_tensors(node)


def _iter_node_tensors(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    for attribute in node.attribute:
        if attribute.HasField("t"):
            yield attribute.t
        yield from attribute.tensors
        if attribute.HasField("sparse_tensor"):
            yield attribute.sparse_tensor.values
            yield attribute.sparse_tensor.indices
        for sparse in attribute.sparse_tensors:
            yield sparse.values
            yield sparse.indices
        if attribute.HasField("g"):
            yield from _iter_graph_tensors(attribute.g)
        for subgraph in attribute.graphs:
            yield from _iter_graph_tensors(subgraph)


# ----------------------------------------------------------------------------------------------
# Normalization: Constant folding and node names
# ----------------------------------------------------------------------------------------------


def _constant_value(node: onnx.NodeProto) -> onnx.TensorProto | None:
    """The tensor a ``Constant`` node produces, or None when it is not foldable here."""
    if len(node.attribute) != 1 or node.attribute[0].ref_attr_name:
        return None
    attribute = node.attribute[0]
    if attribute.name == "value":
        tensor = onnx.TensorProto()
        tensor.CopyFrom(attribute.t)
        return tensor
    if attribute.name == "value_float":
        return numpy_helper.from_array(np.array(attribute.f, dtype=np.float32))
    if attribute.name == "value_floats":
        return numpy_helper.from_array(np.array(list(attribute.floats), dtype=np.float32))
    if attribute.name == "value_int":
        return numpy_helper.from_array(np.array(attribute.i, dtype=np.int64))
    if attribute.name == "value_ints":
        return numpy_helper.from_array(np.array(list(attribute.ints), dtype=np.int64))
    return None  # sparse_value, value_string(s): left as nodes


def fold_constant_nodes(graph: onnx.GraphProto, *, ir_version: int) -> int:
    """Turns the graph's ``Constant`` nodes into initializers, in place.

    Only the given graph is rewritten, not the subgraphs of If/Loop/Scan (they still see the new
    initializers as outer-scope values). A Constant whose output is a graph output or already an
    initializer or graph input is left alone, and so are ``sparse_value`` and ``value_string(s)``
    Constants. Other nodes keep their order.

    Args:
        graph: The graph to rewrite.
        ir_version: The model's IR version; below 4, initializers are also declared as graph
            inputs, as that IR requires.

    Returns:
        The number of Constant nodes folded.
    """
    taken = {value.name for value in graph.output}
    taken.update(tensor.name for tensor in graph.initializer)
    taken.update(value.name for value in graph.input)
    kept: list[onnx.NodeProto] = []
    folded = 0
    for node in graph.node:
        output = node.output[0] if len(node.output) == 1 else ""
        tensor = None
        if node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS and output:
            tensor = _constant_value(node) if output not in taken else None
        if tensor is None:
            kept.append(node)
            continue
        tensor.name = output
        graph.initializer.append(tensor)
        if ir_version < 4:
            graph.input.append(
                onnx.helper.make_tensor_value_info(output, tensor.data_type, list(tensor.dims))
            )
        taken.add(output)
        folded += 1
    if folded:
        kept = [_copy_node(node) for node in kept]
        del graph.node[:]
        graph.node.extend(kept)
    return folded


def _copy_node(node: onnx.NodeProto) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    return copy


def assign_node_names(graph: onnx.GraphProto) -> int:
    """Gives every node of the graph a unique, non-empty name, in place.

    An unnamed node becomes ``"{op_type}_{index}"`` (its index in the graph); the second and
    later nodes sharing a name get ``"_1"``, ``"_2"``... appended. The first holder of a name
    keeps it, and no generated name takes a name some other node already has. Subgraph nodes
    are left as they are.

    Args:
        graph: The graph to rename.

    Returns:
        The number of nodes renamed.
    """
    given = {node.name for node in graph.node if node.name}
    used: set[str] = set()
    renamed = 0
    for index, node in enumerate(graph.node):
        if node.name and node.name not in used:
            used.add(node.name)
            continue
        base = node.name or f"{node.op_type}_{index}"
        candidate, suffix = base, 1
        while candidate in used or candidate in given:
            candidate, suffix = f"{base}_{suffix}", suffix + 1
        node.name = candidate
        used.add(candidate)
        renamed += 1
    return renamed


def normalized(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` as :func:`load_model` leaves a file: ``Constant`` nodes folded into
    initializers (:func:`fold_constant_nodes`) and every node named uniquely
    (:func:`assign_node_names`). The model itself when it already is so, else a normalized copy:
    the caller's proto (``onnx.load``, an exporter's output) is never edited."""
    names = [node.name for node in model.graph.node]
    foldable = any(node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS
                   for node in model.graph.node)
    if not foldable and all(names) and len(set(names)) == len(names):
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    fold_constant_nodes(copy.graph, ir_version=copy.ir_version)
    assign_node_names(copy.graph)
    return copy


def model_opset(model: onnx.ModelProto) -> int:
    """Returns the model's default-domain (``ai.onnx``) opset version.

    Args:
        model: The model.

    Raises:
        UnsupportedModelError: The model imports no default-domain opset.
    """
    for opset in model.opset_import:
        if opset.domain in _DEFAULT_DOMAINS:
            return int(opset.version)
    raise UnsupportedModelError(
        f"model '{model.graph.name}' has no default-domain (ai.onnx) opset import; re-export it "
        "with an opset in the supported range"
    )


# ----------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    input_path: str | os.PathLike | None = None,
    external_data: bool | None = None,
) -> pathlib.Path:
    """Writes a model atomically, with external data when it is too large for one file.

    Args:
        model: The model; it is not modified.
        path: The destination ``.onnx`` file; its directory must exist.
        input_path: The file the model was loaded from; saving over it is refused.
        external_data: ``True`` writes tensors of 1 KiB or more to ``<name>.data`` beside the
            model, ``False`` writes one file, ``None`` decides by the serialized size
            (:data:`EXTERNAL_DATA_THRESHOLD`).

    Returns:
        The path of the written model.

    Raises:
        UsageError: ``path`` is ``input_path``, a directory, in a directory that does not exist,
            or the model is too large for one file and ``external_data`` is ``False``.
        OSError: Writing failed (the destination is then unchanged).
    """
    destination = _check_destination(pathlib.Path(path), input_path)
    _require_in_memory(model, destination)
    if external_data is None:
        external_data = model.ByteSize() >= EXTERNAL_DATA_THRESHOLD
    elif not external_data and model.ByteSize() >= EXTERNAL_DATA_THRESHOLD:
        raise UsageError(
            f"cannot save '{destination}' as one file: the model is {model.ByteSize()} bytes, "
            "over protobuf's 2 GB limit; save it with external data"
        )
    if external_data:
        _save_with_external_data(model, destination)
    else:
        _atomic_write(destination, lambda file: file.write(model.SerializeToString()))
    return destination


def _check_destination(path: pathlib.Path, input_path: str | os.PathLike | None) -> pathlib.Path:
    if input_path is not None:
        source = pathlib.Path(input_path)
        if path.exists() and source.exists():
            same = os.path.samefile(path, source)
        else:
            same = path.resolve() == source.resolve()
        if same:
            raise UsageError(
                f"output path '{path}' is the input model '{source}'; idap-onnx never "
                "overwrites its input, choose another output path"
            )
    if path.is_dir():
        raise UsageError(f"output path '{path}' is a directory; give a file name ending in .onnx")
    if not path.parent.is_dir():
        raise UsageError(
            f"cannot save '{path}': directory '{path.parent}' does not exist; create it first"
        )
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> pathlib.Path:
    """Write ``text`` (UTF-8) to ``path`` as ``_atomic_write`` does: a temporary file in the
    same folder, fsynced, given the umask's permissions, then renamed into place."""
    path = pathlib.Path(path)
    _atomic_write(path, lambda file: file.write(text.encode("utf-8")))
    return path


def _atomic_write(destination: pathlib.Path, write: Callable[[IO[bytes]], object]) -> None:
    """Writes via a temporary file in the destination directory, then renames it into place."""
    temporary = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed and renamed below
        delete=False, dir=destination.parent, prefix=f".{destination.name}.", suffix=".tmp"
    )
    try:
        with temporary as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary.name, _new_file_mode())  # NamedTemporaryFile creates it as 0o600
        os.replace(temporary.name, destination)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary.name)
        raise


def _new_file_mode() -> int:
    """The permissions ``open()`` would give a new file: 0o666 less the process umask."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def _save_with_external_data(model: onnx.ModelProto, destination: pathlib.Path) -> None:
    """Writes ``<name>.data`` (tensors of 1 KiB or more), then the model referencing it."""
    location = f"{destination.name}.data"
    copy = onnx.ModelProto()
    copy.CopyFrom(model)

    def write_data(file: IO[bytes]) -> None:
        offset = 0
        for tensor in iter_tensors(copy):
            if not tensor.HasField("raw_data"):
                continue
            data = tensor.raw_data
            if len(data) < _EXTERNAL_TENSOR_MIN_BYTES:
                continue
            padding = -offset % _EXTERNAL_ALIGNMENT
            file.write(b"\0" * padding)
            offset += padding
            file.write(data)
            external_data_helper.set_external_data(tensor, location, offset, len(data))
            tensor.data_location = onnx.TensorProto.EXTERNAL
            tensor.ClearField("raw_data")
            offset += len(data)

    _atomic_write(destination.parent / location, write_data)
    _atomic_write(destination, lambda file: file.write(copy.SerializeToString()))


def _require_in_memory(model: onnx.ModelProto, destination: pathlib.Path) -> None:
    for tensor in iter_tensors(model):
        if external_data_helper.uses_external_data(tensor):
            raise UsageError(
                f"cannot save '{destination}': tensor '{tensor.name}' still refers to external "
                "data; load the model with idap_onnx.model_io.load_model"
            )


# ----------------------------------------------------------------------------------------------
# Session files: a variant of a model for ONNX Runtime, without copying its weights in memory
# ----------------------------------------------------------------------------------------------


def write_variant(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    nodes: Iterable[onnx.NodeProto],
    initializers: Iterable[onnx.TensorProto] = (),
    outputs: Iterable[str] = (),
    inputs: Iterable[onnx.ValueInfoProto] | None = None,
    only_outputs: bool = False,
) -> pathlib.Path:
    """Writes ``model`` with its main graph's node list replaced by ``nodes`` and the given
    ``initializers`` and ``outputs`` added (and its graph inputs replaced by ``inputs`` when
    given; its graph outputs dropped, so that ``outputs`` are the only ones, with
    ``only_outputs``), for an ONNX Runtime session to load from ``path``.

    The weights are streamed one tensor at a time into ``<path>.data`` (external data, offsets
    aligned for mmap), so peak memory stays the model plus one tensor: no copy of the model,
    no serialized string of it. Weights that :func:`offloaded` moved to disk are copied file
    to file. ``model`` is not modified. Not atomic: meant for a temporary directory (use
    :func:`save_model` for results).
    """
    destination = pathlib.Path(path)
    location = f"{destination.name}.data"
    with open(destination.parent / location, "wb") as data:
        head = _head(model, nodes, _ExternalWriter(data, location),
                     lambda t: _raw_bytes(t) >= _EXTERNAL_TENSOR_MIN_BYTES, inputs)
    head.graph.initializer.extend(initializers)
    if only_outputs:
        del head.graph.output[:]
    head.graph.output.extend(onnx.ValueInfoProto(name=name) for name in outputs)
    destination.write_bytes(head.SerializeToString())
    return destination


#: External-data location of each live :func:`offloaded` copy -> the folder holding its file.
_OFFLOADED: dict[str, pathlib.Path] = {}


@contextlib.contextmanager
def offloaded(model: onnx.ModelProto) -> Iterator[onnx.ModelProto]:
    """A copy of ``model`` whose float weights of over 1024 elements (those shape analysis
    treats as inputs) live in a temporary file, not in the proto.

    Inside the ``with`` block :func:`tensor_array` (and so ``GraphIndex.constant``) and
    :func:`write_variant` read them from the file. Once the caller drops its last reference
    to ``model``, its weights' memory is freed: the protobuf runtime (upb) frees a message's
    fields only with the whole message, so this copy is how a long pass (calibration) runs
    without the weights twice in memory, once in the proto and once in ONNX Runtime. The
    copy must not leave the block (its weights are deleted on exit).
    """
    with tempfile.TemporaryDirectory(prefix="idap-weights-") as tmp:
        folder = pathlib.Path(tmp)
        location = _location(folder)
        with open(folder / location, "wb") as data:
            light = _head(model, model.graph.node, _ExternalWriter(data, location), _offloadable)
        del model  # this frame must not keep the caller's model (and its weights) alive
        _OFFLOADED[location] = folder
        try:
            yield light
        finally:
            _OFFLOADED.pop(location, None)


@contextlib.contextmanager
def load_offloaded(
    path: str | os.PathLike, *, fold_constants: bool = True
) -> Iterator[onnx.ModelProto]:
    """:func:`load_model` for the length of a ``with`` block, its large float weights left on
    disk as in :func:`offloaded`, without ever reading them into memory.

    A model saved as one file is read by ``wire.read_without_weights``: its weights stay in
    the file (reached through a link in a temporary folder) and the peak while loading is the
    model's structure, not twice its weights. Any other file (external data, or one the scan
    cannot read) goes through :func:`load_model` and :func:`offloaded`, so its errors are
    load_model's. The model yielded passed the same checks and naming as ``load_model``'s; it
    must not leave the block.
    """
    from idap_onnx import wire

    path = pathlib.Path(path)
    with tempfile.TemporaryDirectory(prefix="idap-weights-") as tmp:
        location = _location(pathlib.Path(tmp))
        model = None
        try:
            data, _ = wire.read_without_weights(path, location)
            model = onnx.ModelProto.FromString(data)
            del data
            if not model.HasField("graph") or not model.graph.node or model.ir_version == 0:
                model = None  # let load_model say what is wrong
            else:
                os.symlink(path.resolve(), pathlib.Path(tmp) / location)
        except (OSError, wire.WireError, DecodeError, ValueError, RuntimeError):
            model = None
        if model is None:
            loaded = load_model(path, fold_constants=fold_constants)
            with offloaded(loaded) as light:
                del loaded
                yield light
            return
        _OFFLOADED[location] = pathlib.Path(tmp)
        try:
            _check_opsets(model, path)
            _run_checker(_without_offloaded(model), path)
            if fold_constants:
                fold_constant_nodes(model.graph, ir_version=model.ir_version)
            assign_node_names(model.graph)
            yield model
        finally:
            _OFFLOADED.pop(location, None)


def _location(folder: pathlib.Path) -> str:
    """The external-data name of the weights kept in ``folder`` (a fresh temporary folder, so
    the name is unique among the live entries of ``_OFFLOADED``)."""
    return f"idap-weights-{folder.name}.data"


def _without_offloaded(model: onnx.ModelProto) -> onnx.ModelProto:
    """What the checker can read of a :func:`load_offloaded` model: the weights left on disk
    become graph inputs of their type and shape (the checker would look for their file
    relative to the working directory). The scan checked their byte lengths."""
    out = onnx.ModelProto()
    _copy_fields(model, out, skip=("graph",))
    _copy_fields(model.graph, out.graph, skip=("initializer",))
    listed = {v.name for v in model.graph.input}
    for tensor in model.graph.initializer:
        if _offloaded_at(tensor) is None:
            out.graph.initializer.add().CopyFrom(tensor)
        elif tensor.name not in listed:
            out.graph.input.append(
                onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))
    return out


def tensor_array(tensor: onnx.TensorProto) -> np.ndarray:
    """``numpy_helper.to_array``, also for a weight that :func:`offloaded` moved to disk."""
    where = _offloaded_at(tensor)
    if where is None:
        return numpy_helper.to_array(tensor)
    path, offset, length = where
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    array = np.fromfile(path, dtype=dtype, count=length // dtype.itemsize, offset=offset)
    return array.reshape(tuple(tensor.dims))


def is_large_weight(data_type: int, elements: int) -> bool:
    """A float32 or float16 tensor of over 1024 elements: a weight that shape analysis treats
    as a graph input (``shapes.skeleton``) and that :func:`offloaded`, :func:`load_offloaded`
    and ``wire.read_without_weights`` keep on disk. One rule, so that every tensor left on
    disk is one the skeleton drops."""
    return data_type in _LARGE_WEIGHT_TYPES and elements > 1024


_LARGE_WEIGHT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)


def _offloadable(tensor: onnx.TensorProto) -> bool:
    """A large weight (:func:`is_large_weight`) held as raw bytes."""
    return (is_large_weight(tensor.data_type, int(np.prod(tensor.dims)))
            and tensor.HasField("raw_data"))


def _raw_bytes(tensor: onnx.TensorProto) -> int:
    """The tensor's raw data size, as its serialized size (a few bytes more; reading
    ``raw_data`` to measure it would copy the bytes), or its length on disk when
    :func:`offloaded` holds it."""
    where = _offloaded_at(tensor)
    if where is not None:
        return where[2]
    return tensor.ByteSize() if tensor.HasField("raw_data") else 0


def _offloaded_at(tensor: onnx.TensorProto) -> tuple[pathlib.Path, int, int] | None:
    """(file, offset, length) of a weight an :func:`offloaded` copy holds on disk, else None."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    info = {entry.key: entry.value for entry in tensor.external_data}
    folder = _OFFLOADED.get(info.get("location", ""))
    if folder is None:
        return None
    return folder / info["location"], int(info.get("offset", 0)), int(info["length"])


class _ExternalWriter:
    """Appends tensors' bytes to an open external-data file and makes their stubs."""

    def __init__(self, data: IO[bytes], location: str) -> None:
        self.data, self.location = data, location

    def add(self, tensor: onnx.TensorProto, stub: onnx.TensorProto) -> None:
        """Writes ``tensor``'s bytes (from its raw data, or file to file when offloaded) at
        the next aligned offset and makes ``stub`` (a copy without data) point to them."""
        self.data.write(b"\0" * (-self.data.tell() % _EXTERNAL_ALIGNMENT))
        offset = self.data.tell()
        where = _offloaded_at(tensor)
        if where is None:
            self.data.write(tensor.raw_data)
        else:
            with open(where[0], "rb") as src:
                src.seek(where[1])
                left = where[2]
                while left:
                    chunk = src.read(min(left, 1 << 24))
                    if not chunk:
                        raise OSError(f"offloaded weight {tensor.name!r} is truncated")
                    self.data.write(chunk)
                    left -= len(chunk)
        length = self.data.tell() - offset
        del stub.external_data[:]
        for key, value in (("location", self.location), ("offset", offset),
                           ("length", length)):
            entry = stub.external_data.add()
            entry.key, entry.value = key, str(value)
        stub.data_location = onnx.TensorProto.EXTERNAL


def _head(
    model: onnx.ModelProto,
    nodes: Iterable[onnx.NodeProto],
    writer: _ExternalWriter,
    external: Callable[[onnx.TensorProto], bool],
    inputs: Iterable[onnx.ValueInfoProto] | None = None,
) -> onnx.ModelProto:
    """``model`` without its main graph's nodes (``nodes`` instead) and with every
    initializer that ``external`` selects written by ``writer`` and left as a stub; the rest
    copied. ``raw_data`` is never read except to write it."""
    head = onnx.ModelProto()
    _copy_fields(model, head, skip=("graph",))
    skip = ("node", "initializer") + (() if inputs is None else ("input",))
    _copy_fields(model.graph, head.graph, skip=skip)
    if inputs is not None:
        head.graph.input.extend(inputs)
    head.graph.node.extend(nodes)
    for tensor in model.graph.initializer:
        if not external(tensor):
            head.graph.initializer.add().CopyFrom(tensor)
            continue
        stub = head.graph.initializer.add()
        _copy_fields(tensor, stub, skip=("raw_data", "external_data", "data_location"))
        writer.add(tensor, stub)
    return head


def _copy_fields(source, target, *, skip: tuple[str, ...]) -> None:
    """Copies every set field of protobuf message ``source`` into ``target`` except ``skip``
    (which are never read: reading ``raw_data`` would copy the tensor's bytes)."""
    for field in source.DESCRIPTOR.fields:
        if field.name in skip:
            continue
        if field.is_repeated:
            getattr(target, field.name).extend(getattr(source, field.name))
        elif not source.HasField(field.name):
            continue
        elif field.type == field.TYPE_MESSAGE:
            getattr(target, field.name).CopyFrom(getattr(source, field.name))
        else:
            setattr(target, field.name, getattr(source, field.name))
