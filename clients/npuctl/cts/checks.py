"""The CTS's system checks: what a driver must do besides computing right.

Each check takes the suite's ``Env`` (the private daemon, the device under test, the second
device, the probe model) and returns a detail string when it passes; it raises ``Failed`` (or
``NotSupported``) otherwise.  Everything goes through the client API and ``inject_fault`` (the
daemon runs with ``--test-mode``): no check reaches into the daemon.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass, field

import numpy as np

import npu

from . import probes

JOB_TIMEOUT_S = 2.0     # a hung job's device time limit (the `timeout` of its submit)
SLOW_MS = 30            # per layer segment, for the preemption and fence checks


class Failed(Exception):
    """The check failed; the message says what the driver did wrong."""


class NotSupported(Exception):
    """The driver says it does not do what the check needs (the message says where it says so)."""


def need(condition, detail: str) -> None:
    if not condition:
        raise Failed(detail)


@dataclass
class Env:
    endpoint: str
    driver: object                  # the Driver under test (npud.drivers)
    params: dict                    # its device's DeviceParams.to_dict()
    dut: int = 0                    # device index of the driver under test
    other: int | None = 1           # a second device (cpu) for the fence checks
    probe: probes.Probe | None = None
    golden: dict = field(default_factory=dict)     # input bytes -> an undisturbed run's output
    golden_model: object = None
    stack: ExitStack = field(default_factory=ExitStack)

    def session(self, name: str) -> npu.Client:
        return self.stack.enter_context(npu.connect(self.endpoint, name=f"cts-{name}", timeout=60.0))


def as_input(model, x) -> dict:
    """``x`` as the loaded model takes it: in the dtype its I/O table declares (an int8 tensor
    may cross as float32 and be converted on the device)."""
    return {"x": np.asarray(x, model.inputs[0].dtype)}


def run_raw(c, model, x, **wire):
    """Run ``model`` on input ``x`` with buffers of this session; (job id, input buffer, output buffer)."""
    inp, out = c.alloc(model.inputs[0].size, device=model.device), c.alloc(model.outputs[0].size, device=model.device)
    inp.write(as_input(model, x)["x"])
    job = c._request("run_model", {"model": model.id, "inputs": [inp.handle], "outputs": [out.handle], **wire})["job"]
    return job, inp, out


def wait_raw(c, job: int, timeout_s: float = 30.0) -> dict:
    return c._request("wait", {"job": job, "timeout_ms": int(timeout_s * 1000)}, timeout=timeout_s + 30)


def output(model, buf) -> np.ndarray:
    info = model.outputs[0]
    return np.frombuffer(buf.read(), info.dtype).reshape(info.shape)


def verify(env: Env, x, got, what: str) -> None:
    """``got`` is, bit for bit, what an undisturbed run of the probe gives for ``x``: faults,
    resets, preemption and fences must not change a result."""
    want = golden(env, x)
    need(np.array_equal(np.asarray(got, want.dtype), want), f"{what}: the output differs from an undisturbed run's")


def golden(env: Env, x) -> np.ndarray:
    """An undisturbed run's output for ``x`` (checked once against onnx.reference)."""
    key = np.asarray(x).tobytes()
    if key not in env.golden:
        c = env.session("golden")
        if env.golden_model is None:
            env.golden_model = c.load(env.probe.model, device=env.dut)
        m = env.golden_model
        got = m.run(as_input(m, x))[m.outputs[0].name]
        why = env.probe.mismatch(x, got)
        need(why is None, f"the probe model: {why}")
        env.golden[key] = got
    return env.golden[key]


def device_info(c, index: int) -> dict:
    return c._request("devices", {})["devices"][index]


def choose_probe(env: Env) -> str:
    """The first probe model the target claims whole, run once and checked."""
    c = env.session("probe")
    for probe in probes.candidates():
        if c.check(probe.model, device=env.dut) == []:
            env.probe = probe
            break
    else:
        raise Failed("the target claims none of the CTS's probe models (a float32 and an int8 MLP of "
                     "MatMul/QLinearMatMul layers): the system checks need one of them")
    x = env.probe.feeds(0)
    golden(env, x)   # checked against onnx.reference
    return f"{env.probe.name}: {len(env.golden_model.report().rows)} report rows, output as onnx.reference's"


