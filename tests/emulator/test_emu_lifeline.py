"""The lifeline (emulator/lifeline.py): a daemon's children die with it, busy or not, all of them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

BUSY_CHILD = "from emulator import lifeline; lifeline.die_with_parent(); print('armed', flush=True)\n" \
             "while True: sum(range(10000))"

PARENT = textwrap.dedent(f"""
    import sys, trio
    from emulator import lifeline

    async def main():
        kids = [await lifeline.open_process([sys.executable, "-c", {BUSY_CHILD!r}]) for _ in range(3)]
        print(*(k.pid for k in kids), flush=True)
        await trio.sleep_forever()

    trio.run(main)
""")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


def test_every_busy_child_dies_with_its_parent():
    """Three children, so a signal owner shared through one open file would leave two alive."""
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True, env=_env())
    kids = [int(p) for p in parent.stdout.readline().split()]
    try:
        armed = 0
        while armed < len(kids):                  # the children share its stdout
            line = parent.stdout.readline()
            assert line, "a child did not arm its lifeline"
            armed += line.count("armed")
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 5
        while any(_alive(k) for k in kids) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not [k for k in kids if _alive(k)]
    finally:
        for k in kids:
            if _alive(k):
                os.kill(k, signal.SIGKILL)


def test_a_child_whose_parent_died_before_it_armed_exits_at_once():
    read_end, write_end = os.pipe()
    os.close(write_end)                       # the "daemon" is already gone
    child = subprocess.run([sys.executable, "-c", BUSY_CHILD], pass_fds=(read_end,), timeout=30,
                           env={**_env(), "NPUD_LIFELINE_FD": str(read_end)}, capture_output=True, text=True)
    os.close(read_end)
    assert child.returncode == 1 and "has exited" in child.stderr and "armed" not in child.stdout


def test_a_child_started_by_hand_has_no_lifeline():
    out = subprocess.run([sys.executable, "-c", "from emulator import lifeline; lifeline.die_with_parent(); "
                          "print('ran')"], env=_env(), capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "ran"
