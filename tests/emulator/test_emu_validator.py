"""The validator refuses malformed or hostile streams with EINVAL and a reason."""

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from npud.emulator import isa
from npud.emulator.assembler import StreamBuilder
from npud.emulator.config import make_config
from npud.emulator.errors import StreamError
from npud.emulator.isa import Tile, tile
from npud.emulator.mmu import Mapping
from npud.emulator.validator import validate

CFG = make_config("edge")
MAPS = [Mapping(0x10000, 0x10000, False), Mapping(0x20000, 0x10000, True)]
F = lambda addr, shape: tile(addr, "fp32", shape)


def refuse(sb_or_bytes, match, mappings=MAPS, config=CFG):
    data = sb_or_bytes if isinstance(sb_or_bytes, bytes) else sb_or_bytes.build()
    with pytest.raises(StreamError, match=match) as e:
        validate(data, config, mappings)
    assert e.value.code == "EINVAL"
    return e.value


def sb():
    return StreamBuilder(CFG)


def test_minimal_stream_is_valid():
    prog = validate(sb().end().build(), CFG, [])
    assert len(prog.commands) == 1 and prog.stats.commands == 1


@pytest.mark.parametrize("mutate,match", [
    (lambda s: s[:10], "shorter than"),
    (lambda s: b"XXXX" + s[4:], "magic"),
    (lambda s: s[:4] + struct.pack("<H", 9) + s[6:], "version 9"),
    (lambda s: s[:6] + struct.pack("<H", 1) + s[8:], "flags"),
    (lambda s: s[:8] + bytes(8) + s[16:], "target hash"),
    (lambda s: s[:16] + struct.pack("<I", 5) + s[20:], "record count"),
    (lambda s: s + b"\x00", "truncated"),
    (lambda s: s[:-1], "truncated"),
    (lambda s: s + bytes([0x7E, 0, 4, 0]), "unknown opcode 0x7e"),
    (lambda s: s[:20] + bytes([0, 0, 9, 0]) + s[24:], "length 9"),
])
def test_header_and_framing(mutate, match):
    good = sb().nop().end().build()
    validate(good, CFG, [])
    refuse(mutate(good), match)


def test_structure():
    refuse(sb().nop(), "end")
    refuse(sb().end().nop().build(target_hash=None), "after end")
    refuse(sb().nop(core=3).end(), "core 3")
    refuse(b"not a stream, not at all", "magic")
    with pytest.raises(StreamError):
        validate("a string", CFG, [])


def test_sync_checks():
    refuse(sb().wait("mac", 0).end(), "no earlier unconsumed signal")
    refuse(sb().signal(4, 0).end(), "unknown Engine 4")
    refuse(sb().signal("ctrl", 0).end(), "not a queue")
    refuse(sb().signal("dma", 40).end(), "semaphore 40")
    validate(sb().signal("dma", 3).wait("mac", 3).end().build(), CFG, [])


@pytest.mark.parametrize("emit,match", [
    (lambda b: b.dma_load(0, 0x10000, 9, (4,)), "unknown dtype code 9"),
    (lambda b: b.dma_load(0, 0x10000, "fp32", (0, 4)), "empty shape"),
    (lambda b: b.dma_load(2, 0x10000, "fp32", (4,)), "not aligned"),
    (lambda b: b.dma_load(256 * 1024 - 8, 0x10000, "fp32", (4,)), "exceeds SRAM"),
    (lambda b: b.dma_load(0, 0x2F000, "fp32", (4096,)), "not within the job's mappings"),
    (lambda b: b.dma_load(0, 0x10000, "fp32", (4, 4), (0x10000, 4)), "not within"),
    (lambda b: b.dma_store(0, 0x10000, "fp32", (4,)), "writable"),
    (lambda b: b.dma_store(0, 0x20000, "fp32", (4, 4), (8, 4)), "overlap"),
    (lambda b: b.dma_store(0, 0x20000, "fp32", (4, 4), (0, 4)), "overlap"),
    (lambda b: b.dma_load(0, (1 << 48) - 4, "fp32", (4,)), "address space"),
])
def test_dma_refusals(emit, match):
    b = sb()
    emit(b)
    refuse(b.end(), match)


def test_dma_may_span_adjacent_mappings_and_broadcast_loads():
    maps = [Mapping(0x10000, 0x1000, False), Mapping(0x11000, 0x1000, False)]
    validate(sb().dma_load(0, 0x10F00, "fp32", (256,)).end().build(), CFG, maps)
    validate(sb().dma_load(0, 0x10000, "fp32", (8, 4), (0, 4)).end().build(), CFG, maps)


