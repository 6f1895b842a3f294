"""``npuctl cts``: the conformance suite for npud drivers (docs/CTS.md), in the spirit of Vulkan's
CTS, IGT and NNAPI's VTS.

It starts a private daemon (``--test-mode``, for ``inject_fault``) serving one device of the
driver under test and one ``cpu`` device, then runs against the driver and its target:

* ONNX backend node tests (the onnx package's model, inputs and expected outputs) of every op,
  up to ``per_op`` claimed tests each: those the target claims (``check`` on the device: its
  ``Target.support``) must compile, run and match; the others are listed as not claimed;
* the system checks of ``checks.py``: isolation, fault containment, hang/reset/resubmission,
  preemption and fences across devices.

Every row is a ``Result``; ``run`` prints them as a table, writes them as JSON on request and
returns 1 if any failed.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

PASS, FAIL, NOT_CLAIMED, NOT_SUPPORTED, SKIPPED = "pass", "fail", "not claimed", "not supported", "skipped"
PER_OP = 2
SCAN = 4      # an op's tests looked at for PER_OP claimed ones: SCAN x PER_OP at most
CONFIG = """
[scheduling]
job_timeout_ms = 30000
device_processes = 1

[[devices]]
name = "dut0"
driver = "{driver}"

[[devices]]
name = "cpu0"
driver = "cpu"
"""


@dataclass
class Result:
    check: str
    result: str
    seconds: float
    detail: str = ""


def add_parser(sub) -> None:
    """Register `npuctl cts` (its own --json FILE: it writes a report, it does not replace the table)."""
    p = sub.add_parser("cts", help="driver conformance suite: run a driver and its target against "
                                   "ONNX node tests and system checks (docs/CTS.md)",
                       description="Start a private npud with a device of DRIVER (and a cpu device), "
                                   "run the conformance checks, print a table; exit 1 on any failure.")
    p.add_argument("--driver", default="npu-emu", help="the npud.drivers entry point to test (npu-emu)")
    p.add_argument("--json", metavar="FILE", help="also write every result as JSON to FILE")
    p.add_argument("-k", dest="pattern", metavar="PATTERN",
                   help="only checks (and node tests) whose name matches this regular expression")
    p.add_argument("--per-op", type=int, default=PER_OP, metavar="N",
                   help=f"claimed node tests to run per op, shortest names first ({PER_OP})")
    p.add_argument("-v", "--verbose", action="store_true", help="also list the node tests not claimed")


def main(args) -> int:
    from npud import drivers

    if args.driver not in drivers.installed():
        print(f"npuctl cts: no driver named {args.driver!r} is installed (installed: "
              f"{', '.join(drivers.installed())})", file=sys.stderr)
        return 2
    results = run(args.driver, args.pattern, args.per_op, progress=sys.stderr)
    print(table(results, args.per_op, args.verbose))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary(args.driver, args.per_op, results), f, indent=2)
    return 1 if any(r.result == FAIL for r in results) else 0


def run(driver_name: str, pattern: str | None = None, per_op: int = PER_OP, progress=None) -> list[Result]:
    """Every check against ``driver_name``, in a private daemon started and stopped here."""
    from npu.local import LocalDaemon
    from npud import drivers

    from . import checks

    driver = drivers.driver(driver_name)
    params = driver.params(driver.presets()[0], {}).to_dict()
    tmp = tempfile.mkdtemp(prefix="npuctl-cts-")
    config = f"{tmp}/npud.toml"
    with open(config, "w") as f:
        f.write(CONFIG.format(driver=driver_name))
    # (the daemon logs the faults the checks inject, on stderr: they are expected)
    daemon = LocalDaemon("--test-mode", "--config", config, "--cache-dir", f"{tmp}/cache", log_level="error")
    results: list[Result] = []
    try:
        env = checks.Env(daemon.endpoint, driver, params)
        with env.stack:
            for name, check in checks.SYSTEM:
                if pattern and not re.search(pattern, name) and name != "system/probe-model":
                    continue
                if name != "system/probe-model" and env.probe is None:
                    results.append(Result(name, SKIPPED, 0.0, "no probe model runs on this device"))
                    continue
                results.append(_timed(name, lambda: check(env)))
                _say(progress, results[-1])
        results += node_results(daemon.endpoint, pattern, per_op, progress)
    finally:
        daemon.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return results


def _timed(name: str, body) -> Result:
    from . import checks

    t0 = time.monotonic()
    try:
        detail = body()
        result = PASS
    except checks.NotSupported as exc:
        result, detail = NOT_SUPPORTED, str(exc)
    except checks.Failed as exc:
        result, detail = FAIL, str(exc)
    except Exception as exc:   # an error of the driver's (EIO, a timeout...) is the check's failure
        result, detail = FAIL, f"{type(exc).__name__}: {exc}"
    return Result(name, result, time.monotonic() - t0, detail)


def _say(progress, r: Result) -> None:
    if progress is not None and r.result != NOT_CLAIMED:
        print(f"  {r.check}: {r.result} ({r.seconds:.2f} s)", file=progress, flush=True)


def node_results(endpoint: str, pattern: str | None, per_op: int, progress=None) -> list[Result]:
    """Up to ``per_op`` claimed node tests of every op on device 0, which must pass, looking at up
    to ``SCAN * per_op`` of its tests (those not claimed are listed as such)."""
    import npu

    from . import nodes

    out = []
    chosen = nodes.by_op(nodes.node_tests(), SCAN * per_op, pattern)
    with npu.connect(endpoint, name="cts-nodes", timeout=120.0) as client:
        for op, cases in chosen.items():
            ran = 0
            for case in cases:
                if ran == per_op:
                    break
                out.append(_timed_node(client, op, case))
                ran += out[-1].result in (PASS, FAIL)
                _say(progress, out[-1])
    return out


def _timed_node(client, op: str, case) -> Result:
    from onnx.backend.test.runner import Runner

    from . import nodes

    name = f"node/{op}/{case.name}"
    data = nodes.tensor_data(case)
    if data is None:
        return Result(name, SKIPPED, 0.0, "an input or output is not a plain tensor (a sequence, an optional, packed 2/4-bit data): the npud API passes tensors")
    t0 = time.monotonic()
    rep = None
    try:
        rep = DeviceRep(case.model, client, 0)
        got = rep.run(data[0])
        Runner.assert_similar_outputs(data[1], list(got), rtol=case.rtol, atol=case.atol)
        result, detail = PASS, ""
    except NotClaimed as exc:
        result, detail = NOT_CLAIMED, str(exc)
    except AssertionError as exc:
        result, detail = FAIL, "mismatch: " + " ".join(str(exc).split())[:300]
    except Exception as exc:   # claimed, then refused or broken: the target's claim was wrong
        result, detail = FAIL, f"{getattr(exc, 'code', type(exc).__name__)}: {' '.join(str(exc).split())[:300]}"
    finally:
        if rep is not None:
            rep.close()
    return Result(name, result, time.monotonic() - t0, detail)


class NotClaimed(Exception):
    """The target does not claim a node of the test (the message: the first reason it gave)."""


@functools.cache
def _rep_class():
    from npu.onnx_backend import NpuRep   # imports onnx: only when node tests run

    class _DeviceRep(NpuRep):
        """npu.onnx_backend's preparation (parameters baked, shapes fixed, dtypes at the boundary)
        on a given client and device, after asking the device's target whether it claims the model."""

        def __init__(self, model, client, device: int) -> None:
            self._client, self._device = client, device
            super().__init__(model, "NPU", {})

        def _load(self, proto, options: dict):
            problems = self._client.check(proto.SerializeToString(), device=self._device)
            if problems:
                p = problems[0]
                raise NotClaimed(f"{p.get('op') or 'model'}: {p.get('reason', '')}"[:300])
            return self._client.load(proto, device=self._device, **options)

        def close(self) -> None:
            for model in self._compiled.values():
                model.unload()
            self._compiled.clear()

    return _DeviceRep


