"""DMA through the MMU: strided transfers, page faults, isolation, recovery."""


import numpy as np
import pytest

from npud.emulator.errors import DeviceError, PageFault, StreamError
from npud.emulator.mmu import Mapping
from npud.emulator.validator import validate
from emu_harness import Rig


def roundtrip(rig, src_va, dst_va, dtype, shape, load_strides=None, store_strides=None):
    sb = rig.builder()
    sb.dma_load(0, src_va, dtype, shape, load_strides)
    sb.sync("dma", "dma")
    sb.dma_store(0, dst_va, dtype, shape, store_strides).end()
    return rig.run(sb)


def test_dense_copy_and_counters():
    rig = Rig()
    x = np.arange(1000, dtype=np.int32)
    src, dst = rig.put(x), rig.alloc(x.nbytes)
    st = roundtrip(rig, src, dst, "int32", (1000,))
    np.testing.assert_array_equal(rig.get(dst, np.int32, (1000,)), x)
    assert st.dma_bytes_in == st.dma_bytes_out == 4000
    assert st.commands == 5 and st.cycles > 0 and st.engine_busy["dma"] > 0


def test_strided_4d_gather_and_scatter():
    rig = Rig()
    x = np.arange(2 * 5 * 6 * 7, dtype=np.float32).reshape(2, 5, 6, 7)
    src = rig.put(x)
    dst = rig.alloc(x.nbytes)
    # Load a transposed, sub-sampled view: x[:, ::2, 1:, ::3] as [2, 3, 5, 3]
    view = x[:, ::2, 1:, ::3]
    strides = (x.strides[0], x.strides[1] * 2, x.strides[2], x.strides[3] * 3)
    offset = x.strides[2]
    sb = rig.builder()
    sb.dma_load(0, src + offset, "fp32", view.shape, strides)
    sb.sync("dma", "dma")
    # ...and store it into a [2, 3, 5, 3] slot of a larger output, channel-interleaved.
    out_strides = (3 * 5 * 6 * 4, 5 * 6 * 4, 6 * 4, 8)
    sb.dma_store(0, dst, "fp32", view.shape, out_strides).end()
    rig.run(sb)
    got = rig.get(dst, np.float32, (2, 3, 5, 6))
    np.testing.assert_array_equal(got[..., ::2], view)
    np.testing.assert_array_equal(got[..., 1::2], 0)