def foreign_buffers(env: Env) -> str:
    """A session cannot name another session's buffer in a run, and its runs leave it untouched."""
    owner, other = env.session("owner"), env.session("intruder")
    for _ in range(16):   # handles are per session: make the owner's buffers numbers the intruder has not
        owner.alloc(4096, device=env.dut)
    mo, mx = owner.load(env.probe.model, device=env.dut), other.load(env.probe.model, device=env.dut)
    x = env.probe.feeds(1)
    job, inp, out = run_raw(owner, mo, x)
    need(wait_raw(owner, job)["state"] == "done", "the owner's run failed")
    before = out.read()
    own_in, own_out = (other.alloc(t.size, device=env.dut) for t in (mx.inputs[0], mx.outputs[0]))
    own_in.write(as_input(mx, env.probe.feeds(2))["x"])
    mine = {own_in.handle, own_out.handle}
    tried = 0
    for foreign, inputs, outputs in ((inp.handle, [inp.handle], [own_out.handle]),
                                     (out.handle, [own_in.handle], [out.handle])):
        if foreign in mine:
            continue   # handles are per session: that number names the intruder's own buffer
        tried += 1
        try:
            job = other._request("run_model", {"model": mx.id, "inputs": inputs, "outputs": outputs})["job"]
        except npu.NpuError as exc:
            need(exc.code == "ENOENT", f"naming another session's buffer: {exc.code} ({exc.message}), expected ENOENT")
            continue
        raise Failed(f"a run naming another session's buffer was accepted (job {job})")
    job = other._request("run_model", {"model": mx.id, "inputs": [own_in.handle], "outputs": [own_out.handle]})["job"]
    need(wait_raw(other, job)["state"] == "done", "the intruder's own run failed")
    need(out.read() == before, "another session's run changed the owner's output buffer")
    verify(env, x, output(mo, out), "the owner's output")
    return f"{tried} foreign handle(s) refused with ENOENT; the owner's buffer unchanged"


