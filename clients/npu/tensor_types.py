"""Tensor element types as numpy and onnxruntime spell them, and the checks every run applies to
its feeds (``Model.run``, ``Execution.run``, ``InferenceSession.run``): names, shapes and dtypes
are checked, never silently converted."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from npud.ipc_schema.errors import ErrorCode

from .errors import error

_ORT_NAMES = {
    np.dtype(np.float32): "float", np.dtype(np.float64): "double", np.dtype(np.float16): "float16",
    np.dtype(np.int8): "int8", np.dtype(np.int16): "int16", np.dtype(np.int32): "int32",
    np.dtype(np.int64): "int64", np.dtype(np.uint8): "uint8", np.dtype(np.uint16): "uint16",
    np.dtype(np.uint32): "uint32", np.dtype(np.uint64): "uint64", np.dtype(np.bool_): "bool",
}


def ort_type(dtype: np.dtype[Any]) -> str:
    """onnxruntime's name of a tensor of ``dtype``: ``tensor(float)``, ``tensor(double)``, ..."""
    if dtype.kind in "USO":
        return "tensor(string)"
    return f"tensor({_ORT_NAMES.get(np.dtype(dtype), str(dtype))})"


def check_dtype(name: str, x: np.ndarray[Any, Any], expected: np.dtype[Any]) -> None:
    """EINVAL, in onnxruntime's words, unless ``x`` has exactly the dtype ``expected``."""
    if x.dtype != expected:
        raise error(ErrorCode.EINVAL, f"input {name!r}: Unexpected input data type. Actual: ({ort_type(x.dtype)}) , "
                                      f"expected: ({ort_type(expected)}); pass a numpy array of that type "
                                      f"(e.g. np.asarray(x, dtype=np.{expected.name}))")


def feed_dict(feeds: Any, names: Sequence[str], what: str) -> dict[str, Any]:
    """``feeds`` as a dict by input name: a mapping as it is, one array for a one-input model.
    Anything else is EINVAL naming what to pass instead."""
    if isinstance(feeds, Mapping):
        bad = [k for k in feeds if not isinstance(k, str)]
        if bad:
            raise error(ErrorCode.EINVAL, f"{what}: feeds are keyed by input name (str), not {bad[0]!r}; "
                                          f"the inputs are {list(names)}")
        return dict(feeds)
    if feeds is None or isinstance(feeds, (str, bytes, list, tuple)):
        raise error(ErrorCode.EINVAL, f"{what} takes feeds as a dict by input name ({list(names)}) or, for a "
                                      f"one-input model, one numpy array; got {type(feeds).__name__}")
    if len(names) != 1:
        raise error(ErrorCode.EINVAL, f"this model has {len(names)} inputs ({', '.join(names)}): pass a dict")
    return {names[0]: feeds}


def check_feeds(feeds: Mapping[str, Any], expected: Sequence[tuple[str, tuple[int, ...], np.dtype[Any]]],
                *, partial: bool = False) -> dict[str, np.ndarray[Any, Any]]:
    """Each feed as an array, checked against ``expected`` (name, shape, dtype): no input missing
    (unless ``partial``), none unknown, each of its input's shape and exact dtype."""
    names = [name for name, _, _ in expected]
    missing = [] if partial else [n for n in names if n not in feeds]
    extra = sorted(set(feeds) - set(names))
    if missing or extra:
        raise error(ErrorCode.EINVAL, f"feeds do not match the model's inputs {names}: missing {missing}, "
                                      f"unknown {extra}")
    out = {}
    for name, shape, dtype in expected:
        if name not in feeds:
            continue
        x = np.asarray(feeds[name])
        check_dtype(name, x, dtype)
        if x.shape != shape:
            raise error(ErrorCode.EINVAL, f"input {name!r} has shape {list(x.shape)}, the model "
                                          f"expects {list(shape)}")
        out[name] = x
    return out


def ort_calling_form(feeds: Any, second: Any, what: str) -> None:
    """EINVAL if ``what`` was called as onnxruntime's ``run(output_names, feeds)``."""
    if isinstance(second, Mapping):
        raise error(ErrorCode.EINVAL, f"{what} takes (feeds, timeout) and returns outputs by name; "
                                      f"run(output_names, feeds) is onnxruntime's form: call {what}(feeds), "
                                      "or use npu.InferenceSession, which takes it")
