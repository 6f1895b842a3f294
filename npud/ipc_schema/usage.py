"""Utilisation: the one definition the daemon and npuctl share.

Like nvidia-smi's ``utilization.gpu``, a device's utilisation over an interval
is the time its cores spent executing jobs divided by the interval's wall time
times its number of cores::

    util_pct = 100 * busy_core_seconds / (wall_seconds * cores)

so it is at most 100 % per device whatever runs on it.  A client's utilisation
of a device is the same quotient over its own jobs' busy time on that device:
the clients' shares of a device add up to (at most) the device's.  A client
using several devices shows the sum of its per-device shares (up to 100 % per
device), like top's CPU %.
"""

from __future__ import annotations


def util_pct(busy_s: float, wall_s: float, cores: int = 1) -> float:
    """Percent of ``wall_s`` x ``cores`` core-seconds that ``busy_s`` core-seconds are, in [0, 100].

    An empty interval (``wall_s`` under a microsecond) is 0 %; the clamp only absorbs clock
    granularity (samples taken a few microseconds apart), never a wrong definition.
    """
    if wall_s <= 1e-6:
        return 0.0
    return max(0.0, min(100.0, 100.0 * busy_s / (wall_s * max(1, cores))))
