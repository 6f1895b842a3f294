"""The fuzz targets and their seeds: real frames, executables, streams and models.

Every target takes bytes and returns normally for an input it accepts or
refuses *the documented way*; anything else -- another exception type, a
malformed reply, a hang past its time limit -- escapes as an exception and is
a finding.  The contracts:

* ``decode_frame``: ``npud.ipc_schema.codec.decode_request`` returns a Request or
  raises ``RequestError`` with an ErrorCode and a message (docs/PROTOCOL.md).
* ``load_executable``: ``Executable.from_bytes`` returns an Executable or
  raises ``ExecutableFormatError``.  The fuzzer re-signs every mutant (the
  digest is unkeyed BLAKE2b), so mutations get past the integrity check and
  reach the parser, as a forged cache entry would.
* ``validate_stream``: ``npud.emulator.validator.validate`` returns a Program or
  raises ``StreamError``; a Program it accepted then runs on the emulator and
  fails, if at all, only with a PageFault or a DeviceError that is not an
  emulator-internal error (code EIO "internal error").
* ``import_onnx``: ``npud.compiler_worker.worker.handle`` (what a worker runs per
  request) returns a well-formed reply -- ok with an executable that loads, or
  an error with code EINVAL/ENOMEM and a message -- within ``ONNX_TIME_LIMIT``
  seconds and under an address-space limit, like a real worker.
"""

from __future__ import annotations

import contextlib
import functools
import random
import resource
import signal
import struct

import msgpack

from npud.compiler_worker.errors import ExecutableFormatError
from npud.executable import DIGEST, Executable, integrity_digest
from npud.emulator.assembler import StreamBuilder, tile
from npud.emulator.config import make_config
from npud.emulator.device import Device
from npud.emulator.errors import DeviceError, PageFault, StreamError
from npud.emulator.mmu import Mapping
from npud.ipc_schema import codec
from npud.ipc_schema.errors import ErrorCode, RequestError
from npud.ipc_schema.schema import OPS, PROTOCOL_VERSION

CONFIG = make_config("edge")
ONNX_TIME_LIMIT = 10.0          # seconds per compile; a real worker's default limit is larger
ONNX_MEMORY_LIMIT = 3 << 30     # extra address space a fuzzed compile may take


class Finding(AssertionError):
    """An input broke its target's contract."""


class Hang(BaseException):
    """Raised by the per-example timer (BaseException: the worker catches Exception)."""


# --- seeds --------------------------------------------------------------------------------

A, B, O = 0x10000, 0x20000, 0x30000
ADD_MAPPINGS = [Mapping(A, 0x10000, False), Mapping(B, 0x10000, False), Mapping(O, 0x10000, True)]


def add_stream(n: int = 64) -> bytes:
    sb = StreamBuilder(CONFIG)
    sb.dma_load(0, A, "float32", (n,))
    sb.dma_load(n * 4, B, "float32", (n,))
    sb.sync("dma", "vector")
    sb.add(tile(0, "float32", (n,)), tile(n * 4, "float32", (n,)), tile(2 * n * 4, "float32", (n,)))
    sb.sync("vector", "dma")
    sb.dma_store(2 * n * 4, O, "float32", (n,))
    sb.end()
    return sb.build()


def onnx_models() -> list[bytes]:
    """Small real models: an MLP, a conv net, and an element-wise graph."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def model(nodes, inputs, outputs, inits):
        g = helper.make_graph(nodes, "g", inputs, outputs, inits)
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString()

    def vi(name, shape):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)

    def const(name, shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.2, name)

    mlp = model([helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
                 helper.make_node("MatMul", ["r", "w2"], ["y"])],
                [vi("x", [2, 16])], [vi("y", [2, 8])], [const("w1", (16, 32)), const("w2", (32, 8))])
    cnn = model([helper.make_node("Conv", ["x", "k", "kb"], ["c"], pads=[1, 1, 1, 1]),
                 helper.make_node("Relu", ["c"], ["r"]),
                 helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
                 helper.make_node("Flatten", ["p"], ["f"]),
                 helper.make_node("Gemm", ["f", "g", "gb"], ["y"], transB=1)],
                [vi("x", [1, 3, 8, 8])], [vi("y", [1, 4])],
                [const("k", (4, 3, 3, 3)), const("kb", (4,)), const("g", (4, 64)), const("gb", (4,))])
    elementwise = model([helper.make_node("Add", ["x", "b"], ["s"]), helper.make_node("Tanh", ["s"], ["t"]),
                         helper.make_node("Softmax", ["t"], ["y"], axis=-1)],
                        [vi("x", [4, 16])], [vi("y", [4, 16])], [const("b", (16,))])
    return [mlp, cnn, elementwise]


@functools.cache
def executables() -> list[bytes]:
    from npud.compiler_worker.api import compile_model
    return [compile_model(m, CONFIG).to_bytes() for m in onnx_models()[:2]]


def exe_mappings(exe: Executable) -> list[Mapping]:
    page = CONFIG.page_size
    return [Mapping(r["va"], -(-max(r["size"], 1) // page) * page, bool(r["writable"]))
            for r in exe.memory["regions"]]


@functools.cache
def stream_seeds() -> list[tuple[bytes, list[Mapping]]]:
    """(stream, mappings it is valid against): hand-built jobs and compiled models' streams."""
    seeds = [(add_stream(64), ADD_MAPPINGS), (add_stream(1000), ADD_MAPPINGS)]
    for data in executables():
        exe = Executable.from_bytes(data)
        seeds.append((exe.stream, exe_mappings(exe)))
    return seeds


