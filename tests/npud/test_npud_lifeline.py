"""The lifeline (npud/lifeline.py): a daemon's children die with it, busy or not, all of them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from bench.soak_proc import alive as _alive

# "armed" goes to stderr: the parent's pid line on stdout must not interleave with it.
BUSY = "import sys\nprint('armed', file=sys.stderr, flush=True)\nwhile True:\n    sum(range(10000))\n"

PARENT = textwrap.dedent("""
    import sys, trio
    from npud import lifeline

    async def main():
        kids = [await lifeline.open_process("busy_child", []) for _ in range(3)]
        print(*(k.pid for k in kids), flush=True)
        await trio.sleep_forever()

    trio.run(main)
""")


@pytest.fixture
def env(tmp_path):
    (tmp_path / "busy_child.py").write_text(BUSY)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}


def test_every_busy_child_dies_with_its_parent(env):
    """Three children, so a signal owner shared through one open file would leave two alive."""
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env)
    kids: list[int] = []
    try:
        kids = [int(p) for p in parent.stdout.readline().split()]
        assert len(kids) == 3, "the parent did not start its children"
        armed = 0
        while armed < len(kids):                  # the children share its stderr
            line = parent.stderr.readline()
            assert line, "a child did not arm its lifeline"
            armed += line.count("armed")
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 5
        while any(_alive(k) for k in kids) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not [k for k in kids if _alive(k)]
    finally:
        parent.kill()   # its lifeline then ends any child this test did not learn of
        parent.wait()
        for k in kids:
            if _alive(k):
                os.kill(k, signal.SIGKILL)

def test_a_child_whose_parent_died_before_it_armed_exits_before_its_module_runs(env):
    read_end, write_end = os.pipe()
    os.close(write_end)                       # the "daemon" is already gone
    child = subprocess.run([sys.executable, "-m", "npud.lifeline", "busy_child"], pass_fds=(read_end,),
                           env={**env, "NPUD_LIFELINE_FD": str(read_end)}, capture_output=True, text=True,
                           timeout=30)
    os.close(read_end)
    assert child.returncode == 1 and "has exited" in child.stderr and "armed" not in child.stderr


def test_the_module_runs_as_main_with_its_arguments_and_exit_status(env):
    out = subprocess.run([sys.executable, "-m", "npud.lifeline", "json.tool", "--compact"],
                         input='{"a": [1, 2]}', env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.strip() == '{"a":[1,2]}'   # no lifeline given: runs as is
    bad = subprocess.run([sys.executable, "-m", "npud.lifeline", "json.tool"], input="{",
                         env=env, capture_output=True, text=True, timeout=30)
    assert bad.returncode != 0 and "Expecting" in bad.stderr
