"""Facts and signals of the host the agent runs on: clock synchronisation and systemd notifications.

A Raspberry Pi has no real-time clock: until NTP has set the time, TUF expiry checks are meaningless, so
the agent keeps serving, defers updates and reports "clock unsynced" (:func:`clock_synced`). Under
systemd (``Type=notify`` with ``WatchdogSec=``) the agent says READY once serving and pets the watchdog
(:class:`SystemdNotifier`); elsewhere both are no-ops.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import socket
from pathlib import Path

__all__ = ["SystemdNotifier", "clock_synced"]

_TIMESYNCD_FLAG = Path("/run/systemd/timesync/synchronized")
_STA_UNSYNC = 0x0040
_TIME_ERROR = 5


class _Timex(ctypes.Structure):
    # struct timex from <sys/timex.h> (Linux): 25 longs/ints then padding; we only read status and the
    # return value, so the layout below covers the fields up to and past 'status' with room to spare.
    _fields_ = [("modes", ctypes.c_uint), ("offset", ctypes.c_long), ("freq", ctypes.c_long),
                ("maxerror", ctypes.c_long), ("esterror", ctypes.c_long), ("status", ctypes.c_int),
                ("rest", ctypes.c_long * 40)]


def _kernel_synced() -> bool | None:
    """The kernel's NTP status via adjtimex(2) (read-only call); None when it cannot be asked."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        tx = _Timex()
        state = libc.adjtimex(ctypes.byref(tx))
    except (OSError, AttributeError):
        return None
    if state < 0:
        return None
    return state != _TIME_ERROR and not tx.status & _STA_UNSYNC


def clock_synced(mode: str = "auto") -> bool:
    """Whether the system clock is synchronised (``mode="assume-synced"`` always says yes).

    In ``auto`` mode: systemd-timesyncd's flag file, else the kernel's NTP status (set by chrony, ntpd or
    timesyncd alike).
    """
    if mode == "assume-synced":
        return True
    if _TIMESYNCD_FLAG.exists():
        return True
    return bool(_kernel_synced())


class SystemdNotifier:
    """sd_notify(3) without libsystemd: datagrams to ``$NOTIFY_SOCKET`` (no-op when it is not set)."""

    def __init__(self) -> None:
        address = os.environ.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        usec = os.environ.get("WATCHDOG_USEC", "")
        #: How often to pet the watchdog (half its timeout), or None without one.
        self.watchdog_interval_s = int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 else None

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def notify(self, state: str) -> bool:
        """Send ``state`` (e.g. ``"READY=1"``, ``"WATCHDOG=1"``, ``"STATUS=..."``); False when not sent."""
        if not self.address:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(state.encode(), self.address)
        except OSError:
            return False
        return True
