"""One owner per lifetime: a model load that fails undoes all it did (buffers, the session's charge,
the program), and what a load charged is refunded by the one path that releases its buffers."""

from __future__ import annotations

import os
import sys

import pytest
import trio

from npud.compile_cache import CachedExecutable
from npud.compiler_worker.api import compile_model
from npud.devices import DeviceHost
from npud.emulator.config import make_config
from npud.executable import Executable
from npud.ipc_schema.errors import ErrorCode, RequestError
from npud.models import instantiate
from npud.sessions import Session

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "compiler_worker"))
from compiler_testmodels import mlp  # noqa: E402

CONFIG = make_config("edge")


def executable(mutate=None) -> CachedExecutable:
    """A small MLP's executable, changed by ``mutate`` (as a buggy or hostile compiler might) and
    signed again, so that only the daemon's own checks can catch it."""
    exe = Executable.from_bytes(compile_model(mlp(seed=3), CONFIG).to_bytes())
    if mutate is not None:
        mutate(exe)
    return CachedExecutable.from_bytes(exe.to_bytes())


def host() -> DeviceHost:
    return DeviceHost(0, "npu0", "edge", CONFIG, on_job_done=lambda job: None)


def _bad_io_table(exe: Executable) -> None:
    exe.io["outputs"][0]["va"] += CONFIG.page_size


def _bad_report(exe: Executable) -> None:
    exe.ops[-1]["commands"] = "many"


def _bad_meta(exe: Executable) -> None:
    exe.meta = ["not", "a", "map"]   # found only after the buffers are allocated and charged


@pytest.mark.parametrize("mutate, match", [(_bad_io_table, "I/O table does not match"),
                                           (_bad_report, "report"), (_bad_meta, "malformed")])
def test_a_load_that_fails_holds_nothing(mutate, match):
    device, session = host(), Session("s1", b"r", "t", 1)
    exe = executable(mutate)
    with pytest.raises(RequestError, match=match) as err:
        trio.run(instantiate, session, device, exe, 1, 1 << 30)
    assert err.value.info.code is ErrorCode.EIO
    assert session.memory == 0            # the session is not charged for buffers it does not hold
    assert device.memory.used == 0        # no weights or arena left allocated
    assert len(device.programs) == 0      # no program left registered


def test_a_loads_charge_is_refunded_when_it_is_unloaded():
    device, session = host(), Session("s1", b"r", "t", 1)
    model = trio.run(instantiate, session, device, executable(), 1, 1 << 30)
    charged = sum(bo.mapped_size for bo, _va, _w in model.fixed)
    assert session.memory == charged == device.memory.used > 0 and model.program in device.programs
    device.unload_model(session, model)
    assert session.memory == 0 and device.memory.used == 0 and model.fixed == []
    assert model.program not in device.programs


def test_references_and_session_charges_change_in_one_place():
    """BufferRefs (npud/memory.py) is the only code that retains, releases, charges or refunds
    (there were 8 places changing ``refs`` and 5 changing ``session.memory``)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "npud"
    pattern = re.compile(r"\.(refs|memory)\s*[-+]=|\.(refs|memory)\s*=\s*\d")
    found = {str(p.relative_to(root)): n for p in root.glob("*.py")
             if (n := len(pattern.findall(p.read_text())))}
    assert set(found) == {"memory.py"}, found


def test_a_job_ends_through_one_path():
    """DeviceHost.complete is the one function that ends a job: nothing else calls Job.finish or the
    daemon's job-done hook (fences and handlers did, beside the device's private _finish)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "npud"
    callers = {str(p.relative_to(root)) for p in root.glob("*.py")
               if re.search(r"\bjob\.finish\(|\._job_done\(|device\._finish\(", p.read_text())}
    assert callers == {"devices.py"}, callers


def test_complete_is_idempotent_and_ends_a_job_that_never_became_runnable():
    from npud.jobs import Job

    ended = []
    device = DeviceHost(0, "npu0", "edge", CONFIG, on_job_done=ended.append)
    job = Job(1, "s1", 0, b"", [])
    error = RequestError(ErrorCode.ECANCELED, "cancelled").info
    device.complete(job, error=error)
    device.complete(job, error=error)
    assert job.state == "failed" and ended == [job]
    assert device.jobs_failed == 0   # it never reached the device: not the device's failure


def test_a_run_waiting_on_a_fence_survives_its_models_unload(tmp_path):
    """A run holds its model's program from the moment it is queued, as it holds its buffers: a run
    waiting on a fence when its model is unloaded still runs (its program used to be dropped at the
    unload, and the run found no program when the fence released it)."""
    import numpy as np

    import npu
    from npu.local import LocalDaemon
    from npud.emulator.assembler import StreamBuilder

    sb = StreamBuilder(CONFIG)
    sb.end()

    d = LocalDaemon("--test-mode", "--cache-dir", str(tmp_path / "cache"))
    try:
        with npu.connect(d.endpoint) as c:
            x = np.random.default_rng(1).standard_normal((4, 32)).astype(np.float32)
            want = c.load(mlp(seed=3)).run({"x": x})
            model = c.load(mlp(seed=3))
            c.inject_fault("slow", slow_ms=1500)      # the next job, a raw one, takes 1.5 s
            first = c.submit(sb.build(), [])
            run = model.submit({"x": x}, after=[first])
            model.unload()
            got = run.result(timeout=60)
            for name in want:
                np.testing.assert_array_equal(got[name], want[name])
            assert c.devices()[0].state == "ok"
    finally:
        d.stop()


def test_job_states_are_an_enum_that_reads_as_the_wire_strings():
    from npud.jobs import Job, JobState, KeptJob

    job = Job(1, "s1", 0, b"", [])
    assert job.state is JobState.QUEUED and job.state == "queued"
    job.finish(error=RequestError(ErrorCode.EIO, "x").info)
    kept = KeptJob.of(job.id, job.session_id, job.client, job.model_name, job.context, job.error, KeptJob.pack(job))
    assert job.state is JobState.FAILED and kept.state is JobState.FAILED
    assert msgpack_roundtrip(job.state) == "failed"


def msgpack_roundtrip(value):
    import msgpack

    return msgpack.unpackb(msgpack.packb(value))
