"""npud/log.py: `--log-format json`, and the journal's native protocol (structured fields) under systemd."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import struct
import subprocess
import sys

import pytest

from npud import log as npud_log
from npud.config import ConfigError, from_dict
from systemd_harness import Notifications, child_env, npud_logging, stop

ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


class Journal:
    """A stand-in for journald's native socket: records every datagram, parsed into fields."""

    def __init__(self, path: str):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)

    def entries(self, wait: float = 0.0) -> list[dict[str, str]]:
        out = []
        self.sock.settimeout(wait)   # the first datagram may take this long; the rest are there already
        try:
            while True:
                out.append(parse_native(self.sock.recv(1 << 20)))
                self.sock.setblocking(False)
        except (BlockingIOError, socket.timeout):
            return out

    def close(self) -> None:
        self.sock.close()


def parse_native(data: bytes) -> dict[str, str]:
    """The journal's native format (systemd docs/JOURNAL_NATIVE_PROTOCOL.md), both serializations."""
    fields, i = {}, 0
    while i < len(data):
        end = data.index(b"\n", i)
        line = data[i:end]
        if b"=" in line:
            name, value = line.split(b"=", 1)
            i = end + 1
        else:
            name, (size,) = line, struct.unpack_from("<Q", data, end + 1)
            value = data[end + 9:end + 9 + size]
            assert data[end + 9 + size:end + 10 + size] == b"\n"
            i = end + 10 + size
        fields[name.decode()] = value.decode()
    return fields


@pytest.fixture
def journal(tmp_path):
    j = Journal(str(tmp_path / "journal.sock"))
    yield j
    j.close()


def journal_env(stream, socket_path: str) -> dict[str, str]:
    st = os.fstat(stream.fileno())
    return {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}", npud_log.SOCKET_ENV: socket_path}


def log_some(tmp_path, fmt: str, env_for) -> str:
    """Log a few records through npud's ``setup``; what reached the stream."""
    with npud_logging(tmp_path / "stderr", env_for, fmt) as logger:
        logger.info("hello %s", "world", extra={"device": 1, "session": "s-1"})
        logger.warning("careful")
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed", extra={"msg_id": 7})
        logger.info("naïve %s", "café", extra={"path": tmp_path})   # not ASCII; a value JSON cannot hold
    return (tmp_path / "stderr").read_text()


def test_json_lines_have_stable_keys_then_context(tmp_path):
    lines = log_some(tmp_path, "json", lambda stream: {}).splitlines()
    entries = [json.loads(line) for line in lines]      # one object per line, tracebacks included
    assert len(entries) == 4 and all(line.isascii() for line in lines)
    assert entries[3]["msg"] == "naïve café" and entries[3]["path"] == str(tmp_path)
    first = entries[0]
    assert list(first)[:4] == ["ts", "level", "logger", "msg"] and ISO_UTC.fullmatch(first["ts"])
    assert first == {**first, "level": "info", "logger": "npud.test", "msg": "hello world", "device": 1,
                     "session": "s-1"}
    assert entries[1]["level"] == "warning" and "device" not in entries[1]
    assert entries[2]["level"] == "error" and entries[2]["msg_id"] == 7
    assert "ValueError: boom" in entries[2]["exc"] and entries[2]["exc"].startswith("Traceback")


def test_json_lines_on_the_journal_stream_carry_their_priority(tmp_path):
    text = log_some(tmp_path, "json", lambda stream: journal_env(stream, str(tmp_path / "no-journald")))
    lines = text.splitlines()
    assert [line[:3] for line in lines] == ["<6>", "<4>", "<3>", "<6>"]
    assert json.loads(lines[0][3:])["msg"] == "hello world"


