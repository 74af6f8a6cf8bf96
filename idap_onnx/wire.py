"""A single-file ONNX model's structure without its weights, read from the protobuf wire format.

``onnx.load`` (and protobuf's parser under it) needs the whole file in memory as bytes and then
builds the parsed message beside them: twice the weights at peak, and the weights stay in the
proto for as long as the model lives. :func:`read_without_weights` scans the file instead
(https://protobuf.dev/programming-guides/encoding/), copies every field except the
``raw_data`` of the main graph's large float initializers, and writes those as external-data
references to their byte ranges in the file itself. The weights are never read.

Written here because neither onnx nor protobuf offers a lazy reader for a model saved as one
file. Only what a serialized ``ModelProto`` needs is handled: varint, 64-bit, length-delimited
and 32-bit fields; a malformed file raises :class:`WireError` and the caller falls back to
``onnx``'s own loader, whose errors it reports.
"""

from __future__ import annotations

import os
from typing import IO

from idap_onnx.model_io import is_large_weight

MODEL_GRAPH = 7  # ModelProto.graph
GRAPH_INITIALIZER = 5  # GraphProto.initializer
TENSOR_DIMS, TENSOR_DATA_TYPE, TENSOR_RAW_DATA = 1, 2, 9  # TensorProto fields
TENSOR_EXTERNAL_DATA, TENSOR_DATA_LOCATION = 13, 14
VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5  # wire types
ITEM_BYTES = {1: 4, 10: 2}  # TensorProto.FLOAT, FLOAT16 (``model_io.is_large_weight``'s types)
EXTERNAL = 1  # TensorProto.EXTERNAL


class WireError(ValueError):
    """The file is not a well-formed serialized ModelProto (or holds external data already)."""


def read_without_weights(path: str | os.PathLike, location: str) -> tuple[bytes, int]:
    """The serialized model at ``path`` with the ``raw_data`` of every main-graph initializer
    that ``model_io.is_large_weight`` selects replaced by an external-data reference (``location``,
    the absolute byte offset of the data in ``path``, its length). Returns the bytes and how
    many tensors were left in the file.

    Raises:
        WireError: malformed or truncated, two graph fields, or a tensor that already uses
            external data (such a model is loaded the usual way).
        OSError: the file cannot be read.
    """
    size = os.path.getsize(path)
    head, graph, moved = bytearray(), None, 0
    with open(path, "rb") as fh:
        while fh.tell() < size:
            start = fh.tell()
            field, wire_type = _tag(fh)
            if field == MODEL_GRAPH and wire_type == LENGTH:
                if graph is not None:
                    raise WireError("two graph fields")
                end = _length_end(fh, size)
                graph, moved = _graph(fh, end, size, location)
                continue
            _skip(fh, wire_type, size)
            head += _span(fh, start)
    if graph is None:
        raise WireError("no graph")
    return bytes(head + _key(MODEL_GRAPH, LENGTH) + _varint_bytes(len(graph)) + graph), moved


def _graph(fh: IO[bytes], end: int, size: int, location: str) -> tuple[bytes, int]:
    out, moved = bytearray(), 0
    while fh.tell() < end:
        start = fh.tell()
        field, wire_type = _tag(fh)
        if field == GRAPH_INITIALIZER and wire_type == LENGTH:
            tensor_end = _length_end(fh, end)
            tensor, left = _tensor(fh, tensor_end, size, location)
            moved += left
            out += _key(GRAPH_INITIALIZER, LENGTH) + _varint_bytes(len(tensor)) + tensor
            continue
        _skip(fh, wire_type, end)
        out += _span(fh, start)
    if fh.tell() != end:
        raise WireError("graph overruns its length")
    return bytes(out), moved