def test_dma_crossing_pages_of_different_bos():
    rig = Rig()
    ps = rig.cfg.page_size
    a, b = rig.bo(ps), rig.bo(ps)
    base = 0x400000
    # The page of `b` sits directly after the page of `a` in VA space.
    rig.ctx.map(base, a, writable=True)
    rig.ctx.map(base + ps, b, writable=True)
    x = np.arange(ps // 2, dtype=np.int16).view(np.uint8)
    a[:] = bytes(ps)
    data = np.arange(512, dtype=np.int32)
    raw = data.tobytes()
    a[ps - 1000:] = raw[:1000]
    b[:len(raw) - 1000] = raw[1000:]
    dst = rig.alloc(len(raw))
    roundtrip(rig, base + ps - 1000, dst, "int32", (512,))
    np.testing.assert_array_equal(rig.get(dst, np.int32, (512,)), data)
    # and a store straddling the same boundary
    roundtrip(rig, dst, base + ps - 2, "int32", (512,))
    assert bytes(a[ps - 2:]) + bytes(b[:len(raw) - 2]) == raw


def test_bo_pages_mapped_in_another_order():
    rig = Rig()
    ps = rig.cfg.page_size
    bo = rig.bo(2 * ps)
    bo[:] = bytes(range(256)) * (2 * ps // 256)
    mv = memoryview(bo)
    # Map the BO's second page *below* its first page.
    rig.ctx.map(0x800000, mv[ps:], writable=False)
    rig.ctx.map(0x800000 + ps, mv[:ps], writable=False)
    dst = rig.alloc(2 * ps)
    roundtrip(rig, 0x800000, dst, "uint8", (2 * ps,))
    got = rig.get(dst, np.uint8, (2 * ps,))
    assert bytes(got) == bytes(bo[ps:]) + bytes(bo[:ps])


def test_validator_refuses_unmapped_and_readonly():
    rig = Rig()
    src = rig.put(np.zeros(16, np.float32))       # read-only mapping
    sb = rig.builder()
    sb.dma_store(0, src, "fp32", (16,)).end()
    with pytest.raises(StreamError, match="writable") as e:
        rig.run(sb)
    assert e.value.code == "EINVAL" and e.value.command_index == 0
    sb = rig.builder()
    sb.dma_load(0, 0x7000_0000, "fp32", (16,)).end()
    with pytest.raises(StreamError, match="mappings"):
        rig.run(sb)


def _faulting_program(rig, va, *, store=False):
    """A program validated against a pretend mapping, so the MMU itself must catch it."""
    sb = rig.builder()
    sb.nop()
    (sb.dma_store if store else sb.dma_load)(0, va, "fp32", (64,))
    sb.end()
    fake = [Mapping(va & ~0xFFF, 1 << 20, True)]
    return validate(sb.build(), rig.cfg, fake)


def test_page_fault_names_address_access_and_command():
    rig = Rig()
    prog = _faulting_program(rig, 0x5000_0010)
    with pytest.raises(PageFault) as e:
        rig.dev.execute(rig.ctx, prog)
    err = e.value
    assert err.code == "EFAULT" and err.command_index == 1 and err.access == "read"
    assert err.address == 0x5000_0010
    assert "0x50000010" in err.message and "command 1" in err.message and "dma_load" in err.message


def test_permission_fault_on_readonly_page_reports_first_bad_byte():
    rig = Rig()
    ps = rig.cfg.page_size
    rw, ro = rig.bo(ps), rig.bo(ps)
    rig.ctx.map(0x900000, rw, writable=True)
    rig.ctx.map(0x900000 + ps, ro, writable=False)
    prog = _faulting_program(rig, 0x900000 + ps - 128, store=True)
    with pytest.raises(PageFault) as e:
        rig.dev.execute(rig.ctx, prog)
    assert e.value.address == 0x900000 + ps and e.value.access == "write"
    assert "read-only" in e.value.message
    assert bytes(ro) == bytes(ps)   # nothing written to the protected page


def test_fault_leaves_device_usable_and_contexts_isolated():
    rig = Rig()
    other = rig.dev.create_context()
    secret = np.full(256, 7, np.float32)
    buf = rig.bo(secret.nbytes)
    buf[:secret.nbytes] = secret.tobytes()
    other.map(0x100000, buf, writable=False)
    # rig.ctx has its own mapping at the same VA; it must never see `secret`.
    mine = rig.put(np.full(256, 1, np.float32))
    assert mine == 0x100000
    dst = rig.alloc(1024)
    with pytest.raises(PageFault):
        rig.dev.execute(rig.ctx, _faulting_program(rig, 0x6000_0000))
    roundtrip(rig, 0x100000, dst, "fp32", (256,))
    np.testing.assert_array_equal(rig.get(dst, np.float32, (256,)), 1)
    # the other context's job still runs after the fault, in its own space
    out = rig.bo(1024)
    other.map(0x200000, out, writable=True)
    sb = rig.builder()
    sb.dma_load(0, 0x100000, "fp32", (256,)).sync("dma", "dma").dma_store(0, 0x200000, "fp32", (256,)).end()
    rig.dev.execute(other, sb.build())
    np.testing.assert_array_equal(np.frombuffer(out, np.float32)[:256], 7)
    # a stream using the other context's address is refused in this one
    sb = rig.builder()
    sb.dma_load(0, 0x200000, "fp32", (4,)).end()
    with pytest.raises(StreamError):
        rig.run(sb)


def test_sram_does_not_leak_between_jobs():
    rig = Rig()
    src = rig.put(np.full(64, 9, np.int32))
    dst = rig.alloc(256)
    sb = rig.builder()
    sb.dma_load(0, src, "int32", (64,)).end()
    rig.run(sb)
    sb = rig.builder()
    sb.dma_store(0, dst, "int32", (64,)).end()
    rig.run(sb)
    np.testing.assert_array_equal(rig.get(dst, np.int32, (64,)), 0)


def test_map_rules():
    rig = Rig()
    ps = rig.cfg.page_size
    buf = rig.bo(2 * ps)
    with pytest.raises(ValueError):
        rig.ctx.map(0x1001, buf, writable=True)         # misaligned va
    with pytest.raises(ValueError):
        rig.ctx.map(0x1000, memoryview(buf)[:100], writable=True)  # partial page
    rig.ctx.map(0x10000, buf, writable=True)
    with pytest.raises(ValueError, match="overlap"):
        rig.ctx.map(0x10000 + ps, rig.bo(ps), writable=True)
    with pytest.raises(ValueError, match="overlap"):
        rig.ctx.map(0x10000 - ps, rig.bo(2 * ps), writable=True)
    with pytest.raises(ValueError, match="read-only"):
        rig.ctx.map(0x40000, bytes(ps), writable=True)
    rig.ctx.map(0x40000, bytes(ps), writable=False)
    assert [m.va for m in rig.ctx.mappings()] == [0x10000, 0x40000]
    assert rig.ctx.mappings()[0] == Mapping(0x10000, 2 * ps, True)
    rig.ctx.unmap(0x10000)
    with pytest.raises(ValueError):
        rig.ctx.unmap(0x10000)
    assert [m.va for m in rig.ctx.mappings()] == [0x40000]
    rig.ctx.map(0x10000 + ps, rig.bo(ps), writable=True)   # the hole is free again
    buf.close()   # the emulator dropped its reference on unmap


def test_contexts_are_limited_and_recycled():
    rig = Rig()
    ctxs = [rig.dev.create_context() for _ in range(rig.cfg.hw_contexts - 1)]
    with pytest.raises(DeviceError) as e:
        rig.dev.create_context()
    assert e.value.code == "EBUSY"
    ctxs[0].close()
    ctxs[0].close()
    rig.dev.create_context()
    with pytest.raises(DeviceError):
        rig.dev.execute(ctxs[0], rig.builder().end().build())


def test_several_devices_are_independent():
    a, b = Rig("edge"), Rig("server")
    x = np.arange(32, dtype=np.float32)
    for r in (a, b):
        src, dst = r.put(x), r.alloc(x.nbytes)
        roundtrip(r, src, dst, "fp32", (32,))
        np.testing.assert_array_equal(r.get(dst, np.float32, (32,)), x)
    # a stream built for one target is refused by the other
    with pytest.raises(StreamError, match="target hash"):
        b.dev.execute(b.ctx, a.builder().end().build())


def test_dropped_context_returns_its_slot():
    rig = Rig()
    for _ in range(3 * rig.cfg.hw_contexts):
        ctx = rig.dev.create_context()
        ctx.map(0x10000, rig.bo(4096), writable=True)
        del ctx


def _prepared_copy(rig, n):
    """A validated program copying n int32 from a fresh read-only BO to a fresh writable one."""
    src, dst = rig.put(np.arange(n, dtype=np.int32)), rig.alloc(4 * n)
    sb = rig.builder()
    sb.dma_load(0, src, "int32", (n,))
    sb.sync("dma", "dma")
    sb.dma_store(0, dst, "int32", (n,)).end()
    return validate(sb.build(), rig.cfg, rig.ctx.mappings()), src, dst


def test_program_is_prepared_once_and_control_commands_have_no_step():
    rig = Rig()
    prog, _, dst = _prepared_copy(rig, 64)
    commands, steps = rig.dev.prepare(prog)
    assert [c.op.name for c in commands] == ["dma_load", "dma_store"]   # signal/wait/end: no step
    assert len(steps) == 2
    rig.dev.execute(rig.ctx, prog)
    rig.dev.execute(rig.ctx, prog)
    assert rig.dev.prepare(prog)[1] is steps
    np.testing.assert_array_equal(rig.get(dst, np.int32, (64,)), np.arange(64))


def test_prepared_dma_follows_remapping_and_still_faults():
    # Prepared DMA steps cache their translation only until the mappings change:
    # a buffer mapped anew at the same VA is the one read, and an unmapped VA faults.
    rig = Rig()
    prog, src, dst = _prepared_copy(rig, 64)
    rig.dev.execute(rig.ctx, prog)
    rig.ctx.unmap(src)
    other = rig.bo(256)
    other[:256] = (np.arange(64, dtype=np.int32) * 7).tobytes()
    rig.map(other, writable=False, va=src)
    rig.dev.execute(rig.ctx, prog)
    np.testing.assert_array_equal(rig.get(dst, np.int32, (64,)), np.arange(64) * 7)
    rig.ctx.unmap(src)
    with pytest.raises(PageFault) as e:
        rig.dev.execute(rig.ctx, prog)
    assert e.value.command_index == 0 and e.value.address == src