def frame_seeds() -> list[bytes]:
    pk = codec.pack
    samples = [
        ("hello", {"protocol": list(PROTOCOL_VERSION), "client_name": "fuzz", "pid": 1}),
        ("ping", {}), ("alloc", {"device": 0, "size": 4096}), ("free", {"handle": 1}),
        ("write", {"handle": 1, "offset": 0, "data": b"\x01\x02\x03\x04"}),
        ("read", {"handle": 1, "offset": 0, "size": 4}),
        ("submit", {"device": 0, "stream": add_stream(16), "bindings": [[1, A, False]]}),
        ("wait", {"job": 1, "timeout_ms": 0}),
        ("wait_jobs", {"jobs": [1, 2], "all": False, "timeout_ms": 0}),
        ("context_create", {"priority": "high", "weight": 2}), ("cancel", {"job": 1}),
        ("fence_export", {"job": 1}), ("fence_import", {"token": "t"}),
        ("run_model", {"model": 1, "inputs": [2], "outputs": [3]}), ("trace", {"since": 0}),
    ]
    return [pk({"op": op, "seq": i + 1, "args": args}) for i, (op, args) in enumerate(samples)]


# --- mutation -------------------------------------------------------------------------------

INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]


def mutate(rng: random.Random, data: bytes, others: list[bytes] = (), rounds: int | None = None) -> bytes:
    """A few random byte-level edits (AFL-style) of ``data``."""
    buf = bytearray(data)
    for _ in range(rounds or rng.randint(1, 4)):
        kind = rng.randrange(8)
        pos = rng.randrange(len(buf)) if buf else 0
        if kind == 0 and buf:                       # flip a bit
            buf[pos] ^= 1 << rng.randrange(8)
        elif kind == 1 and buf:                     # an interesting byte
            buf[pos] = rng.choice([0, 1, 0x7F, 0x80, 0xFF])
        elif kind == 2 and len(buf) >= pos + 2:     # an interesting u16
            buf[pos:pos + 2] = struct.pack("<H", rng.choice(INTERESTING) & 0xFFFF)
        elif kind == 3 and len(buf) >= pos + 4:     # an interesting u32
            buf[pos:pos + 4] = struct.pack("<I", rng.choice(INTERESTING))
        elif kind == 4:                             # delete a run
            del buf[pos:pos + rng.randint(1, 16)]
        elif kind == 5:                             # insert random bytes
            buf[pos:pos] = rng.randbytes(rng.randint(1, 16))
        elif kind == 6 and buf:                     # duplicate a run
            n = rng.randint(1, 32)
            buf[pos:pos] = buf[pos:pos + n]
        elif kind == 7 and others:                  # splice with another seed
            other = rng.choice(others)
            cut = rng.randrange(len(other) + 1)
            buf = buf[:pos] + bytearray(other[cut:cut + rng.randint(1, 64)]) + buf[pos:]
        elif buf:
            buf = buf[:pos]                         # truncate
    return bytes(buf)


def resign(body: bytes) -> bytes:
    """Append a valid integrity digest, as a forger of a cache entry could."""
    return body + integrity_digest(body)


# --- targets --------------------------------------------------------------------------------

def decode_frame(data: bytes) -> None:
    try:
        req = codec.decode_request(data)
    except RequestError as exc:
        if not isinstance(exc.info.code, ErrorCode) or not exc.info.message:
            raise Finding(f"RequestError without a code or message: {exc.info!r}")
        return
    if req.op is not OPS.get(req.op.name) or not isinstance(req.args, dict):
        raise Finding(f"decoded request is inconsistent: {req!r:.200}")
    codec.pack(req.args)  # what was accepted must be re-encodable


def load_executable(body: bytes) -> None:
    """``body`` is an executable without its digest; it is re-signed before loading."""
    try:
        exe = Executable.from_bytes(resign(body))
    except ExecutableFormatError:
        return
    exe.to_bytes()  # an accepted executable serialises again


def validate_stream(data: bytes, mappings: list[Mapping] | None = None, execute: bool = True) -> None:
    from npud.emulator.validator import validate
    mappings = ADD_MAPPINGS if mappings is None else mappings
    try:
        program = validate(data, CONFIG, mappings)
    except StreamError as exc:
        if exc.code != "EINVAL" or not str(exc):
            raise Finding(f"StreamError with code {exc.code!r}: {exc}")
        return
    if not execute:
        return
    device = Device(CONFIG)
    ctx = device.create_context()
    try:
        for m in mappings:
            ctx.map(m.va, bytearray(m.size), writable=m.writable)
        try:
            device.execute(ctx, program)
        except PageFault:
            pass
        except DeviceError as exc:
            if "internal error" in str(exc):
                raise Finding(f"a validated stream broke the emulator: {exc}") from exc
    finally:
        ctx.close()


