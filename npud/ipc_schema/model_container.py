"""The model container: one ONNX model and its tensor data, self-contained, in one byte string.

ONNX keeps weights of large models in *external data* files that the model names by path.
npud never opens a path that came from a client (a relative location such as ``etc/shadow``
would be resolved against the daemon's or a worker's working directory), so the client
library reads those files itself, with the user's own permissions, and sends what it read:

- a model whose data fits in one protobuf (< 2 GiB) travels as plain ONNX bytes, with the
  data inlined (``raw_data``), exactly what ``onnx.load`` then ``onnx.save`` would produce;
- a larger model travels as this container, because protobuf cannot encode a message over
  2 GiB.  Its layout, all integers little-endian::

      offset  size  field
           0     8  magic  b"NPUDMDL\\0"
           8     4  version (1)
          12     4  reserved, 0
          16     8  n: length of the ONNX ModelProto that follows
          24     n  the ModelProto
        24+n     -  the data section: tensor bytes, back to back

  Each tensor kept out of the protobuf has ``data_location = EXTERNAL`` and the external
  data entries ``location = CONTAINER_LOCATION``, ``offset`` (from the start of the data
  section) and ``length``.  CONTAINER_LOCATION begins with a NUL byte, which no file name
  can contain, so a container reference can never be mistaken for a file.

The magic cannot begin a valid ModelProto ("N" would be field 9 with the undefined wire
type 6), so plain ONNX bytes and containers are told apart by their first bytes.  The
compiler refuses every external reference other than a container's, naming the tensor,
before it touches the file system.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

MAGIC = b"NPUDMDL\0"
VERSION = 1
HEADER = struct.Struct("<8sIIQ")
CONTAINER_LOCATION = "\0npud-container"
PROTOBUF_LIMIT = (1 << 31) - 1
"""The largest message protobuf encodes: a model over it must travel as a container."""


class ContainerError(ValueError):
    """The bytes start like a container but are not a valid one."""


def is_container(data) -> bool:
    return bytes(data[:len(MAGIC)]) == MAGIC


def pack(model_proto: bytes, chunks: list) -> bytes:
    """A container of the serialised ``model_proto`` and the data section ``chunks`` (in the
    order the proto's offsets count them)."""
    head = HEADER.pack(MAGIC, VERSION, 0, len(model_proto))
    return b"".join([head, model_proto, *chunks])


def unpack(data) -> tuple[memoryview, memoryview]:
    """The (ModelProto bytes, data section) of a container, as views of ``data``.

    Raises ContainerError naming what is wrong: a short header, an unknown version, or a
    proto length past the end."""
    view = memoryview(data)
    if len(view) < HEADER.size:
        raise ContainerError(f"model container: {len(view)} bytes, shorter than its "
                             f"{HEADER.size}-byte header")
    magic, version, reserved, n = HEADER.unpack_from(view)
    if magic != MAGIC:
        raise ContainerError("model container: bad magic")
    if version != VERSION or reserved != 0:
        raise ContainerError(f"model container version {version} (reserved {reserved}); "
                             f"this compiler reads version {VERSION}")
    if n > len(view) - HEADER.size:
        raise ContainerError(f"model container: the model is said to be {n} bytes but only "
                             f"{len(view) - HEADER.size} follow the header")
    return view[HEADER.size:HEADER.size + n], view[HEADER.size + n:]


def all_tensors(model: Any) -> Iterator[tuple[str, Any]]:
    """(what, tensor) for every TensorProto an onnx.ModelProto holds, subgraphs and functions
    included: where external data references can hide.  (Reads protobuf fields only, so
    this module needs no onnx import.)"""
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from _node_tensors(node)


def _graph_tensors(graph: Any) -> Iterator[tuple[str, Any]]:
    for t in graph.initializer:
        yield "initializer", t
    for s in graph.sparse_initializer:
        yield "sparse initializer", s.values
        yield "sparse initializer", s.indices
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: Any) -> Iterator[tuple[str, Any]]:
    what = f"attribute tensor of node {node.name or node.op_type!r}"
    for a in node.attribute:
        if a.HasField("t"):
            yield what, a.t
        yield from ((what, t) for t in a.tensors)
        if a.HasField("sparse_tensor"):
            yield what, a.sparse_tensor.values
            yield what, a.sparse_tensor.indices
        for s in a.sparse_tensors:
            yield what, s.values
            yield what, s.indices
        if a.HasField("g"):
            yield from _graph_tensors(a.g)
        for g in a.graphs:
            yield from _graph_tensors(g)