def test_text_under_the_journal_uses_the_native_protocol_with_fields(tmp_path, journal):
    text = log_some(tmp_path, "text", lambda stream: journal_env(stream, journal.path))
    assert text == ""                                   # nothing on the stream: every record was sent
    hello, careful, failed, naive = journal.entries(wait=5.0)
    assert naive["MESSAGE"] == "npud.test: naïve café" and naive["NPUD_PATH"] == str(tmp_path)
    assert hello["MESSAGE"] == "npud.test: hello world" and hello["PRIORITY"] == "6"
    assert hello["NPUD_LOGGER"] == "npud.test" and hello["SYSLOG_IDENTIFIER"] == "npud"
    assert hello["NPUD_DEVICE"] == "1" and hello["NPUD_SESSION"] == "s-1"
    assert hello["CODE_FILE"] == __file__ and hello["CODE_FUNC"] == "log_some" and int(hello["CODE_LINE"]) > 0
    assert careful["PRIORITY"] == "4" and "NPUD_DEVICE" not in careful
    # A traceback stays in its record (one entry, a multi-line MESSAGE in the binary-safe form).
    assert failed["PRIORITY"] == "3" and failed["NPUD_MSG_ID"] == "7"
    assert failed["MESSAGE"].startswith("npud.test: failed\nTraceback") and "ValueError: boom" in failed["MESSAGE"]


def test_text_under_the_journal_falls_back_to_priority_prefixes(tmp_path, journal):
    # No journald socket: the stream transport's <N> prefixes, as before.
    text = log_some(tmp_path, "text", lambda stream: journal_env(stream, str(tmp_path / "missing")))
    assert text.splitlines()[:2] == ["<6>npud.test: hello world", "<4>npud.test: careful"]
    # A socket that stops answering (journald restarting): the records still reach the stream.
    journal.close()
    text = log_some(tmp_path, "text", lambda stream: journal_env(stream, journal.path))
    assert text.splitlines()[:2] == ["<6>npud.test: hello world", "<4>npud.test: careful"]


def test_journal_entry_refuses_field_names_the_journal_would_not_take():
    record = logging.LogRecord("npud.x", logging.INFO, __file__, 1, "m", (), None)
    record.__dict__.update({"ok_key": 1, "bad-key": 2, "mixedCase": 3})
    fields = parse_native(npud_log.journal_entry(record, "m"))
    assert fields["NPUD_OK_KEY"] == "1" and "NPUD_MIXEDCASE" in fields
    assert not any("-" in name for name in fields)


@pytest.mark.parametrize("value", ["xml", "JSON", 1, ""])
def test_config_log_format_refuses_bad_values(value):
    with pytest.raises(ConfigError, match=r"log_format: expected one of text, json"):
        from_dict({"log_format": value})
    assert from_dict({"log_format": "json"}).log_format == "json"
    assert from_dict({}).log_format == "text"


def test_npud_refuses_an_unknown_log_format():
    result = subprocess.run([sys.executable, "-m", "npud.main", "--log-format", "xml"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and "--log-format" in result.stderr and "json" in result.stderr


@pytest.fixture
def notify(tmp_path):
    n = Notifications(str(tmp_path / "notify"))
    yield n
    n.close()


def run_npud(tmp_path, notify, stderr, *args, **env) -> None:
    """npud from start to READY=1 to a clean stop, its stderr to ``stderr``."""
    process = subprocess.Popen([sys.executable, "-m", "npud.main", "--endpoint", f"ipc://{tmp_path}/d.sock",
                                "--log-level", "info", *args], env=child_env(notify, **env), stderr=stderr)
    try:
        notify.wait_for("READY=1", process)
    finally:
        assert stop(process) == 0


def test_npud_log_format_json(tmp_path, notify):
    with open(tmp_path / "stderr", "w") as stderr:
        run_npud(tmp_path, notify, stderr, "--log-format", "json")
    entries = [json.loads(line) for line in (tmp_path / "stderr").read_text().splitlines()]
    assert entries and all(list(e)[:4] == ["ts", "level", "logger", "msg"] for e in entries)
    started = [e for e in entries if "started as pid" in e["msg"]]
    assert started and started[0]["device"] == 0 and started[0]["core"] == 0
    assert any(e["logger"] == "npud" and "serving" in e["msg"] for e in entries)


def test_npud_under_the_journal_sends_structured_fields(tmp_path, notify, journal):
    with open(tmp_path / "stderr", "w") as stderr:
        st = os.fstat(stderr.fileno())
        run_npud(tmp_path, notify, stderr, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}",
                 **{npud_log.SOCKET_ENV: journal.path})
    assert (tmp_path / "stderr").read_text() == ""
    entries = journal.entries(wait=5.0)
    assert any(e["NPUD_LOGGER"] == "npud" and "serving" in e["MESSAGE"] and e["PRIORITY"] == "6" for e in entries)
    assert any(e.get("NPUD_DEVICE") == "0" and e["NPUD_LOGGER"] == "npud.device" for e in entries)
