"""npud/systemd.py (notify, LISTEN_FDS, watchdog) and npud/log.py (the journal's <N> prefixes)."""

from __future__ import annotations

import io
import os
import re
import socket
import subprocess
import sys

import pytest
import trio

from npud import log as npud_log
from npud import systemd
from systemd_harness import Notifications, child_env, npud_logging, stop


@pytest.fixture
def notify(tmp_path):
    n = Notifications(str(tmp_path / "notify"))
    yield n
    n.close()


def test_systemd_notify_sends_and_is_a_noop_without_socket(notify):
    assert systemd.notify("READY=1\nSTATUS=x", {"NOTIFY_SOCKET": notify.path})
    notify.drain(1.0)
    assert notify.messages == ["READY=1\nSTATUS=x"]
    assert not systemd.notify("READY=1", {})


def test_systemd_notify_without_a_descriptor_is_skipped_not_raised(notify, monkeypatch):
    def no_descriptors(*args, **kwargs):
        raise OSError(24, "Too many open files")
    monkeypatch.setattr(systemd.socket, "socket", no_descriptors)
    assert not systemd.notify("STATUS=x", {"NOTIFY_SOCKET": notify.path})


def test_systemd_notify_abstract_socket():
    name = f"npud-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        assert systemd.notify("WATCHDOG=1", {"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(100) == b"WATCHDOG=1"


def test_systemd_listen_fds_checks_the_pid_and_unsets():
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "npud:npud-fds", "X": "1"}
    assert systemd.listen_fds(env) == []
    assert env == {"X": "1"}, "LISTEN_* must not leak to the device processes"
    assert systemd.listen_fds({"LISTEN_PID": "junk", "LISTEN_FDS": "1"}) == []
    assert systemd.listen_fds({}) == []


def test_systemd_activated_sockets_none_without_activation():
    found = systemd.activated_sockets({})
    assert found.zmq_fd is None and found.attach is None


@pytest.mark.parametrize("env, expected", [
    ({"WATCHDOG_USEC": "200000"}, 0.1),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
    ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}, None),  # meant for another process
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({}, None),
])
def test_systemd_watchdog_interval(env, expected):
    assert systemd.watchdog_interval(env) == expected


async def test_systemd_watchdog_task_pings_from_the_loop(notify):
    with trio.move_on_after(0.35):
        await systemd.run_watchdog(0.1, {"NOTIFY_SOCKET": notify.path})
    notify.drain(0.5)
    assert 3 <= notify.messages.count("WATCHDOG=1") <= 5


# --- logging ---------------------------------------------------------------------------

# No journald socket, even on a host that has one: these tests read the stream transport.
NO_JOURNALD = {npud_log.SOCKET_ENV: "/nonexistent/journal.sock"}


def _journal_env(stream) -> dict[str, str]:
    st = os.fstat(stream.fileno())
    return {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}", **NO_JOURNALD}


def _log_through_setup(tmp_path, env_for) -> str:
    with npud_logging(tmp_path / "stderr", env_for) as logger:
        logger.debug("dbg")
        logger.info("hello")
        logger.warning("careful")
        logger.error("bad")
        logger.critical("worse")
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
        logger.log(25, "between info and warning")
    return (tmp_path / "stderr").read_text()


def test_systemd_log_journal_format(tmp_path):
    text = _log_through_setup(tmp_path, _journal_env)
    lines = text.splitlines()
    assert lines[:5] == ["<7>npud.test: dbg", "<6>npud.test: hello", "<4>npud.test: careful",
                         "<3>npud.test: bad", "<2>npud.test: worse"]
    assert all(re.match(r"<[0-7]>", line) for line in lines), "every line, tracebacks too, carries a priority"
    assert any("ValueError: boom" in line and line.startswith("<3>") for line in lines)
    assert lines[-1] == "<6>npud.test: between info and warning"
    assert not re.search(r"\d{4}-\d\d-\d\d", text), "no timestamp of our own under the journal"


def test_systemd_log_terminal_format_when_stderr_is_not_the_journal(tmp_path):
    # JOURNAL_STREAM inherited, but stderr redirected elsewhere: not the journal.
    text = _log_through_setup(tmp_path, lambda stream: {"JOURNAL_STREAM": "1:1"})
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ DEBUG npud.test: dbg", text)
    assert "<6>" not in text
    assert not npud_log.stream_is_journal(io.StringIO(), {"JOURNAL_STREAM": "1:1"})


def test_systemd_daemon_logs_for_the_journal(tmp_path, notify):
    """npud itself, with stderr on a 'journal stream': priorities, no timestamps."""
    stderr_path = tmp_path / "journal"
    with open(stderr_path, "w") as stderr:
        st = os.fstat(stderr.fileno())
        env = child_env(notify, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}", **NO_JOURNALD)
        process = subprocess.Popen([sys.executable, "-m", "npud.main", "--endpoint",
                                    f"ipc://{tmp_path}/j.sock", "--log-level", "info"],
                                   env=env, stderr=stderr)
        try:
            notify.wait_for("READY=1", process)
        finally:
            assert stop(process) == 0
    lines = stderr_path.read_text().splitlines()
    assert lines and all(re.match(r"<[0-7]>npud", line) for line in lines), lines
    assert any(line.startswith("<6>npud: npud ") and "serving" in line for line in lines)