@pytest.mark.parametrize("emit,match", [
    (lambda b: b.add(F(0, (4,)), F(64, (5,)), F(128, (5,))), "does not broadcast"),
    (lambda b: b.add(F(0, (4,)), F(64, (4,)), F(128, (8,))), "broadcast shape"),
    (lambda b: b.add(F(0, (4,)), tile(64, "int8", (4,)), F(128, (4,))), "b dtype"),
    (lambda b: b.add(tile(0, "int8", (4,)), tile(64, "int8", (4,)), F(128, (4,))), "requant"),
    (lambda b: b.vbinary("pow", tile(0, "int32", (4,)), tile(64, "int32", (4,)),
                         tile(128, "int32", (4,))), "needs float"),
    (lambda b: b.vbinary(99, F(0, (4,)), F(64, (4,)), F(128, (4,))), "unknown BinaryFunc 99"),
    (lambda b: b.vunary("exp", tile(0, "int8", (4,)), tile(64, "int8", (4,))), "needs float"),
    (lambda b: b.vunary("relu", F(0, (4,)), F(64, (5,))), "shape"),
    (lambda b: b.vunary("clip", F(0, (4,)), F(64, (4,)), float("nan"), 1), "p0"),
    (lambda b: b.emit("vunary", func=0, a=Tile(0, 77, (1, 1, 1, 4)), out=F(64, (4,)), p0=0, p1=0),
     "unknown dtype code 77"),
    (lambda b: b.matmul(F(0, (4, 8)), F(256, (9, 4)), F(512, (4, 4))), "inner dimension"),
    (lambda b: b.matmul(F(0, (4, 8)), F(256, (8, 4)), F(512, (4, 5))), "out: shape"),
    (lambda b: b.matmul(F(0, (2, 4, 8)), F(256, (3, 8, 4)), F(2048, (2, 4, 4))), "batch dim"),
    (lambda b: b.matmul(tile(0, "int8", (4, 8)), tile(256, "int8", (8, 4)), tile(512, "int8", (4, 4))),
     "out int32"),
    (lambda b: b.matmul(F(0, (4, 8)), F(256, (8, 4)), F(512, (4, 4)), bias=256 * 1024 - 4), "bias"),
    (lambda b: b.emit("matmul", a=F(0, (4, 8)), w=F(256, (8, 4)), out=F(512, (4, 4)),
                      bias=isa.NONE_ADDR, flags=0x80), "reserved bits"),
    (lambda b: b.conv2d(F(0, (1, 8, 8, 4)), F(4096, (3, 3, 4, 8)), F(8192, (1, 6, 6, 8)),
                        stride=(0, 1)), "stride"),
    (lambda b: b.conv2d(F(0, (1, 8, 8, 4)), F(4096, (3, 3, 4, 8)), F(8192, (1, 6, 6, 8)),
                        groups=3), "groups"),
    (lambda b: b.conv2d(F(0, (1, 8, 8, 4)), F(4096, (3, 3, 4, 8)), F(8192, (1, 6, 6, 8)),
                        groups=2), "per group"),
    (lambda b: b.conv2d(F(0, (1, 8, 8, 4)), F(4096, (3, 3, 4, 8)), F(8192, (1, 8, 8, 8))), "expected"),
    (lambda b: b.conv2d(F(0, (1, 2, 2, 4)), F(4096, (3, 3, 4, 8)), F(8192, (1, 1, 1, 8))), "larger"),
    (lambda b: b.conv2d(F(0, (1, 8, 8, 4)), F(4096, (3, 3, 4, 8)), F(8192, (1, 6, 6, 8)), x_zp=3),
     "x_zp"),
    (lambda b: b.conv2d(tile(0, "int8", (1, 8, 8, 4)), tile(4096, "int8", (3, 3, 4, 8)),
                        tile(8192, "int32", (1, 6, 6, 8)), x_zp=300), "x_zp"),
    (lambda b: b.lut(F(0, (4,)), 1024, tile(64, "int8", (4,))), "not allowed"),
    (lambda b: b.lut(tile(0, "int8", (4,)), 256 * 1024 - 10, tile(64, "int8", (4,))), "table"),
    (lambda b: b.reduce("sum", 0, F(0, (4,)), F(64, (1,))), "axes"),
    (lambda b: b.reduce("sum", (3,), F(0, (4,)), F(64, (4,))), "expected"),
    (lambda b: b.softmax(tile(0, "int8", (4,)), tile(64, "int8", (4,))), "not allowed"),
    (lambda b: b.softmax(F(0, (4,)), F(64, (4,)), axis=4), "axis"),
    (lambda b: b.norm(F(0, (4,)), F(64, (4,)), eps=-1.0), "negative"),
    (lambda b: b.requant(tile(0, "int32", (4,)), F(64, (4,))), "not allowed"),
    (lambda b: b.requant(tile(0, "int32", (4,)), tile(64, "int8", (4,)), scale=float("inf")), "scale"),
    (lambda b: b.requant(tile(0, "int32", (4,)), tile(64, "int8", (4,)), lo=5, hi=4), "lo"),
    (lambda b: b.transpose(F(0, (2, 3)), F(64, (3, 2)), (0, 1, 3, 3)), "permutation"),
    (lambda b: b.transpose(F(0, (2, 3)), F(64, (2, 3)), (0, 1, 3, 2)), "expected"),
    (lambda b: b.copy_region(F(0, (2, 3)), F(64, (2, 4)), (0, 2)), "exceeds"),
    (lambda b: b.pool("max", F(0, (1, 4, 4, 2)), F(256, (1, 2, 2, 2)), kernel=(2, 2), stride=(2, 2),
                      pad=(2, 0, 0, 0)), "smaller than the kernel"),
    (lambda b: b.pool("avg", F(0, (1, 4, 4, 2)), F(256, (1, 3, 3, 2)), kernel=(2, 2), stride=(2, 2)),
     "expected"),
    (lambda b: b.pool(5, F(0, (1, 4, 4, 2)), F(256, (1, 2, 2, 2)), kernel=(2, 2)), "PoolFunc"),
])
def test_compute_refusals(emit, match):
    b = sb()
    emit(b)
    err = refuse(b.end(), match)
    assert err.command_index == 0 and "record 0" in err.message