def _tensor(fh: IO[bytes], end: int, size: int, location: str) -> tuple[bytes, int]:
    """One initializer's fields; its raw data becomes a reference when it is left in the file."""
    kept, raw, data_type, elements = bytearray(), None, 0, 1
    while fh.tell() < end:
        start = fh.tell()
        field, wire_type = _tag(fh)
        if field == TENSOR_RAW_DATA and wire_type == LENGTH:
            raw_end = _length_end(fh, end)
            raw = (fh.tell(), raw_end - fh.tell())
            fh.seek(raw_end)
            continue
        if field in (TENSOR_EXTERNAL_DATA, TENSOR_DATA_LOCATION):
            raise WireError("the model already uses external data")
        if field == TENSOR_DATA_TYPE and wire_type == VARINT:
            data_type = _varint(fh)
        elif field == TENSOR_DIMS and wire_type == VARINT:
            elements *= _varint(fh)
        elif field == TENSOR_DIMS and wire_type == LENGTH:  # packed dims
            dims_end = _length_end(fh, end)
            while fh.tell() < dims_end:
                elements *= _varint(fh)
        else:
            _skip(fh, wire_type, end)
        kept += _span(fh, start)
    if fh.tell() != end:
        raise WireError("tensor overruns its length")
    if raw is None:
        return bytes(kept), 0
    offset, length = raw
    if is_large_weight(data_type, elements):
        if length != elements * ITEM_BYTES[data_type]:
            raise WireError("a tensor's raw data does not match its dims")
        for key, value in (("location", location), ("offset", str(offset)),
                           ("length", str(length))):
            entry = _string(1, key) + _string(2, value)
            kept += _key(TENSOR_EXTERNAL_DATA, LENGTH) + _varint_bytes(len(entry)) + entry
        kept += _key(TENSOR_DATA_LOCATION, VARINT) + _varint_bytes(EXTERNAL)
        return bytes(kept), 1
    fh.seek(offset)
    kept += _key(TENSOR_RAW_DATA, LENGTH) + _varint_bytes(length) + fh.read(length)
    fh.seek(end)
    return bytes(kept), 0


def _tag(fh: IO[bytes]) -> tuple[int, int]:
    tag = _varint(fh)
    if tag >> 3 == 0:
        raise WireError("field number 0")
    return tag >> 3, tag & 7


def _varint(fh: IO[bytes]) -> int:
    result, shift = 0, 0
    while True:
        byte = fh.read(1)
        if not byte:
            raise WireError("truncated varint")
        result |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return result
        shift += 7
        if shift > 63:
            raise WireError("varint longer than 10 bytes")


def _length_end(fh: IO[bytes], limit: int) -> int:
    """Reads a length prefix; the end offset of the payload that follows (within ``limit``)."""
    length = _varint(fh)
    return _checked(fh.tell() + length, limit)


def _checked(end: int, limit: int) -> int:
    if end > limit:
        raise WireError("a field runs past its message or the file")
    return end


def _skip(fh: IO[bytes], wire_type: int, limit: int) -> None:
    if wire_type == VARINT:
        _varint(fh)
    elif wire_type == FIXED64:
        fh.seek(_checked(fh.tell() + 8, limit))
    elif wire_type == FIXED32:
        fh.seek(_checked(fh.tell() + 4, limit))
    elif wire_type == LENGTH:
        length = _varint(fh)
        fh.seek(_checked(fh.tell() + length, limit))
    else:
        raise WireError(f"wire type {wire_type} (groups) is not used by ONNX")


def _span(fh: IO[bytes], start: int) -> bytes:
    """The bytes from ``start`` to the current position (the field just read), re-read."""
    end = fh.tell()
    fh.seek(start)
    data = fh.read(end - start)
    if len(data) != end - start:
        raise WireError("truncated field")
    return data


def _key(field: int, wire_type: int) -> bytes:
    return _varint_bytes(field << 3 | wire_type)


def _string(field: int, text: str) -> bytes:
    data = text.encode()
    return _key(field, LENGTH) + _varint_bytes(len(data)) + data


def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)
