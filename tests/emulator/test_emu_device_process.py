"""The device process's side of its socket to the daemon."""

from __future__ import annotations

import socket

import msgpack
import pytest

from npud.emulator.config import make_config
from npud.emulator.device_process import DeviceProcess


def test_a_run_stops_at_the_next_boundary_once_the_daemon_is_gone():
    """EOF is not "not preempted": nobody will read the run's result, so the process exits."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    device = DeviceProcess(theirs, make_config("edge"))
    try:
        assert device.preempted() is False                 # the daemon is there, no preempt
        ours.send(msgpack.packb({"op": "preempt"}))
        assert device.preempted() is True
        ours.close()
        with pytest.raises(SystemExit, match="closed the device socket"):
            device.preempted()
    finally:
        theirs.close()
