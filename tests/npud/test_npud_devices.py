"""One daemon, several devices: each its own process, memory and parameters."""

import numpy as np
import pytest

import npu
from npud.emulator.config import DeviceConfig, PRESETS
from npu.local import LocalDaemon
from streams import A, B, O, add_stream


@pytest.fixture(scope="module")
def two_devices():
    d = LocalDaemon("--device", "edge", "--device", "server")
    yield d
    d.stop()


def test_devices_report_their_presets(two_devices):
    with npu.connect(two_devices.endpoint) as c:
        devices = c.devices()
    assert [(d.index, d.preset) for d in devices] == [(0, "edge"), (1, "server")]
    assert devices[1].cores == PRESETS["server"].cores != devices[0].cores
    assert devices[1].sram_bytes == PRESETS["server"].sram_bytes


def test_each_device_runs_jobs_with_its_own_memory(two_devices):
    n = 512
    with npu.connect(two_devices.endpoint) as c:
        for d in c.devices():
            a, b, out = (c.alloc(4 * n, device=d.index) for _ in range(3))
            a.map(np.float32)[:] = np.arange(n)
            b.map(np.float32)[:] = d.index + 1
            stream = add_stream(n, DeviceConfig.from_dict(d.params))
            c.submit(stream, [(a, A, False), (b, B, False), (out, O, True)],
                     device=d.index).wait(30)
            assert np.array_equal(out.map(np.float32), np.arange(n) + d.index + 1)
        used = {d.index: d.memory_used for d in c.devices()}
        assert used[0] > 0 and used[1] > 0


def test_buffers_cannot_be_bound_on_another_device(two_devices):
    with npu.connect(two_devices.endpoint) as c:
        edge_buf = c.alloc(4096, device=0)
        config = DeviceConfig.from_dict(c.devices()[1].params)
        with pytest.raises(npu.InvalidArgument, match="lives on device 0"):
            c.submit(add_stream(16, config), [(edge_buf, A, False)], device=1)


def test_a_stream_for_one_target_is_refused_by_another(two_devices):
    with npu.connect(two_devices.endpoint) as c:
        edge, server = (DeviceConfig.from_dict(d.params) for d in c.devices())
        bufs = [c.alloc(4096, device=1) for _ in range(3)]
        bindings = list(zip(bufs, (A, B, O), (False, False, True)))
        with pytest.raises(npu.InvalidArgument, match="(?i)target"):
            c.submit(add_stream(16, edge), bindings, device=1)
        c.submit(add_stream(16, server), bindings, device=1).wait(30)
