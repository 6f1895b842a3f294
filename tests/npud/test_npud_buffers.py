"""Buffer objects: allocation limits, isolation between sessions, both I/O paths, zero-fill."""

from __future__ import annotations

import numpy as np
import pytest

import npu
from npu.local import LocalDaemon

MiB = 1 << 20


def device0(c):
    return next(d for d in c.devices() if d.index == 0)


# --- allocation -----------------------------------------------------------------------

def test_alloc_is_zero_filled_and_accounted(client):
    before = device0(client).memory_used
    buf = client.alloc(10000)
    assert buf.size == 10000
    assert buf.read() == bytes(10000)
    page = device0(client).params["page_size"]
    charged = -(-10000 // page) * page  # device memory is counted in whole pages
    assert device0(client).memory_used == before + charged
    mine = next(c for c in client.clients() if c["session"] == client.session)
    assert mine["buffers"] == 1 and mine["memory"] == charged
    buf.free()
    assert device0(client).memory_used == before


@pytest.mark.parametrize("size", [2**50, 0, -1])
def test_absurd_or_empty_sizes_are_einval(client, size):
    with pytest.raises(npu.InvalidArgument) as info:
        client.alloc(size)
    assert info.value.code == "EINVAL" and info.value.retryable is False
    assert "size" in info.value.message
    client.ping()


def test_alloc_above_max_buffer_bytes_is_einval(client):
    limit = client.limits["max_buffer_bytes"]
    with pytest.raises(npu.InvalidArgument) as info:
        client.alloc(limit + 1)
    assert info.value.code == "EINVAL" and "max_buffer_bytes" in info.value.message
    assert str(limit) in info.value.message


def test_bad_device_is_enodev(client):
    with pytest.raises(npu.NotFound) as info:
        client.alloc(4096, device=7)
    assert info.value.code == "ENODEV" and "7" in info.value.message


@pytest.fixture(scope="module")
def small_daemon(tmp_path_factory):
    cfg = tmp_path_factory.mktemp("cfg") / "npud.toml"
    cfg.write_text('[limits]\nmemory_quota = "1MiB"\nmax_buffer_bytes = "4MiB"\n\n'
                   '[[devices]]\nname = "tiny"\npreset = "edge"\n'
                   '[devices.params]\nmemory_bytes = "2MiB"\n')
    d = LocalDaemon("--config", str(cfg))
    yield d
    assert d.stop() == 0


def test_quota_refused_with_edquot(small_daemon):
    with npu.connect(small_daemon.endpoint) as c:
        assert c.limits["memory_quota"] == MiB and c.limits["max_buffer_bytes"] == 4 * MiB
        a = c.alloc(MiB // 2)
        with pytest.raises(npu.OutOfMemory) as info:
            c.alloc(MiB // 2 + 1)
        e = info.value
        assert e.code == "EDQUOT" and e.retryable is False
        assert "quota" in e.message and str(MiB) in e.message
        c.alloc(MiB // 2)  # exactly the quota is fine
        a.free()
        c.alloc(MiB // 2)  # freeing gives quota back


def test_device_memory_exhaustion_is_enomem_retryable(small_daemon):
    with npu.connect(small_daemon.endpoint) as a, npu.connect(small_daemon.endpoint) as b, \
            npu.connect(small_daemon.endpoint) as c:
        total = device0(a).memory_total
        assert total == 2 * MiB
        ba = a.alloc(MiB)
        b.alloc(MiB)
        with pytest.raises(npu.OutOfMemory) as info:
            c.alloc(4096)
        assert info.value.code == "ENOMEM" and info.value.retryable is True
        assert "device 0" in info.value.message
        ba.free()
        assert c.alloc(4096).size == 4096  # memory freed by free() is available at once
        assert device0(a).memory_used == total - MiB + 4096


def test_max_buffer_from_config(small_daemon):
    with npu.connect(small_daemon.endpoint) as c:
        with pytest.raises(npu.InvalidArgument, match="max_buffer_bytes"):
            c.alloc(4 * MiB + 1)


# --- isolation ------------------------------------------------------------------------

def test_sessions_cannot_touch_each_others_buffers(make_client):
    a, b = make_client(), make_client(map_io=False)
    secret = a.alloc(4096)
    secret.write(b"A's secret" * 10)
    stolen_map = npu.Buffer(b, secret.handle, secret.size, 0)
    b_mapped = make_client()
    stolen_mapped = npu.Buffer(b_mapped, secret.handle, secret.size, 0)
    with pytest.raises(npu.NotFound) as info:
        stolen_map.read(16)           # message path
    assert info.value.code == "ENOENT" and str(secret.handle) in info.value.message
    with pytest.raises(npu.NotFound):
        stolen_map.write(b"overwrite")
    with pytest.raises(npu.NotFound):
        stolen_mapped.map()           # map path
    with pytest.raises(npu.NotFound):
        stolen_mapped.read(16)
    with pytest.raises(npu.NotFound):
        stolen_map.free()
    with pytest.raises(npu.NotFound):
        b.submit(b"\x00" * 64, [(stolen_map, 0x10000, False)])
    assert secret.read(100) == b"A's secret" * 10


def test_same_handle_number_names_own_buffer(make_client):
    a, b = make_client(), make_client(map_io=False)
    ba = a.alloc(4096)
    bb = b.alloc(4096)
    assert ba.handle == bb.handle == 1  # handles are per session
    ba.write(b"\xaa" * 4096)
    bb.write(b"\xbb" * 4096)
    assert bb.read() == b"\xbb" * 4096
    assert ba.read() == b"\xaa" * 4096
    assert ba.read() != bb.read()
    bb.free()
    assert ba.read() == b"\xaa" * 4096  # freeing B's handle 1 did not touch A's


# --- I/O paths ------------------------------------------------------------------------

@pytest.mark.parametrize("map_io", [True, False])
def test_read_write_offsets_and_bounds(make_client, map_io):
    c = make_client(map_io=map_io)
    buf = c.alloc(1000)
    buf.write(b"hello", offset=995)
    buf.write(np.arange(10, dtype=np.int32), offset=8)
    assert buf.read(5, offset=995) == b"hello"
    assert np.array_equal(np.frombuffer(buf.read(40, offset=8), np.int32), np.arange(10))
    assert buf.read(8) == bytes(8)
    for bad in [lambda: buf.write(b"toolong", offset=995), lambda: buf.read(6, offset=995),
                lambda: buf.read(1, offset=1000), lambda: buf.write(b"x", offset=-1)]:
        with pytest.raises(npu.InvalidArgument) as info:
            bad()
        assert info.value.code == "EINVAL" and "past the end" in info.value.message
    assert c.attached is True
    assert (buf._mm is not None) == map_io


@pytest.mark.parametrize("map_io", [True, False])
def test_read_returns_a_fresh_read_only_copy_from_numpys_allocator(make_client, map_io):
    """read() allocates its result the way numpy.copy() does (huge pages for large blocks: a
    ``bytes`` result cost 10x its copy in page faults), and it is a copy, not a view."""
    c = make_client(map_io=map_io)
    buf = c.alloc(8192)
    buf.write(b"\x5a" * 8192)
    got = buf.read()
    assert isinstance(got, memoryview) and got.readonly and got.format == "B" and got.nbytes == 8192
    assert isinstance(got.obj, np.ndarray)     # numpy's allocation
    assert got == b"\x5a" * 8192 and bytes(got[:2]) == b"ZZ"
    buf.write(b"\x00" * 8192)
    assert got == b"\x5a" * 8192               # a copy: the buffer's later bytes do not show


async def test_the_trio_client_reads_the_same_way(daemon):
    async with npu.connect_async(daemon.endpoint) as c:
        buf = await c.alloc(4096)
        await buf.write(b"\x07" * 4096)
        got = await buf.read(16, offset=8)
        assert isinstance(got, memoryview) and got.readonly and got == b"\x07" * 16


def test_daemon_bounds_checks_on_message_path(client):
    buf = client.alloc(100)
    for op, args in [("write", {"handle": buf.handle, "offset": 98, "data": b"abc"}),
                     ("read", {"handle": buf.handle, "offset": 50, "size": 51}),
                     ("read", {"handle": buf.handle, "offset": 2**64 - 1, "size": 2})]:
        with pytest.raises(npu.InvalidArgument) as info:
            client._request(op, args)
        assert info.value.code == "EINVAL" and "100-byte buffer" in info.value.message
    client.ping()


def test_message_path_chunks_above_max_inline(make_client):
    c = make_client(map_io=False)
    inline = c.limits["max_inline_bytes"]
    size = inline + MiB + 3
    buf = c.alloc(size)
    pattern = (np.arange(size, dtype=np.uint64) * 2654435761 % 251).astype(np.uint8)
    buf.write(pattern)
    assert buf._mm is None
    got = np.frombuffer(buf.read(), np.uint8)
    assert np.array_equal(got, pattern)
    # a read spanning the chunk boundary at an odd offset
    assert buf.read(1000, offset=inline - 499) == pattern[inline - 499:inline + 501].tobytes()
    # the same bytes through the mapping
    assert np.array_equal(buf.map()[:size], pattern)


def test_map_is_shared_with_daemon_both_ways(make_client):
    c = make_client(map_io=False)
    buf = c.alloc(64 * 4)
    view = buf.map(np.float32)
    assert view.flags.writeable and view.shape == (64,)
    view[:] = np.arange(64, dtype=np.float32)
    assert np.array_equal(np.frombuffer(buf.read(), np.float32), np.arange(64))  # via the daemon
    buf.write(np.full(8, 7.5, np.float32), offset=16)                          # via the daemon
    assert np.array_equal(view[4:12], np.full(8, 7.5, np.float32))
    assert np.array_equal(buf.map(np.float32, (8, 8))[1], view[8:16])


def test_freed_buffer_is_enoent(make_client):
    c = make_client(map_io=False)
    buf = c.alloc(4096)
    handle = buf.handle
    buf.free()
    with pytest.raises(npu.NotFound):
        buf.read()
    for op, args in [("read", {"handle": handle, "offset": 0, "size": 1}),
                     ("write", {"handle": handle, "offset": 0, "data": b"x"}),
                     ("map", {"handle": handle}), ("free", {"handle": handle})]:
        with pytest.raises(npu.NotFound) as info:
            c._request(op, args)
        assert info.value.code == "ENOENT"
    buf.free()  # idempotent in the library


@pytest.mark.parametrize("map_io", [False, True])
def test_reused_memory_never_leaks_data(make_client, map_io):
    writer = make_client(map_io=map_io)
    reader = make_client(map_io=False)
    for size in (4096, 3 * 4096 + 17, 1 << 20):
        for _ in range(6):
            buf = writer.alloc(size)
            buf.write(b"\xa5" * size)
            buf.free()
            for c in (writer, reader):
                again = c.alloc(size)
                data = again.read()
                assert data == bytes(size), f"{size}-byte buffer reused with old data"
                again.write(b"\x5a" * size)
                again.free()


def test_map_without_companion_socket_is_eopnotsupp_and_the_session_lives(daemon):
    """Not ENOTCONN, which says the session is gone (a client would drop this live one)."""
    from npud_raw import RawPeer, error_of
    p = RawPeer(daemon.endpoint)
    try:
        assert p.hello()["ok"]
        handle = p.request("alloc", {"device": 0, "size": 4096})["result"]["handle"]
        err = error_of(p.request("map", {"handle": handle}))
        assert err["code"] == "EOPNOTSUPP" and "companion" in err["message"] and err["retryable"] is False
        assert p.request("read", {"handle": handle, "offset": 0, "size": 4})["ok"]
    finally:
        p.close()
