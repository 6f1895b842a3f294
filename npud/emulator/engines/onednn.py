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

Integer plans (``qconv2d``) are exact: the int8 primitive accumulates in
int32 and its post-ops are the ISA's requantisation steps in the ISA's order
(:func:`_post_ops`); their weights are reordered into oneDNN's blocked layout
and kept while unchanged (:class:`_BlockedWeights`: a plain copy and a memcmp
per run).  Weights a loaded program reads from immutable memory (a window bound
inside a mapping declared immutable: a loaded model's weights) are instead kept
blocked from the program's load to its unload, reordered once and never
compared (:class:`_Frozen`, counted by :func:`prepared_bytes`); float32
ungrouped convolutions then read blocked weights too.

Float ``matmul`` commands use oneDNN's ``dnnl_sgemm`` (:func:`sgemm`) the same way.

``NPU_EMU_CONV=numpy`` disables both (tests compare the two paths).
"""

from __future__ import annotations

import ctypes
import itertools
import os
import threading
import weakref

import numpy as np

from .. import threads
from . import int_gemm

ENV = "NPU_EMU_CONV"

_F32, _S32, _S8, _U8 = 3, 4, 5, 6          # dnnl_data_type_t
_CPU = 1                                   # dnnl_engine_kind_t
_IN_ORDER = 1                              # dnnl_stream_in_order
_FORWARD_INFERENCE = 0x60                  # dnnl_prop_kind_t
_CONV_DIRECT = 0x1                         # dnnl_alg_kind_t
_ELTWISE_RELU, _ELTWISE_LINEAR, _ELTWISE_CLIP, _ELTWISE_ROUND = 0x20, 0x26, 0x2e, 0x32
_BINARY_MUL = 0x1fff1
_QUERY_IMPL_INFO_STR, _QUERY_WEIGHTS_MD = 8, 131   # dnnl_query_t
_FORMAT_ANY = 1                            # dnnl_format_tag_any
ARG_SRC, ARG_DST, ARG_WEIGHTS, ARG_BIAS = 1, 17, 33, 41
ARG_SRC_ZP = 8192 | ARG_SRC                # DNNL_ARG_ATTR_ZERO_POINTS | DNNL_ARG_SRC
ARG_SCALE = 32768 | 2                      # DNNL_ARG_ATTR_MULTIPLE_POST_OP(0) | DNNL_ARG_SRC_1: the scale
_DT = {np.dtype(np.float32): _F32, np.dtype(np.int32): _S32, np.dtype(np.int8): _S8,
       np.dtype(np.uint8): _U8}
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
            "dnnl_memory_desc_equal": [vp, vp],
            "dnnl_memory_desc_create_with_tag": [pvp, ctypes.c_int, _DIMS, ctypes.c_int, ctypes.c_int],
            "dnnl_reorder_primitive_desc_create": [pvp, vp, vp, vp, vp, vp],
            "dnnl_primitive_attr_create": [pvp],
            "dnnl_primitive_attr_destroy": [vp],
            "dnnl_primitive_attr_set_post_ops": [vp, vp],
            "dnnl_post_ops_create": [pvp],
            "dnnl_post_ops_destroy": [vp],
            "dnnl_post_ops_append_sum": [vp, ctypes.c_float, ctypes.c_int32, ctypes.c_int],
            "dnnl_post_ops_append_eltwise": [vp, ctypes.c_int, ctypes.c_float, ctypes.c_float],
            "dnnl_post_ops_append_binary": [vp, ctypes.c_int, vp],
            "dnnl_primitive_attr_set_zero_points_mask": [vp, ctypes.c_int, ctypes.c_int],
            "dnnl_convolution_forward_primitive_desc_create": [
                pvp, vp, ctypes.c_int, ctypes.c_int, vp, vp, vp, vp, _DIMS, _DIMS, _DIMS, _DIMS, vp],
            "dnnl_primitive_desc_query": [vp, ctypes.c_int, ctypes.c_int, vp],
            "dnnl_primitive_desc_destroy": [vp],
            "dnnl_primitive_create": [pvp, vp],
            "dnnl_memory_create": [pvp, vp, vp, vp],
            "dnnl_memory_set_data_handle": [vp, vp],
            "dnnl_memory_get_memory_desc": [vp, pvp],
            "dnnl_memory_destroy": [vp],
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
        for name, restype in (("dnnl_primitive_desc_query_md", vp),
                              ("dnnl_memory_desc_get_size", ctypes.c_size_t)):
            f = getattr(lib, name)
            f.argtypes, f.restype = ([vp, ctypes.c_int, ctypes.c_int] if restype is vp else [vp]), restype
            setattr(self, name[5:], f)
        self.engine, self.stream = ctypes.c_void_p(), ctypes.c_void_p()
        _ok(self.engine_create(ctypes.byref(self.engine), _CPU, 0), "engine_create")
        _ok(self.stream_create(ctypes.byref(self.stream), self.engine, _IN_ORDER), "stream_create")

    def any_desc(self, dims, dtype: int) -> ctypes.c_void_p:
        """A memory descriptor whose layout the primitive chooses."""
        md = ctypes.c_void_p()
        _ok(self.memory_desc_create_with_tag(ctypes.byref(md), len(dims), _DIMS(*dims), dtype,
                                             _FORMAT_ANY), "memory_desc_create")
        return md

    def memory_like(self, mem) -> ctypes.c_void_p:
        """A new memory object (no buffer yet) of `mem`'s descriptor."""
        md, new = ctypes.c_void_p(), ctypes.c_void_p()
        _ok(self.memory_get_memory_desc(mem, ctypes.byref(md)), "memory_get_memory_desc")
        _ok(self.memory_create(ctypes.byref(new), md, self.engine, None), "memory_create")
        return new

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


BLOCKED_CACHE_BYTES = 256 << 20     # blocked weights (and their plain copies) kept per thread


class _BlockedWeights:
    """Weights in the blocked layout (with the compensation terms) a primitive
    chose, reordered from the command's plain HWIO weights.  The result is
    kept per weights address with a copy of the plain bytes it came from, and
    reused while a memcmp finds those bytes unchanged (a window's weights every
    run; SRAM weights a DMA reloaded with the same bytes): the reorder costs
    several times the convolution of a small feature map, the comparison a
    few percent of it.  Changed weights are reordered again: no rule about
    what may change between runs is needed."""

    def __init__(self, lib: _Lib, prim, src, dst, size: int) -> None:
        self._lib, self._prim, self._src, self._dst, self._size = lib, prim, src, dst, size
        self.memory = dst      # the primitive's weights memory: its handle is what __call__ returns
        self.layout = ctypes.c_void_p()    # the blocked layout (the memory object owns it)
        _ok(lib.memory_get_memory_desc(dst, ctypes.byref(self.layout)), "memory_get_memory_desc")
        self._args = (_ExecArg * 2)(_ExecArg(ARG_SRC, src), _ExecArg(ARG_DST, dst))
        self._kept: dict[int, tuple] = {}
        self._scratch = None

    def __call__(self, w: np.ndarray) -> int:
        """The address of `w` in the blocked layout, reordered if it is not kept or changed."""
        addr = w.ctypes.data
        entry = self._kept.get(addr)
        if entry is not None and _libc.memcmp(entry[3], addr, w.nbytes) == 0:
            return entry[1]
        if entry is None:
            entry = self._keep(w)
        if entry[0] is not None:
            np.copyto(entry[0], w)
        self.reorder(w, entry[1])
        return entry[1]

    def reorder(self, w: np.ndarray, addr: int) -> None:
        """Write `w` in the blocked layout at `addr` (a buffer of :meth:`allocate`)."""
        self._lib.memory_set_data_handle(self._src, w.ctypes.data)
        self._lib.memory_set_data_handle(self._dst, addr)
        _ok(self._lib.primitive_execute(self._prim, self._lib.stream, 2, self._args), "reorder")

    def allocate(self) -> tuple[np.ndarray, int]:
        """(buffer, address): room for one set of blocked weights, aligned as the kernels want."""
        buf = np.empty(self._size + 64, np.uint8)
        return buf, buf.ctypes.data + (-buf.ctypes.data % 64)

    def _keep(self, w: np.ndarray) -> tuple:
        """(plain copy or None, blocked address, buffer, copy's address): a new entry, kept if
        the thread's budget allows (else a scratch one reordered into every run).  Entries
        are per address and the weights dense, so an entry's bytes are w's size."""
        spent = getattr(_local, "blocked_bytes", 0) + self._size + 64 + w.nbytes
        if spent > BLOCKED_CACHE_BYTES and self._scratch is not None:
            return self._scratch
        buf, addr = self.allocate()
        if spent > BLOCKED_CACHE_BYTES:
            self._scratch = (None, addr, buf, 0)     # one per plan, reordered into every run
            return self._scratch
        _local.blocked_bytes = spent
        copy = np.empty_like(w)
        entry = self._kept[w.ctypes.data] = (copy, addr, buf, copy.ctypes.data)
        return entry


PREPARED_ENV = "NPU_EMU_PREPARED_BYTES"
PREPARED_BYTES = 1 << 30     # default bound on weights kept pre-arranged from load to unload
_prepared = [0]              # bytes those hold now, in this process (every thread, every program)


def prepared_bytes() -> int:
    """Bytes of weights this process keeps pre-arranged for loaded programs (:class:`_Frozen`)."""
    return _prepared[0]


def prepared_limit() -> int:
    """The bound on :func:`prepared_bytes` (``NPU_EMU_PREPARED_BYTES``, else 1 GiB)."""
    try:
        return int(os.environ.get(PREPARED_ENV, PREPARED_BYTES))
    except ValueError:
        return PREPARED_BYTES


_shared: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()   # live frozen copies


def _unprepare(size: int) -> None:
    with _lock:
        _prepared[0] -= size


class _Frozen:
    """One step's weights in the blocked layout, from weights that cannot change while its
    program is loaded (an immutable mapping, bound to a weight window): reordered at the
    step's first run and then reused, with no plain copy and no comparison.  The buffer is
    allocated when the step is prepared (the program's load), counted in
    :func:`prepared_bytes`, and freed with the step (the program's unload).  The address
    the weights were reordered from is remembered: a run binding other memory (another
    buffer object with, by the daemon's promise, the same bytes) reorders again."""

    def __init__(self, blocked: "_BlockedWeights") -> None:
        self._blocked = blocked
        self._buf, self._addr = blocked.allocate()
        size = self._buf.nbytes
        with _lock:
            _prepared[0] += size
        weakref.finalize(self, _unprepare, size)
        self._src = None

    @staticmethod
    def make(blocked: "_BlockedWeights | None", key) -> "_Frozen | None":
        """The frozen copy of a plan's blocked weights for the steps sharing `key` (one
        preparation's binding of one immutable range) whose plans chose the same layout (the
        bands of one layer, whose plans differ by their input's rows), made if none is
        alive; or None: the plan reads its weights as they are, or the process's bound
        (:func:`prepared_limit`) is reached (the step then keeps int15's compare-and-reorder
        cache)."""
        if blocked is None:
            return None
        for n in itertools.count():
            frozen = _shared.get((key, n))
            if frozen is None:
                break
            if blocked._lib.memory_desc_equal(frozen._blocked.layout, blocked.layout):
                return frozen
        if _prepared[0] + blocked._size + 64 > prepared_limit():
            return None
        frozen = _shared[key, n] = _Frozen(blocked)
        return frozen

    def __call__(self, w: np.ndarray) -> int:
        """The blocked weights' address, reordered from `w` only if not yet from there."""
        if w.ctypes.data != self._src:
            self._blocked.reorder(w, self._addr)
            self._src = w.ctypes.data
        return self._addr


class ConvPlan:
    """One convolution primitive and its memory objects: call it with the
    command's SRAM views to run it (only the data pointers change).  With
    ``blocked`` (:class:`_BlockedWeights`), the primitive reads its weights
    in its own layout, reordered from the command's."""

    def __init__(self, lib: _Lib, prim, mems: dict, impl: str, blocked=None) -> None:
        self._lib, self._prim, self.impl = lib, prim, impl
        self._mems = mems
        self._args = (_ExecArg * len(mems))(*(_ExecArg(k, m) for k, m in mems.items()))
        self._n = len(mems)
        self._blocked = blocked

    def bind(self, x: np.ndarray, out: np.ndarray, bias=None, scale=None, *,
             frozen=None) -> "BoundConv":
        """This plan for one command's fixed tiles (see :class:`BoundConv`); `frozen` (a key,
        or None): its weights never change while the step lives (kept blocked, one copy per
        key: :class:`_Frozen`)."""
        return BoundConv(self, x, out, bias, scale, frozen)

    def set_src_zp(self, zp: int) -> None:
        """The input zero point the plan subtracts (padding holds it: it contributes nothing)."""
        self._zp = np.array([zp], np.int32)
        self._lib.memory_set_data_handle(self._mems[ARG_SRC_ZP], self._zp.ctypes.data)

    def __call__(self, x: np.ndarray, w: np.ndarray, out: np.ndarray, bias=None,
                 scale=None) -> None:
        """out = post-ops(conv(x, w) + bias), post-ops as planned; ``out`` may
        hold the accumulation operand; ``scale`` the per-channel fp32 scale of
        a requantising plan.  Operands must not overlap ``out``."""
        lib, m = self._lib, self._mems
        if scale is not None:
            lib.memory_set_data_handle(m[ARG_SCALE], scale.ctypes.data)
        lib.memory_set_data_handle(m[ARG_SRC], x.ctypes.data)
        lib.memory_set_data_handle(m[ARG_DST], out.ctypes.data)
        if bias is not None:
            lib.memory_set_data_handle(m[ARG_BIAS], bias.ctypes.data)
        threads.one_openmp_thread_here()
        lib.memory_set_data_handle(m[ARG_WEIGHTS], w.ctypes.data if self._blocked is None
                                   else self._blocked(w))
        _ok(lib.primitive_execute(self._prim, lib.stream, self._n, self._args), "execute")
        _ok(lib.stream_wait(lib.stream), "stream_wait")


class BoundConv:
    """A plan bound to one command's tiles: memory objects of its own whose
    handles are set once (each set, and each numpy address lookup, costs a
    microsecond or more), so a run passes only what can change: the weights
    (read from a window, or reordered), and a bias or scale copied that run."""

    def __init__(self, plan: ConvPlan, x: np.ndarray, out: np.ndarray, bias, scale,
                 frozen=None) -> None:
        lib = self._lib = plan._lib
        self._plan = plan
        self._blocked = (frozen is not None and _Frozen.make(plan._blocked, frozen)) or plan._blocked
        self._mems = {arg: lib.memory_like(mem) for arg, mem in plan._mems.items()}
        # a step lives as long as its program's preparation: free its memory objects with it
        weakref.finalize(self, _destroy, lib, list(self._mems.values()))
        self._args = (_ExecArg * len(self._mems))(*(_ExecArg(k, m) for k, m in self._mems.items()))
        fixed = {ARG_SRC: x, ARG_DST: out, ARG_BIAS: bias, ARG_SCALE: scale,
                 ARG_SRC_ZP: getattr(plan, "_zp", None)}
        self._keep = [v for v in fixed.values() if v is not None]     # alive while bound
        for arg, v in fixed.items():
            if v is not None:
                lib.memory_set_data_handle(self._mems[arg], v.ctypes.data)
        self._w, self._addr = None, None

    def __call__(self, w: np.ndarray, bias=None, scale=None) -> None:
        """Run on weights `w` (and a `bias`/`scale` other than the bound ones)."""
        lib, m = self._lib, self._mems
        if w is not self._w:
            blocked = self._blocked     # frozen: reordered once; else compared every run
            addr = w.ctypes.data if blocked is None else blocked(w)
            if addr != self._addr:
                lib.memory_set_data_handle(m[ARG_WEIGHTS], addr)
                self._addr = addr
            self._w = w if blocked is None else None
        if bias is not None:
            lib.memory_set_data_handle(m[ARG_BIAS], bias.ctypes.data)
        if scale is not None:
            lib.memory_set_data_handle(m[ARG_SCALE], scale.ctypes.data)
        threads.one_openmp_thread_here()
        _ok(lib.primitive_execute(self._plan._prim, lib.stream, len(m), self._args), "execute")
        _ok(lib.stream_wait(lib.stream), "stream_wait")


def _destroy(lib: _Lib, mems: list) -> None:
    for mem in mems:
        lib.memory_destroy(mem)


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
    threads.one_openmp_thread_here()
    _ok(lib.sgemm(b"N", b"N", m, n, k, 1.0, a.ctypes.data, k, b.ctypes.data, n,
                  1.0 if accumulate else 0.0, c.ctypes.data, n), "sgemm")
    return True


def _nhwc(shape) -> tuple[tuple, tuple]:
    """oneDNN (N, C, H, W) dims and strides (elements) of a dense NHWC tile."""
    n, h, w, c = shape
    return (n, c, h, w), (h * w * c, 1, w * c, c)


def _hwio(shape, groups: int = 1) -> tuple[tuple, tuple]:
    """oneDNN (O, I, KH, KW) dims and strides of dense HWIO weights; grouped,
    (G, O/G, I/G, KH, KW) with I = Cin/groups as HWIO holds it."""
    kh, kw, ci, co = shape
    if groups == 1:
        return (co, ci, kh, kw), (1, co, kw * ci * co, ci * co)
    og = co // groups
    return (groups, og, ci, kh, kw), (og, 1, co, kw * ci * co, ci * co)


def _post_ops(lib: _Lib, post, accumulate: bool, relu: bool, quant) -> list:
    """Append the command's epilogue to `post`; the descriptors to free.

    Float: the accumulation (``sum``) then ReLU.  Integer (``quant`` =
    (x_zp, y_zp, lo, hi, channels)): the fp32 value of the accumulator (bias
    included) times the per-channel fp32 scale (a ``binary`` multiply: one
    IEEE single product), clamped to ``[lo - y_zp, hi - y_zp]``, rounded half
    to even (``eltwise_round``, MXCSR's default mode), then the zero point
    added to the integer: every step the ISA's requantisation, in its order."""
    if quant is None:
        if accumulate:
            _ok(lib.post_ops_append_sum(post, 1.0, 0, 0), "append_sum")
        if relu:
            _ok(lib.post_ops_append_eltwise(post, _ELTWISE_RELU, 0.0, 0.0), "append_eltwise")
        return []
    _, y_zp, lo, hi, channels = quant
    scale = lib.desc((1, channels, 1, 1), (channels, 1, 1, 1), _F32)
    _ok(lib.post_ops_append_binary(post, _BINARY_MUL, scale), "append_binary")
    _ok(lib.post_ops_append_eltwise(post, _ELTWISE_CLIP, lo - y_zp, hi - y_zp), "append_eltwise")
    if y_zp:
        _ok(lib.post_ops_append_eltwise(post, _ELTWISE_ROUND, 0.0, 0.0), "append_eltwise")
        _ok(lib.post_ops_append_eltwise(post, _ELTWISE_LINEAR, 1.0, float(y_zp)), "append_eltwise")
    return [scale]


def _weights_reorder(lib: _Lib, pd, plain) -> _BlockedWeights:
    """The reorder of plain weights into the layout (and compensation terms)
    primitive `pd` chose."""
    blocked = lib.primitive_desc_query_md(pd, _QUERY_WEIGHTS_MD, 0)
    rpd, prim = ctypes.c_void_p(), ctypes.c_void_p()
    _ok(lib.reorder_primitive_desc_create(ctypes.byref(rpd), plain, lib.engine, blocked, lib.engine,
                                          None), "reorder_primitive_desc_create")
    try:
        _ok(lib.primitive_create(ctypes.byref(prim), rpd), "primitive_create")
    finally:
        lib.primitive_desc_destroy(rpd)
    src, dst = ctypes.c_void_p(), ctypes.c_void_p()
    _ok(lib.memory_create(ctypes.byref(src), plain, lib.engine, None), "memory_create")
    _ok(lib.memory_create(ctypes.byref(dst), blocked, lib.engine, None), "memory_create")
    return _BlockedWeights(lib, prim, src, dst, lib.memory_desc_get_size(blocked))


def _build(lib: _Lib, key) -> ConvPlan | None:
    xs, ws, os_, stride, pad, dil, groups, dts, has_bias, accumulate, relu, quant, blocked = key
    x_dt, w_dt, out_dt, bias_dt = (_DT[np.dtype(d)] for d in dts)
    descs, attr, post, pd = [], ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
    try:
        src = lib.desc(*_nhwc(xs), x_dt)
        plain = lib.desc(*_hwio(ws, groups), w_dt)
        descs.append(plain)
        # integer and depthwise weights in oneDNN's own blocked layout (with plain weights it
        # picks a slow im2col GEMM for int8, with no input zero point, and a GEMM-shaped kernel
        # 10x slower than its depthwise one for fp32); other float weights as they are unless
        # frozen (plain 3x3x512x512 weights: brgconv reorders them inside every call)
        wei = lib.any_desc(_hwio(ws, groups)[0], w_dt) if blocked else plain
        dst = lib.desc(*_nhwc(os_), out_dt)
        descs += [src, dst] + ([wei] if wei is not plain else [])
        bia = None
        if has_bias:
            bia = lib.desc((os_[3],), (1,), bias_dt)
            descs.append(bia)
        _ok(lib.primitive_attr_create(ctypes.byref(attr)), "attr_create")
        _ok(lib.post_ops_create(ctypes.byref(post)), "post_ops_create")
        descs += _post_ops(lib, post, accumulate, relu, quant)
        _ok(lib.primitive_attr_set_post_ops(attr, post), "set_post_ops")
        if quant is not None and quant[0]:
            _ok(lib.primitive_attr_set_zero_points_mask(attr, ARG_SRC, 0), "set_zero_points")
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
        reorder = None if wei is plain else _weights_reorder(lib, pd, plain)
        args = [(ARG_SRC, src), (ARG_WEIGHTS, wei if reorder is None else None), (ARG_DST, dst),
                (ARG_BIAS, bia)]
        if quant is not None:
            args.append((ARG_SCALE, descs[-1]))
            if quant[0]:
                args.append((ARG_SRC_ZP, lib.desc((1,), (1,), _S32)))
                descs.append(args[-1][1])
        mems = {}
        for arg, md in args:
            if md is not None:
                mem = ctypes.c_void_p()
                _ok(lib.memory_create(ctypes.byref(mem), md, lib.engine, None), "memory_create")
                mems[arg] = mem
        if reorder is not None:
            mems[ARG_WEIGHTS] = reorder.memory
        plan = ConvPlan(lib, prim, mems, impl, reorder)
        if quant is not None and quant[0]:
            plan.set_src_zp(quant[0])
        return plan
    finally:
        if pd:
            lib.primitive_desc_destroy(pd)
        if post:
            lib.post_ops_destroy(post)
        if attr:
            lib.primitive_attr_destroy(attr)
        for md in descs:
            lib.memory_desc_destroy(md)


_libc = ctypes.CDLL(None)
_libc.memcmp.argtypes, _libc.memcmp.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t], ctypes.c_int
_local = threading.local()     # oneDNN's shared scratchpad: run primitives where they were made
_state: tuple | None = None    # (_Lib or None, description)
_lock = threading.Lock()


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
         accumulate: bool = False, relu: bool = False, groups: int = 1,
         dtypes=("f4", "f4", "f4", "f4"), quant=None, blocked: bool = False) -> ConvPlan | None:
    """The cached convolution primitive for these (4-D, dense) tile shapes and
    attributes, or None where the numpy path must run (no oneDNN, or oneDNN
    has only its reference kernels for the shape).  ``dtypes``: x, w, out and
    bias; float32 by default, or an integer convolution requantised as
    ``quant`` = (x_zp, y_zp, lo, hi, channels) says (see :func:`_post_ops`;
    the plan then takes the per-channel fp32 scale).  ``blocked``: float32
    weights in oneDNN's blocked layout too (for weights bound frozen: reordering
    them every run would cost more than the faster kernel saves); integer and
    depthwise plans always are."""
    lib = (_state or _load())[0]
    if lib is None:
        return None
    blocked = blocked or quant is not None or (groups > 1 and w_shape[2] == 1)
    key = (tuple(x_shape), tuple(w_shape), tuple(out_shape), tuple(stride), tuple(pad),
           tuple(dilation), groups, tuple(dtypes), bias, accumulate, relu, quant, blocked)
    cache = getattr(_local, "plans", None)
    if cache is None:
        cache = _local.plans = {}
    if key not in cache:
        threads.one_openmp_thread_here()      # oneDNN blocks a primitive for the thread count it is created under
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
