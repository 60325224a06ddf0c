"""Which devices may speak to the fleet: enrolled and not revoked, checked by every consumer of device messages.

The broker authenticates a device and binds its client id and topics to its identity; every fleet process
that consumes what devices send (ingest, the rollout controller, the distribution service) then checks,
per message, that the topic's device id equals the payload's and that :class:`DeviceRoster` admits the
device. The roster caches the ``devices`` table and reads it again every ``refresh_s`` seconds, and at
once when a device it does not know speaks (so a device enrolled a moment ago is admitted with its first
message); a name found unknown is looked up again at most once per ``miss_refresh_s``, and the table at
most every ``min_read_s``, so that unknown names (which the broker's authentication already limits to its
own users) cost a bounded number of queries. A revocation takes effect within ``refresh_s``; the broker
(dynamic security) disconnects the device at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from edgeml.fleet.store import schema
from edgeml.fleet.store.schema import sa

if TYPE_CHECKING:
    from edgeml.fleet.store.db import Database

__all__ = ["REVOKED", "UNKNOWN", "DeviceRoster"]

#: The reasons :meth:`DeviceRoster.refusal` gives.
REVOKED, UNKNOWN = "revoked", "unknown-device"


class DeviceRoster:
    """The enrolled devices and whether each is revoked, cached from the registry database.

    Args:
        db: The registry database (:class:`~edgeml.fleet.store.db.Database`).
        accept_unknown: Admit devices that are not enrolled (a development broker without enrollment);
            revoked devices are refused either way.
        refresh_s: Seconds between reads of the ``devices`` table.
        miss_refresh_s: Shortest time between two lookups of one name found unknown.
        min_read_s: Shortest time between two reads of the table.
        clock: Monotonic seconds.
    """

    def __init__(self, db: Database, *, accept_unknown: bool = False, refresh_s: float = 10.0,
                 miss_refresh_s: float = 1.0, min_read_s: float = 0.1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.db, self.accept_unknown = db, accept_unknown
        self.refresh_s, self.miss_refresh_s, self.min_read_s, self._clock = refresh_s, miss_refresh_s, min_read_s, clock
        self._lock = threading.Lock()
        self._revoked: dict[str, bool] = {}
        self._read_at = float("-inf")
        self._missed: dict[str, float] = {}  # unknown name -> when it was last looked up
        self.reads = 0  # table reads so far

    def refusal(self, device_id: str) -> str | None:
        """None when ``device_id`` may report, else why not (:data:`REVOKED` or :data:`UNKNOWN`).

        Raises:
            RegistryError: The database failed while the cache had to be read.
        """
        return self.refusals((device_id,)).get(device_id)

    def refusals(self, device_ids: Iterable[str], *, enrolled_only: bool = False) -> dict[str, str]:
        """The devices among ``device_ids`` that may not report, each with why (one read at most).

        Args:
            device_ids: The devices to check.
            enrolled_only: Refuse devices that are not enrolled even with ``accept_unknown`` (for what needs a
                device's row, such as its state).
        """
        names = set(device_ids)
        with self._lock:
            now = self._clock()
            unknown = names - self._revoked.keys()
            new = any(now - self._missed.get(name, float("-inf")) > self.miss_refresh_s for name in unknown)
            if now - self._read_at > self.refresh_s or (new and now - self._read_at > self.min_read_s):
                self._revoked, self._read_at = self._read(), now
                self.reads += 1
                if len(self._missed) > 100_000:  # bounded: forget old misses (they are looked up again)
                    self._missed.clear()
                self._missed.update(dict.fromkeys(names - self._revoked.keys(), now))
            revoked = self._revoked
        out = {}
        for name in names:
            state = revoked.get(name)
            if state:
                out[name] = REVOKED
            elif state is None and (enrolled_only or not self.accept_unknown):
                out[name] = UNKNOWN
        return out

    def _read(self) -> dict[str, bool]:
        d = schema.devices
        with self.db.transaction() as conn:
            return {name: bool(revoked) for name, revoked in conn.execute(sa.select(d.c.device_id,
                                                                                             d.c.revoked))}