@contextlib.contextmanager
def time_and_memory_limit(seconds: float, extra_bytes: int):
    def expire(signum, frame):
        raise Hang(f"no reply within {seconds} s")
    old_handler = signal.signal(signal.SIGALRM, expire)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    try:
        with open("/proc/self/statm") as f:
            vm = int(f.read().split()[0]) * resource.getpagesize()
        limit = vm + extra_bytes if hard == resource.RLIM_INFINITY else min(vm + extra_bytes, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (OSError, ValueError):
        pass
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def import_onnx(model: bytes, seconds: float = ONNX_TIME_LIMIT) -> dict:
    from npud.compiler_worker.worker import handle
    request = {"id": 1, "op": "compile", "model": model, "config": CONFIG.to_dict(), "options": {}}
    with time_and_memory_limit(seconds, ONNX_MEMORY_LIMIT):
        reply = handle(request)
    msgpack.packb(reply, use_bin_type=True)  # the worker must be able to send it
    if reply.get("ok") is True:
        Executable.from_bytes(reply["executable"])
    elif reply.get("ok") is False:
        err = reply.get("error") or {}
        if err.get("code") not in ("EINVAL", "ENOMEM") or not err.get("message"):
            raise Finding(f"malformed worker error reply: {err!r:.300}")
        if "cannot compile this model" in err["message"]:
            # Not a crash, but an unexpected exception type reached the worker's catch-all: note it.
            reply["unexpected"] = err["message"]
    else:
        raise Finding(f"malformed worker reply: {reply!r:.300}")
    return reply


def mutate_onnx(rng: random.Random, data: bytes, others: list[bytes] = ()) -> bytes:
    """Half byte-level edits, half edits of the graph's structure (dims, attributes, op types, names)."""
    if rng.random() < 0.4:
        return mutate(rng, data, others)
    import onnx
    m = onnx.ModelProto()
    m.ParseFromString(data)
    g = m.graph
    for _ in range(rng.randint(1, 3)):
        kind = rng.randrange(7)
        if kind == 0 and g.node:                                   # swap an op type
            rng.choice(g.node).op_type = rng.choice(
                ["Add", "Mul", "MatMul", "Conv", "Relu", "Softmax", "Reshape", "Transpose", "Gemm",
                 "MaxPool", "Concat", "Flatten", "Sigmoid", "Div", "Nope", ""])
        elif kind == 1 and g.input:                                # change an input dim
            dims = rng.choice(list(g.input) + list(g.output)).type.tensor_type.shape.dim
            if dims:
                rng.choice(dims).dim_value = rng.choice([0, 1, 2, 3, 7, 64, 1000])
        elif kind == 2 and g.node and rng.choice(g.node).attribute:  # change an attribute
            attr = rng.choice(rng.choice([n for n in g.node if n.attribute] or [g.node[0]]).attribute)
            if attr.ints:
                attr.ints[rng.randrange(len(attr.ints))] = rng.choice([-1, 0, 1, 2, 5, 100])
            else:
                attr.i = rng.choice([-3, -1, 0, 1, 2, 9])
        elif kind == 3 and g.node:                                 # rewire an input
            node = rng.choice(g.node)
            names = [i.name for i in g.input] + [i.name for i in g.initializer] + \
                    [o for n in g.node for o in n.output] + ["", "missing"]
            if node.input:
                node.input[rng.randrange(len(node.input))] = rng.choice(names)
        elif kind == 4 and g.initializer:                          # reshape an initializer
            init = rng.choice(g.initializer)
            if init.dims:
                init.dims[rng.randrange(len(init.dims))] = rng.choice([1, 2, 3, 17])
        elif kind == 5 and len(g.node) > 1:                        # drop or duplicate a node
            i = rng.randrange(len(g.node))
            if rng.random() < 0.5:
                del g.node[i]
            else:
                g.node.add().CopyFrom(g.node[i])
        elif kind == 6:                                            # change the opset
            m.opset_import[0].version = rng.choice([1, 6, 7, 11, 13, 17, 21, 99])
    return m.SerializeToString()


# --- the registry the runner and the tests share ------------------------------------------

def _frame_case(rng, seeds):
    return (mutate(rng, rng.choice(seeds), seeds),)


def _exe_case(rng, seeds):
    bodies = [s[:-DIGEST] for s in seeds]
    return (mutate(rng, rng.choice(bodies), bodies),)


def _stream_case(rng, seeds):
    stream, maps = rng.choice(seeds)
    return (mutate(rng, stream, [s for s, _ in seeds]), maps)


def _onnx_case(rng, seeds):
    return (mutate_onnx(rng, rng.choice(seeds), seeds),)


TARGETS = {
    # name: (target function, seeds(), make a case from (rng, seeds))
    "decoder": (decode_frame, frame_seeds, _frame_case),
    "executable": (load_executable, executables, _exe_case),
    "stream": (validate_stream, stream_seeds, _stream_case),
    "onnx": (import_onnx, onnx_models, _onnx_case),
}
