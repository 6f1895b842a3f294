"""External data, the compiler's side: data comes from the bytes sent, never from a file.

A model that names external data files (ONNX's ``data_location = EXTERNAL``) would make
whoever decodes it open those paths with its own permissions; the compiler runs for the
daemon, so that is a file-disclosure hole.  The client library resolves a model's external
data next to the model file with the user's permissions and sends it inline, or in a model
container (npud/ipc_schema/model_container.py) when it is too large for one protobuf.  Here:

- ``parse(model_bytes)`` reads plain ONNX bytes or a container;
- ``resolve(model, data)`` walks every tensor the model holds (initializers, sparse
  initializers, node attributes, subgraphs and functions), copies each container reference's
  bytes in, and refuses any other external reference with a CompileError naming the tensor:
  without opening, stat-ing or measuring anything on the file system.
"""

from __future__ import annotations

import onnx

from npud.ipc_schema import model_container

from .errors import CompileError

REFUSAL = ("its data is in an external file ({location!r}), and npud never opens files a model "
           "names. Pass the model's path to Client.load (the client reads the external data next "
           "to the model, with your permissions, as onnx.load does), or embed the data "
           "(onnx.load, then onnx.save without save_as_external_data)")


def parse(model_bytes) -> tuple[onnx.ModelProto, memoryview | None]:
    """The ModelProto in ``model_bytes`` and, for a container, its data section.  External
    references are left as they are: call ``resolve`` before decoding any tensor."""
    data = None
    if model_container.is_container(model_bytes):
        try:
            model_bytes, data = model_container.unpack(model_bytes)
        except model_container.ContainerError as e:
            raise CompileError(f"malformed model: {e}") from None
    try:
        # What onnx.load_from_string does, on any buffer: it takes only bytes, and bytes() of
        # the worker's received frame would copy 100 MB of a ResNet-50
        model = onnx.ModelProto()
        consumed = model.ParseFromString(model_bytes)
        if consumed is not None and consumed != len(memoryview(model_bytes).cast("B")):
            raise ValueError(f"decoding consumed {consumed} of {len(model_bytes)} bytes")
    except MemoryError:
        raise                   # the worker's memory limit (worker._error says so), not the model
    except Exception as e:  # protobuf DecodeError and friends
        raise CompileError(f"malformed model: not an ONNX protobuf ({type(e).__name__}: {e})") from None
    return model, data


def resolve(model: onnx.ModelProto, data: memoryview | None, keep: bool = False) -> dict[str, memoryview]:
    """Make every tensor of ``model`` self-contained, or raise CompileError naming the first one
    whose data lies anywhere but in ``data`` (a container's data section).

    With ``keep``, the main graph's initializers that refer to the container are left as they
    are and returned instead, by name, as views of ``data``: a model past 2 GiB must not be
    copied into its protobuf (which cannot hold it) nor anywhere else (``import_onnx`` makes
    arrays of the views)."""
    views: dict[str, memoryview] = {}
    for tensor in model.graph.initializer if keep else ():
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            views[tensor.name] = _container_view(tensor, data, "initializer")
            _mark_resolved(tensor)    # its data is the view now, not the proto's
    for what, tensor in model_container.all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            tensor.raw_data = bytes(_container_view(tensor, data, what))
            _mark_resolved(tensor)
    return views


def _container_view(tensor: onnx.TensorProto, data: memoryview | None, what: str) -> memoryview:
    """The bytes of an external tensor, from the container; CompileError for any other place."""
    entries = {e.key: e.value for e in tensor.external_data}
    location = entries.get("location", "")
    if location != model_container.CONTAINER_LOCATION or data is None:
        raise CompileError(f"{what} {tensor.name!r}: " + REFUSAL.format(location=location))
    return _slice(data, entries, f"{what} {tensor.name!r}")


def _mark_resolved(tensor: onnx.TensorProto) -> None:
    tensor.data_location = onnx.TensorProto.DEFAULT
    del tensor.external_data[:]


def _slice(data: memoryview, entries: dict[str, str], what: str) -> memoryview:
    """The bytes a container reference names; CompileError if they are not all in ``data``."""
    try:
        offset = int(entries.get("offset", "0"))
        length = int(entries["length"])
    except (KeyError, ValueError):
        raise CompileError(f"malformed model: {what} refers to the container without a valid "
                           "offset and length") from None
    if offset < 0 or length < 0 or offset + length > len(data):
        raise CompileError(f"malformed model: {what} refers to bytes {offset}..{offset + length} "
                           f"of a {len(data)}-byte container data section")
    return data[offset:offset + length]