def test_every_opcode_has_a_check():
    from npud.emulator.validator import _Checker
    for op in isa.OPCODES:
        assert hasattr(_Checker, "_" + op.name), op.name


# --- fuzzing -------------------------------------------------------------------------

def _valid_corpus():
    b = sb()
    b.dma_load(0, 0x10000, "fp32", (4, 4))
    b.sync("dma", "vector")
    b.add(F(0, (4, 4)), F(0, (1, 4)), F(64, (4, 4)))
    b.matmul(F(0, (4, 4)), F(0, (4, 4)), F(128, (4, 4)))
    b.conv2d(F(0, (1, 4, 4, 1)), F(0, (3, 3, 1, 1)), F(256, (1, 2, 2, 1)))
    b.dma_map(isa.WINDOW_BASE, 0x10000, "fp32", (3, 3, 1, 1))
    b.conv2d(F(0, (1, 4, 4, 1)), F(isa.WINDOW_BASE, (3, 3, 1, 1)), F(256, (1, 2, 2, 1)), relu=True)
    b.pool("max", F(0, (1, 4, 4, 1)), F(256, (1, 2, 2, 1)), kernel=(2, 2), stride=(2, 2))
    b.sync("vector", "dma")
    b.dma_store(64, 0x20000, "fp32", (4, 4)).end()
    return b.build()


CORPUS = _valid_corpus()


def test_corpus_is_valid():
    validate(CORPUS, CFG, MAPS)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_fuzz_random_bytes(data):
    try:
        validate(data, CFG, MAPS)
    except StreamError:
        pass


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_fuzz_mutated_valid_stream(data):
    s = bytearray(CORPUS)
    for _ in range(data.draw(st.integers(1, 6))):
        kind = data.draw(st.sampled_from(["flip", "byte", "cut", "insert"]))
        pos = data.draw(st.integers(0, len(s) - 1))
        if kind == "flip":
            s[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "byte":
            s[pos] = data.draw(st.integers(0, 255))
        elif kind == "cut":
            del s[pos:pos + data.draw(st.integers(1, 8))]
        else:
            s[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        if not s:
            break
    try:
        validate(bytes(s), CFG, MAPS)
    except StreamError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_fuzz_well_framed_records(data):
    """Random operands inside correctly framed records reach every check."""
    ops = data.draw(st.lists(st.sampled_from(isa.OPCODES), min_size=1, max_size=4))
    body = b""
    for op in ops:
        payload = data.draw(st.binary(min_size=op.struct.size, max_size=op.struct.size))
        core = data.draw(st.sampled_from([0, 0, 1, 255]))
        body += isa.RECORD_HEADER.pack(op.code, core, op.length) + payload
    end = isa.BY_NAME["end"]
    body += isa.RECORD_HEADER.pack(end.code, 0, end.length)
    stream = isa.encode_header(CFG.target_hash(), len(ops) + 1) + body
    try:
        validate(stream, CFG, MAPS)
    except StreamError:
        pass


def test_implementation_limits_refuse_resource_bombs():
    # A one-element input with 65535-element pads would need gigabytes of padding.
    b = sb()
    b.conv2d(tile(0, "int8", (1, 1, 1, 1)), tile(64, "int8", (3, 3, 1, 1)),
             tile(128, "int32", (1, 1, 1, 1)), dilation=(65535, 65535),
             pad=(65535, 65535, 65535, 65535), stride=(65535, 65535))
    refuse(b.end(), "padded input")
    b = sb()
    b.pool("max", F(0, (1, 1, 1, 1)), F(64, (1, 1, 1, 1)), kernel=(65535, 65535),
           stride=(65535, 65535), pad=(65534, 65534, 65534, 65534))
    refuse(b.end(), "window exceeds")
    b = sb()   # global pooling is exempt from the window limit
    b.global_pool("avg", F(0, (1, 100, 100, 1)), F(65536, (1, 1, 1, 1)))
    validate(b.end().build(), CFG, [])