def out_of_range(env: Env) -> str:
    """A program whose accesses leave its bindings is refused or faults (EINVAL/EFAULT), never runs,
    where the same program bound as its compiler laid it out runs; another session's buffers are
    untouched and the device serves the next job."""
    from npud import targets
    from npud.executable import Executable

    exe = Executable.from_bytes(targets.target(env.driver.target).compile(env.probe.model, env.params, {}))
    regions = exe.memory.get("regions") or []
    need(regions, "the executable lists no memory regions")
    c, neighbour = env.session("dma"), env.session("neighbour")
    m = neighbour.load(env.probe.model, device=env.dut)
    x = env.probe.feeds(3)
    job, _inp, out = run_raw(neighbour, m, x)
    need(wait_raw(neighbour, job)["state"] == "done", "the neighbour's run failed")
    before = out.read()
    page = int(env.params.get("page_size", 4096))
    outcomes = []
    bound = {r["va"]: c.alloc(max(page, -(-r["size"] // page) * page), device=env.dut) for r in regions}
    # the control: bound as the compiler laid it out (weights left zero), the program runs
    control = c.submit(exe.stream, [(bound[r["va"]], r["va"], bool(r["writable"])) for r in regions],
                       device=env.dut, timeout=JOB_TIMEOUT_S * 5)
    control.wait(60)
    attempts = {
        "only its last region bound, one page": [(c.alloc(page, device=env.dut), regions[-1]["va"], True)],
        "every region bound read-only": [(bound[r["va"]], r["va"], False) for r in regions],
    }
    for what, bindings in attempts.items():
        try:
            j = c.submit(exe.stream, bindings, device=env.dut, timeout=JOB_TIMEOUT_S * 5)
        except npu.NpuError as exc:
            need(exc.code in ("EINVAL", "EFAULT"), f"{what}: refused with {exc.code}, expected EINVAL or EFAULT")
            outcomes.append(f"{what}: refused ({exc.code})")
            continue
        try:
            j.wait(60)
        except npu.NpuError as exc:
            need(exc.code in ("EFAULT", "EINVAL"), f"{what}: the job failed with {exc.code}, expected EFAULT")
            outcomes.append(f"{what}: faulted ({exc.code})")
            continue
        raise Failed(f"{what}: a program whose accesses leave its bindings ran to completion")
    need(out.read() == before, "another session's buffer changed")
    verify(env, x, m.run(as_input(m, x))[m.outputs[0].name], "the next job")
    return "bound as laid out: ran; " + "; ".join(outcomes)


def crash_contained(env: Env) -> str:
    """A job that takes its device down fails with its own error; another session's job queued
    behind it, and the faulting session's next job, run and are right; the device is ok again."""
    code, _ = _fault_contained(env, "crash", 4)
    return f"faulting job failed with {code}; the other session's job and the next job ran"


def hang_reset(env: Env) -> str:
    """A hung job is aborted at its timeout and the device reset; the innocent job queued behind it is
    run again after the reset, and the hung session's next job runs."""
    code, waited = _fault_contained(env, "hang", 5, timeout=JOB_TIMEOUT_S)
    return f"hung job failed with {code} after {waited:.1f} s (timeout {JOB_TIMEOUT_S:g} s); queued and next jobs ran"


def _fault_contained(env: Env, fault: str, seed: int, **options) -> tuple[str, float]:
    """Inject ``fault`` into one session's next job, with another session's job queued behind it:
    the faulting job must fail (its error code and how long that took are returned); the queued
    job and the faulting session's next job give an undisturbed run's output; the device was
    reset and is ok."""
    bad, good = env.session(f"{fault}-faulting"), env.session(f"{fault}-bystander")
    mb, mg = bad.load(env.probe.model, device=env.dut), good.load(env.probe.model, device=env.dut)
    resets = device_info(good, env.dut)["resets"]
    bad.inject_fault(fault, device=env.dut)
    x = env.probe.feeds(seed)
    t0 = time.monotonic()
    jb = mb.submit(as_input(mb, x), **options)
    jg = mg.submit(as_input(mg, x))
    try:
        jb.result(60)
        raise Failed(f"the job given the {fault} fault succeeded")
    except npu.NpuError as exc:
        code, waited = exc.code, time.monotonic() - t0
    verify(env, x, jg.result(60)[mg.outputs[0].name], "the other session's job queued behind it")
    verify(env, x, mb.run(as_input(mb, x))[mb.outputs[0].name], "the faulting session's next job")
    info = device_info(good, env.dut)
    need(info["state"] == "ok", f"device state {info['state']} after the {fault}")
    need(info["resets"] > resets, "the device was not reset")
    return code, waited


def preemption(env: Env) -> str:
    """A high-priority job overtakes a running low-priority one at a layer boundary."""
    if not getattr(env.driver, "preemption", True):
        raise NotSupported(f"driver {env.driver.name} declares no preemption points (Driver.preemption = "
                           "False): a job holds its device until it ends")
    low_c, high_c = env.session("low"), env.session("high")
    low_ctx, high_ctx = low_c.context("low"), high_c.context("high")
    ml = low_c.load(env.probe.model, device=env.dut)
    mh = high_c.load(env.probe.model, device=env.dut)
    low_c.inject_fault("slow", device=env.dut, slow_ms=SLOW_MS)
    x = env.probe.feeds(6)
    low = ml.submit(as_input(ml, x), context=low_ctx)
    _until_running(low_c, low.id)
    high = mh.submit(as_input(mh, x), context=high_ctx)
    verify(env, x, high.result(60)[mh.outputs[0].name], "the high-priority job")
    low_done_first = low.finished or state(low_c, low.id) == "done"
    verify(env, x, low.result(60)[ml.outputs[0].name], "the preempted job (resumed where it stopped)")
    need(not low_done_first, "the high-priority job finished only after the low-priority one")
    need(low.stats.get("preemptions", 0) >= 1, f"the low-priority job was never preempted ({low.stats})")
    return (f"high waited {high.stats.get('queue_ms', 0):.0f} ms (layers of {SLOW_MS} ms); "
            f"low preempted {low.stats['preemptions']}x, then finished right")


def state(c, job: int) -> str:
    """A job's state now (``wait_jobs`` never fails for a failed or running job)."""
    return c._request("wait_jobs", {"jobs": [job], "all": True, "timeout_ms": 0})["jobs"][0]["state"]


def _until_running(c, job: int, bound_s: float = 10.0) -> None:
    deadline = time.monotonic() + bound_s
    while state(c, job) == "queued":
        if time.monotonic() > deadline:
            raise Failed(f"job {job} did not start in {bound_s:g} s")
        time.sleep(0.005)
    time.sleep(3 * SLOW_MS / 1000)   # a few layers in


def fences(env: Env) -> str:
    """Jobs on two devices chained by fences: each waits for the other device's job and runs only
    after it (whose output is then complete), both ways; a failed job fails its dependent with its cause."""
    if env.other is None:
        raise NotSupported("no second device")
    c = env.session("fences")
    other_probe = probes.small_float()
    m_dut = c.load(env.probe.model, device=env.dut)
    try:
        m_oth = c.load(other_probe.model, device=env.other)
    except npu.NpuError as exc:
        raise NotSupported(f"the second device (cpu) cannot load a model: {exc.message}") from None
    x, y = env.probe.feeds(7), other_probe.feeds(7)
    done = []
    for first, second, slow_dev, name in ((m_oth, m_dut, env.other, "this device waits on cpu"),
                                          (m_dut, m_oth, env.dut, "cpu waits on this device")):
        c.inject_fault("slow", device=slow_dev, slow_ms=2 * SLOW_MS)
        a = first.submit(as_input(first, x if first is m_dut else y))
        b = second.submit(as_input(second, x if second is m_dut else y), after=[a])
        finished = npu.wait([a, b], all=False, timeout=60)
        need(not (b in finished and b.finished and not a.finished), f"{name}: the dependent job finished first")
        for model, job in ((first, a), (second, b)):
            got = job.result(60)[model.outputs[0].name]
            if model is m_dut:
                verify(env, x, got, name)
            else:
                why = other_probe.mismatch(y, got)
                need(why is None, f"{name}: {why}")
        done.append(name)
    c.inject_fault("hang", device=env.dut)
    a = m_dut.submit(as_input(m_dut, x), timeout=JOB_TIMEOUT_S)
    b = m_oth.submit(as_input(m_oth, y), after=[a])
    errors = []
    for job in (a, b):
        try:
            job.result(60)
            raise Failed("a job after a hung job on the other device succeeded" if job is b else "the hung job succeeded")
        except npu.NpuError as exc:
            errors.append(exc)
    # the daemon fails a dependent with ECANCELED naming its cause (npud/fences.py)
    need(errors[1].code == "ECANCELED" and errors[0].code in errors[1].message,
         f"the dependent job failed with {errors[1].code} ({errors[1].message}), not naming its cause {errors[0].code}")
    return f"{'; '.join(done)}; a hung job's dependent on cpu failed with {errors[1].code}"


def cross_device_data(env: Env) -> str:
    """One model across this device and the fallback device: the probe with a Sin in its middle,
    loaded with ``fallback="cpu"``.  The tensors between its partitions are buffers both devices
    map, its runs are chains of jobs joined by fences inside the daemon: its output is right only if
    each device read what the other wrote, after it was written."""
    if env.other is None:
        raise NotSupported("no second device")
    c = env.session("cross-device")
    probe = probes.with_sin(env.probe)
    declined = {p["node"] for p in c.check(probe.model, device=env.dut)}
    if not declined:
        raise NotSupported(f"the target claims every node of the {probe.name}: nothing crosses devices")
    model = c.load(probe.model, device=env.dut, fallback="cpu")
    on_other = {r["node"] for r in model.report().placement if r["device"] != env.dut}
    need(on_other == declined, f"the nodes run elsewhere {sorted(on_other)} are not the ones the target "
                               f"declines {sorted(declined)}")
    for seed in range(3):
        x = probe.feeds(seed)
        job = model.submit(as_input(model, x))
        why = probe.mismatch(x, job.result(60)[model.outputs[0].name])
        need(why is None, f"run {seed}: {why}")
        need(len(job.stats.get("partitions", [])) >= 2, f"run {seed} did not cross devices ({job.stats})")
    return f"{probe.name}: {len(on_other)} node(s) on the fallback device, 3 runs as onnx.reference's"


SYSTEM = [
    ("system/probe-model", choose_probe),
    ("isolation/foreign-buffers", foreign_buffers),
    ("isolation/out-of-range-dma", out_of_range),
    ("faults/crash-containment", crash_contained),
    ("faults/hang-reset-resubmit", hang_reset),
    ("scheduling/preemption", preemption),
    ("fences/cross-device", fences),
    ("fences/cross-device-data", cross_device_data),
]