def DeviceRep(model, client, device: int):
    """A node test's model prepared on ``device`` of ``client`` (NotClaimed if its target declines it)."""
    return _rep_class()(model, client, device)


def counts(results: list[Result]) -> dict[str, int]:
    """{result: how many checks had it}."""
    out: dict[str, int] = {}
    for r in results:
        out[r.result] = out.get(r.result, 0) + 1
    return out


def summary(driver: str, per_op: int, results: list[Result]) -> dict:
    """What --json writes: the counts, the failures, and every result."""
    return {"driver": driver, "per_op": per_op, "counts": counts(results),
            "failures": [asdict(r) for r in results if r.result == FAIL],
            "results": [asdict(r) for r in results]}


def table(results: list[Result], per_op: int = PER_OP, verbose: bool = False) -> str:
    """The results as a text table (node tests not claimed only with ``verbose``), the ops with no
    claimed test, and the totals."""
    shown = [r for r in results if verbose or r.result != NOT_CLAIMED]
    width = max([len(r.check) for r in shown] + [5])
    lines = [f"{'CHECK':<{width}}  {'RESULT':<13}  {'TIME':>7}  DETAIL"]
    for r in shown:
        lines.append(f"{r.check:<{width}}  {r.result:<13}  {r.seconds:>6.2f}s  {r.detail}")
    unclaimed = sorted({r.check.split("/")[1] for r in results if r.result == NOT_CLAIMED}
                       - {r.check.split("/")[1] for r in results if r.check.startswith("node/")
                          and r.result != NOT_CLAIMED})
    lines.append("")
    if unclaimed:
        lines.append(f"ops not claimed by the target ({len(unclaimed)}; -v lists their tests): {', '.join(unclaimed)}")
    lines.append(f"node tests: up to {per_op} claimed tests of each op, shortest names first, of the first "
                 f"{SCAN * per_op} (--per-op N)")
    lines.append("total: " + ", ".join(f"{n} {k}" for k, n in sorted(counts(results).items())))
    return "\n".join(lines)
