"""Logging that suits a terminal, a log shipper and the journal.

Two formats (``log_format`` in the config, ``npud --log-format``):

* ``text`` (the default).  On a terminal or in a file: a timestamp, the level
  name, the logger and the message.  Under systemd, when stderr is the journal
  stream (``$JOURNAL_STREAM`` names the device and inode of our stderr, see
  systemd.exec(5)), npud upgrades to the journal's native protocol, as
  systemd's docs/JOURNAL_NATIVE_PROTOCOL.md recommends for programs that log to
  stderr: one datagram per record to ``/run/systemd/journal/socket`` with
  ``MESSAGE``, ``PRIORITY``, ``CODE_FILE``/``CODE_LINE``/``CODE_FUNC``,
  ``NPUD_LOGGER`` and a ``NPUD_<KEY>`` field per context value (a record's
  ``extra``), so ``journalctl NPUD_DEVICE=0`` finds one device's lines.  The
  ``<N>`` prefixes of the stream transport carry only the priority; they remain
  the fallback when the socket is missing or a datagram cannot be sent (full,
  or too large), and carry no timestamp of our own: the journal records it.
  (A child whose stderr was redirected, although it inherited
  ``$JOURNAL_STREAM``, logs as on a terminal.)
* ``json``: one JSON object per line with the stable keys ``ts`` (UTC, ISO
  8601), ``level``, ``logger`` and ``msg``, then the record's context values,
  then ``exc`` (a traceback) if there is one.  On the journal stream each line
  starts with its ``<N>`` priority, which journald strips, so ``journalctl -p``
  still filters and the stored message is the JSON object.

Context values are passed as ``log.info("...", extra={"device": 0})``; their
keys are lower-case identifiers.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import struct
import sys
import time
from collections.abc import Mapping
from typing import TextIO

LOG_FORMATS = ("text", "json")
JOURNAL_SOCKET = "/run/systemd/journal/socket"
SOCKET_ENV = "NPUD_JOURNAL_SOCKET"   # another journal socket (tests; a journald in a container)

# syslog(3) priorities: LOG_CRIT 2, LOG_ERR 3, LOG_WARNING 4, LOG_NOTICE 5, LOG_INFO 6, LOG_DEBUG 7
_SYSLOG_PRIORITY = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))
# What every LogRecord has: anything else on a record came from `extra` and is context.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}
_FIELD_NAME = re.compile(r"[A-Z0-9_]+")


def syslog_priority(levelno: int) -> int:
    """The syslog priority of a logging level (custom levels round down to the next named one)."""
    for threshold, priority in _SYSLOG_PRIORITY:
        if levelno >= threshold:
            return priority
    return 7


def context(record: logging.LogRecord) -> dict:
    """The record's context values: what the call passed in ``extra``."""
    return {key: value for key, value in vars(record).items() if key not in _RECORD_ATTRS}


class JournalFormatter(logging.Formatter):
    """``<priority>logger: message``; every line of a multi-line record (a traceback) is prefixed."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (a traceback is the ``exc`` string, newlines escaped)."""

    def __init__(self, priority_prefix: bool = False):
        super().__init__()
        self.priority_prefix = priority_prefix

    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": _iso_utc(record.created), "level": record.levelname.lower(), "logger": record.name,
                 "msg": record.getMessage()}
        for key, value in context(record).items():
            entry.setdefault(key, value)   # a context value never replaces a stable key
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # ASCII (other characters as \u escapes): a line any stderr encoding can carry, and still JSON.
        line = json.dumps(entry, default=str)
        return f"<{syslog_priority(record.levelno)}>{line}" if self.priority_prefix else line


def _iso_utc(created: float) -> str:
    """``2026-12-05T08:15:22.123Z``: sortable, and unambiguous across time zones."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z"


def journal_entry(record: logging.LogRecord, message: str) -> bytes:
    """One record in the journal's native format: ``KEY=value`` lines, or for a value holding a
    newline, ``KEY``, a newline, its length (64-bit little-endian), the value and a newline."""
    fields = {"MESSAGE": message, "PRIORITY": str(syslog_priority(record.levelno)), "SYSLOG_IDENTIFIER": "npud",
              "CODE_FILE": record.pathname, "CODE_LINE": str(record.lineno), "CODE_FUNC": record.funcName,
              "NPUD_LOGGER": record.name}
    for key, value in context(record).items():
        name = "NPUD_" + key.upper()
        if _FIELD_NAME.fullmatch(name):   # a field name is A-Z, 0-9 and _; anything else is left out
            fields.setdefault(name, str(value))
    out = bytearray()
    for name, value in fields.items():
        if value is None:   # a record made by hand has no function name
            continue
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            out += name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += name.encode() + b"=" + data + b"\n"
    return bytes(out)


class JournalHandler(logging.Handler):
    """Each record as one datagram to journald; through ``fallback`` (the stream, with ``<N>``
    prefixes) when it cannot be sent now.  Never blocks: a full journal socket is a fallback."""

    def __init__(self, path: str, fallback: logging.Handler):
        super().__init__()
        self.fallback = fallback
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            self.sock.connect(path)
        except OSError:
            self.sock.close()
            raise

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.sock.send(journal_entry(record, self.format(record)), socket.MSG_DONTWAIT)
        except OSError:   # EAGAIN (journald is behind), EMSGSIZE, ECONNREFUSED (journald restarting)
            self.fallback.handle(record)
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        self.sock.close()
        self.fallback.close()
        super().close()


def stream_is_journal(stream: TextIO, env: Mapping[str, str]) -> bool:
    """Whether ``stream`` is the journal stream systemd connected (``$JOURNAL_STREAM`` is ``dev:ino``)."""
    value = env.get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(part) for part in value.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (device, inode)


def make_handler(fmt: str, env: Mapping[str, str], stream: TextIO) -> logging.Handler:
    """The handler for ``fmt`` (one of LOG_FORMATS) writing to ``stream``, or to the journal (see above)."""
    handler = logging.StreamHandler(stream)
    journal = stream_is_journal(stream, env)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(priority_prefix=journal))
        return handler
    if not journal:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        return handler
    handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    try:
        native = JournalHandler(env.get(SOCKET_ENV) or JOURNAL_SOCKET, fallback=handler)
    except OSError:   # no journald socket here (a container, or a test): the stream carries priorities
        return handler
    native.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    return native


def setup(level: str, env: Mapping[str, str] | None = None, stream: TextIO | None = None,
          fmt: str = "text") -> None:
    """Send every logger's records at ``level`` and above to stderr (or ``stream``) in ``fmt``."""
    env = os.environ if env is None else env
    stream = sys.stderr if stream is None else stream
    root = logging.getLogger()
    root.handlers[:] = [make_handler(fmt, env, stream)]
    root.setLevel(level.upper())
