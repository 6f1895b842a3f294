"""Convolutions (and float GEMMs) on oneDNN, when oneDNN is installed.

The MAC engine's definition of ``conv2d`` is numpy (mac.py); for float32 this
module runs the same convolution several times faster through oneDNN's C API
(the ``onednn-cpu-gomp`` wheel's ``libdnnl.so.3``, loaded with ctypes as
int_gemm.py loads its GEMM).  The tiles are used as they are -- NHWC
activations, HWIO weights, described to oneDNN by their strides, so nothing
is reordered -- and the command's bias, accumulation (a ``sum`` post-op) and
fused ReLU (an ``eltwise`` post-op) run inside the primitive.

A primitive is built once per distinct command shape (:func:`plan`, a cache
keyed by shapes, strides, padding, dilation and post-ops) and reused for
every command and every run that has that shape; only the data pointers
change.  oneDNN picks its implementation per shape; a shape for which it
would use its reference (scalar) kernels gets no plan, and the numpy path
runs instead.  float32 results differ from numpy's in summation order only
(about 1e-6 relative), as results of two BLAS libraries do; the ISA defines
float convolution up to that.

Float ``matmul`` commands use oneDNN's ``dnnl_sgemm`` (:func:`sgemm`) the same way.

``NPU_EMU_CONV=numpy`` disables both (tests compare the two paths).
"""

from __future__ import annotations

import ctypes
import os
import threading

import numpy as np

from . import int_gemm

ENV = "NPU_EMU_CONV"

_F32, _S32, _S8, _U8 = 3, 4, 5, 6          # dnnl_data_type_t
_CPU = 1                                   # dnnl_engine_kind_t
_IN_ORDER = 1                              # dnnl_stream_in_order
_FORWARD_INFERENCE = 0x60                  # dnnl_prop_kind_t
_CONV_DIRECT = 0x1                         # dnnl_alg_kind_t
_ELTWISE_RELU = 0x20
_QUERY_IMPL_INFO_STR = 8                   # dnnl_query_t
ARG_SRC, ARG_DST, ARG_WEIGHTS, ARG_BIAS = 1, 17, 33, 41
_DIMS = ctypes.c_int64 * 12                # dnnl_dims_t


class _ExecArg(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_int), ("memory", ctypes.c_void_p)]


