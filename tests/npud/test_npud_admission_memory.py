"""Device memory admission: ENOMEM is transient when jobs in flight hold memory, and says when to retry."""

import time

import numpy as np
import pytest

import npu
from examples import tiny_cnn
from npu.local import LocalDaemon


@pytest.fixture(scope="module")
def small_device(tmp_path_factory):
    config = tmp_path_factory.mktemp("cfg") / "npud.toml"
    config.write_text('[[devices]]\nname = "npu0"\npreset = "edge"\n'
                      '[devices.params]\nmemory_bytes = 524288\n')
    d = LocalDaemon("--config", str(config), "--test-mode",
                    "--cache-dir", str(tmp_path_factory.mktemp("cache")))
    yield d
    d.stop()


def test_enomem_while_a_job_holds_memory_is_retryable_with_a_hint(small_device):
    with npu.connect(small_device.endpoint) as c:
        model = c.load(tiny_cnn.build())
        c.inject_fault("slow", slow_ms=150, count=1)
        job = model.submit(np.zeros(tiny_cnn.INPUT_SHAPE, np.float32))
        model.unload()          # its weights and arena stay with the running job
        free = sum(d.memory_total - d.memory_used for d in c.devices())
        with pytest.raises(npu.OutOfMemory) as refused:
            c.alloc(free + 64 * 1024)   # fits only once the job lets go of the model's memory
        assert refused.value.code == "ENOMEM" and refused.value.retryable
        assert refused.value.retry_after is not None and refused.value.retry_after > 0
        assert "jobs in flight" in refused.value.message
        job.wait(30)
        deadline = time.monotonic() + 5
        while True:  # the hint is a hint: retry until the memory is back
            try:
                c.alloc(free + 64 * 1024).free()
                break
            except npu.OutOfMemory:
                assert time.monotonic() < deadline
                time.sleep(0.05)


def test_enomem_with_nothing_in_flight_has_no_hint(small_device):
    with npu.connect(small_device.endpoint) as c:
        with pytest.raises(npu.OutOfMemory) as refused:
            c.alloc(600 * 1024)
        assert refused.value.code == "ENOMEM" and refused.value.retry_after is None
