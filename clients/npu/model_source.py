"""A model file and its external data, read by the client, sent as one self-contained model.

ONNX stores the weights of large models in external data files that the model names by
path, relative to the model.  The daemon never opens a path a client names (it would do so
with the service's permissions), so the client reads them here, with the user's permissions,
through onnx's own checked opener (it refuses locations that are absolute, contain ``..`` or
lead out of the model's directory through a symlink), exactly as ``onnx.load(path)`` does.

What is sent: plain ONNX bytes with the data inlined when they fit one protobuf (< 2 GiB),
otherwise a model container (npud/ipc_schema/model_container.py) whose data section holds every
tensor of external data.  A model file without external data is sent as read, unparsed.
"""

from __future__ import annotations

import os
from collections import OrderedDict

from npud.ipc_schema import model_container
from npud.ipc_schema.errors import ErrorCode

from .errors import error

LOCATION_KEY = b"\x0a\x08location"
"""How protobuf encodes the key of an external data entry (field 1, 8 bytes, "location"):
every model with external data contains it, so a file without it is sent unparsed."""


_READ: OrderedDict[tuple, tuple[str, ...]] = OrderedDict()
"""(device, inode, size, mtime) of model files read here -> the external data files each named,
so that a client's digest memo (model.ModelDigests) also notices a changed data file."""
_READ_LIMIT = 256


def read_model_file(path) -> bytes:
    """The bytes to send for the model file at ``path``: the file itself, or, if it names
    external data, the model with that data read from beside it."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read()
    except OSError as exc:
        raise error(ErrorCode.EINVAL, f"cannot read model file {path}: {exc.strerror}") from None
    externals: tuple[str, ...] = ()
    if LOCATION_KEY in data:
        import onnx  # only models with external data pay for parsing here

        try:
            model = onnx.load_from_string(data)
        except Exception:  # noqa: BLE001 -- not ONNX after all: the compiler says what is wrong
            model = None
        tensors = _external_tensors(model) if model is not None else []
        if tensors:
            base_dir = os.path.dirname(os.path.abspath(path))
            externals = tuple(sorted({os.path.join(base_dir, _location(t)) for t in tensors}))
            data = _inline(model, tensors, base_dir, str(path), model_container.PROTOBUF_LIMIT)
    _READ[(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)] = externals
    while len(_READ) > _READ_LIMIT:
        _READ.popitem(last=False)
    return data


def external_files(key: tuple, version: tuple) -> tuple[str, ...] | None:
    """The external data files of the model file ``key`` (device, inode) at ``version`` (size,
    mtime), as ``read_model_file`` found them; None if it did not read that version."""
    return _READ.get(key + version)


def versions(paths: tuple[str, ...]) -> tuple:
    """(size, mtime) of each file, None for one that is gone: a changed tuple means changed data."""
    out = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append((st.st_size, st.st_mtime_ns))
        except OSError:
            out.append(None)
    return tuple(out)


def self_contained(model, base_dir: str, *, what: str = "the model",
                   limit: int = model_container.PROTOBUF_LIMIT) -> bytes:
    """``model`` (an onnx.ModelProto, changed in place) with its external data read from
    ``base_dir``: plain ONNX bytes while they stay under ``limit``, else a model container."""
    return _inline(model, _external_tensors(model), base_dir, what, limit)


def _inline(model, tensors: list, base_dir: str, what: str, limit: int) -> bytes:
    from onnx import TensorProto

    chunks = [_read(tensor, base_dir, what) for tensor in tensors]
    if model.ByteSize() + sum(len(c) + 16 for c in chunks) <= limit:   # 16: a field's tag and length, generously
        for tensor, chunk in zip(tensors, chunks):
            tensor.raw_data = chunk
        return model.SerializeToString()
    # Past protobuf's limit: every tensor read goes in the container's data section, so the
    # compiler parses a small protobuf and reads the weights where they arrived, uncopied.
    offset = 0
    for tensor, chunk in zip(tensors, chunks):
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", model_container.CONTAINER_LOCATION), ("offset", offset),
                           ("length", len(chunk))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)
        offset += len(chunk)
    return model_container.pack(model.SerializeToString(), chunks)


def _read(tensor, base_dir: str, what: str) -> bytes:
    """The external data of ``tensor``, read from beside the model (it is left without data)."""
    from onnx import external_data_helper

    try:
        external_data_helper.load_external_data_for_tensor(tensor, base_dir)
    except Exception as exc:  # noqa: BLE001 -- OSError, ValueError, onnx's ValidationError
        raise error(ErrorCode.EINVAL, f"cannot read the external data of tensor {tensor.name!r} "
                                      f"of {what}: {exc}") from None
    chunk = tensor.raw_data
    tensor.ClearField("raw_data")
    return chunk


def serialise(model) -> bytes:
    """An onnx.ModelProto's bytes; EINVAL with the remedy if it is too large for one protobuf."""
    try:
        return model.SerializeToString()
    except ValueError as exc:   # protobuf refuses messages over 2 GiB
        raise error(ErrorCode.EINVAL, f"the model is too large to serialise ({exc}): save it with "
                                      "external data (onnx.save(..., save_as_external_data=True)) "
                                      "and pass its path") from None


def _location(tensor) -> str:
    return next((e.value for e in tensor.external_data if e.key == "location"), "")


def _external_tensors(model) -> list:
    from onnx import TensorProto

    return [t for _, t in model_container.all_tensors(model) if t.data_location == TensorProto.EXTERNAL]