class _Lib:
    """The handful of oneDNN C functions a convolution needs, with one CPU
    engine and stream."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        vp, pvp = ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)
        sig = {
            "dnnl_engine_create": [pvp, ctypes.c_int, ctypes.c_size_t],
            "dnnl_stream_create": [pvp, vp, ctypes.c_uint],
            "dnnl_memory_desc_create_with_strides": [pvp, ctypes.c_int, _DIMS, ctypes.c_int, _DIMS],
            "dnnl_memory_desc_destroy": [vp],
            "dnnl_primitive_attr_create": [pvp],
            "dnnl_primitive_attr_destroy": [vp],
            "dnnl_primitive_attr_set_post_ops": [vp, vp],
            "dnnl_post_ops_create": [pvp],
            "dnnl_post_ops_destroy": [vp],
            "dnnl_post_ops_append_sum": [vp, ctypes.c_float, ctypes.c_int32, ctypes.c_int],
            "dnnl_post_ops_append_eltwise": [vp, ctypes.c_int, ctypes.c_float, ctypes.c_float],
            "dnnl_convolution_forward_primitive_desc_create": [
                pvp, vp, ctypes.c_int, ctypes.c_int, vp, vp, vp, vp, _DIMS, _DIMS, _DIMS, _DIMS, vp],
            "dnnl_primitive_desc_query": [vp, ctypes.c_int, ctypes.c_int, vp],
            "dnnl_primitive_desc_destroy": [vp],
            "dnnl_primitive_create": [pvp, vp],
            "dnnl_memory_create": [pvp, vp, vp, vp],
            "dnnl_memory_set_data_handle": [vp, vp],
            "dnnl_primitive_execute": [vp, vp, ctypes.c_int, ctypes.POINTER(_ExecArg)],
            "dnnl_stream_wait": [vp],
            "dnnl_sgemm": [ctypes.c_char, ctypes.c_char, ctypes.c_int64, ctypes.c_int64,
                           ctypes.c_int64, ctypes.c_float, vp, ctypes.c_int64, vp, ctypes.c_int64,
                           ctypes.c_float, vp, ctypes.c_int64],
        }
        for name, argtypes in sig.items():
            f = getattr(lib, name)
            f.argtypes, f.restype = argtypes, ctypes.c_int
            setattr(self, name[5:], f)
        self.engine, self.stream = ctypes.c_void_p(), ctypes.c_void_p()
        _ok(self.engine_create(ctypes.byref(self.engine), _CPU, 0), "engine_create")
        _ok(self.stream_create(ctypes.byref(self.stream), self.engine, _IN_ORDER), "stream_create")

    def desc(self, dims, strides, dtype: int) -> ctypes.c_void_p:
        md = ctypes.c_void_p()
        _ok(self.memory_desc_create_with_strides(ctypes.byref(md), len(dims), _DIMS(*dims), dtype,
                                                 _DIMS(*strides)), "memory_desc_create")
        return md


class DnnlError(RuntimeError):
    """A oneDNN call failed (status code in the message)."""


def _ok(status: int, what: str) -> None:
    if status != 0:
        raise DnnlError(f"oneDNN {what} failed with status {status}")


class ConvPlan:
    """One convolution primitive and its memory objects: call it with the
    command's SRAM views to run it (only the data pointers change)."""

    def __init__(self, lib: _Lib, prim, mems: dict, impl: str) -> None:
        self._lib, self._prim, self.impl = lib, prim, impl
        self._mems = mems
        self._args = (_ExecArg * len(mems))(*(_ExecArg(k, m) for k, m in mems.items()))
        self._n = len(mems)

    def __call__(self, x: np.ndarray, w: np.ndarray, out: np.ndarray, bias=None) -> None:
        """out = post-ops(conv(x, w) + bias), post-ops as planned; ``out`` may
        hold the accumulation operand.  Operands must not overlap ``out``."""
        lib, m = self._lib, self._mems
        lib.memory_set_data_handle(m[ARG_SRC], x.ctypes.data)
        lib.memory_set_data_handle(m[ARG_WEIGHTS], w.ctypes.data)
        lib.memory_set_data_handle(m[ARG_DST], out.ctypes.data)
        if bias is not None:
            lib.memory_set_data_handle(m[ARG_BIAS], bias.ctypes.data)
        _threads()
        _ok(lib.primitive_execute(self._prim, lib.stream, self._n, self._args), "execute")
        _ok(lib.stream_wait(lib.stream), "stream_wait")


def available() -> bool:
    """Whether oneDNN is loaded (False: the numpy paths run)."""
    return (_state or _load())[0] is not None


def sgemm(a: np.ndarray, b: np.ndarray, c: np.ndarray, accumulate: bool) -> bool:
    """c (+)= a @ b for dense row-major float32 [M, K] x [K, N] -> [M, N] (c not
    overlapping a or b) on oneDNN's sgemm; False (nothing done) without oneDNN.

    Every output column is computed the same way wherever it lies (OpenBLAS's
    matrix-vector kernels sum tail columns in another order: with equal columns
    of weights they give unequal results, which decides softmaxes of large logits)."""
    lib = (_state or _load())[0]
    if lib is None:
        return False
    m, k = a.shape
    n = b.shape[1]
    _threads()
    _ok(lib.sgemm(b"N", b"N", m, n, k, 1.0, a.ctypes.data, k, b.ctypes.data, n,
                  1.0 if accumulate else 0.0, c.ctypes.data, n), "sgemm")
    return True


def _nhwc(shape) -> tuple[tuple, tuple]:
    """oneDNN (N, C, H, W) dims and strides (elements) of a dense NHWC tile."""
    n, h, w, c = shape
    return (n, c, h, w), (h * w * c, 1, w * c, c)


def _hwio(shape) -> tuple[tuple, tuple]:
    """oneDNN (O, I, KH, KW) dims and strides of dense HWIO weights."""
    kh, kw, ci, co = shape
    return (co, ci, kh, kw), (1, co, kw * ci * co, ci * co)


def _build(lib: _Lib, key) -> ConvPlan | None:
    xs, ws, os_, stride, pad, dil, has_bias, accumulate, relu = key
    descs, attr, post, pd = [], ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
    try:
        src = lib.desc(*_nhwc(xs), _F32)
        wei = lib.desc(*_hwio(ws), _F32)
        dst = lib.desc(*_nhwc(os_), _F32)
        descs += [src, wei, dst]
        bia = None
        if has_bias:
            bia = lib.desc((os_[3],), (1,), _F32)
            descs.append(bia)
        _ok(lib.primitive_attr_create(ctypes.byref(attr)), "attr_create")
        _ok(lib.post_ops_create(ctypes.byref(post)), "post_ops_create")
        if accumulate:
            _ok(lib.post_ops_append_sum(post, 1.0, 0, 0), "append_sum")
        if relu:
            _ok(lib.post_ops_append_eltwise(post, _ELTWISE_RELU, 0.0, 0.0), "append_eltwise")
        _ok(lib.primitive_attr_set_post_ops(attr, post), "set_post_ops")
        pt, pb, pl, pr = pad
        status = lib.convolution_forward_primitive_desc_create(
            ctypes.byref(pd), lib.engine, _FORWARD_INFERENCE, _CONV_DIRECT, src, wei, bia, dst,
            _DIMS(*stride), _DIMS(dil[0] - 1, dil[1] - 1), _DIMS(pt, pl), _DIMS(pb, pr), attr)
        if status != 0:
            return None
        info = ctypes.c_char_p()
        _ok(lib.primitive_desc_query(pd, _QUERY_IMPL_INFO_STR, 0, ctypes.byref(info)), "query")
        impl = (info.value or b"").decode()
        if impl.startswith("ref"):
            return None      # scalar reference kernels: numpy's BLAS is faster
        prim = ctypes.c_void_p()
        _ok(lib.primitive_create(ctypes.byref(prim), pd), "primitive_create")
        mems = {}
        for arg, md in ((ARG_SRC, src), (ARG_WEIGHTS, wei), (ARG_DST, dst), (ARG_BIAS, bia)):
            if md is not None:
                mem = ctypes.c_void_p()
                _ok(lib.memory_create(ctypes.byref(mem), md, lib.engine, None), "memory_create")
                mems[arg] = mem
        return ConvPlan(lib, prim, mems, impl)
    finally:
        if pd:
            lib.primitive_desc_destroy(pd)
        if post:
            lib.post_ops_destroy(post)
        if attr:
            lib.primitive_attr_destroy(attr)
        for md in descs:
            lib.memory_desc_destroy(md)


_local = threading.local()     # oneDNN's shared scratchpad: run primitives where they were made
_state: tuple | None = None    # (_Lib or None, description)
_lock = threading.Lock()


def _threads() -> None:
    """One OpenMP thread for the calling thread (an OpenMP setting is per thread): each device
    process is one modeled core, extra threads spin against other processes, and oneDNN blocks a
    primitive for the thread count it is created under."""
    if not getattr(_local, "omp", False):
        try:
            ctypes.CDLL("libgomp.so.1").omp_set_num_threads(1)
        except (OSError, AttributeError):
            pass
        _local.omp = True


def _load() -> tuple:
    global _state
    with _lock:
        if _state is None:
            if os.environ.get(ENV, "").lower() == "numpy":
                _state = (None, f"numpy ({ENV}=numpy)")
            else:
                found, where = int_gemm._open()   # the library the integer GEMM found
                try:
                    _state = ((_Lib(found.lib), f"oneDNN convolution primitive ({where})") if found
                              else (None, f"numpy: {where}"))
                except (OSError, AttributeError, DnnlError) as e:
                    _state = (None, f"numpy: {where}: {e}")
        return _state


def plan(x_shape, w_shape, out_shape, stride, pad, dilation, *, bias: bool,
         accumulate: bool, relu: bool) -> ConvPlan | None:
    """The cached float32 convolution primitive for these (4-D, dense) tile
    shapes and attributes, or None where the numpy path must run (no oneDNN,
    or oneDNN has only its reference kernels for the shape)."""
    lib = (_state or _load())[0]
    if lib is None:
        return None
    key = (tuple(x_shape), tuple(w_shape), tuple(out_shape), tuple(stride), tuple(pad),
           tuple(dilation), bias, accumulate, relu)
    cache = getattr(_local, "plans", None)
    if cache is None:
        cache = _local.plans = {}
    if key not in cache:
        _threads()      # oneDNN blocks a primitive for the thread count it is created under
        cache[key] = _build(lib, key)
    return cache[key]


def describe() -> str:
    """Which convolution implementation float32 conv2d uses, and why."""
    return _load()[1]


def reset() -> None:
    """Forget the loaded library and every plan (tests change the environment)."""
    global _state
    with _lock:
        _state = None
    _local.__dict__.clear()
