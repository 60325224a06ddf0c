"""The device roster every consumer of device messages checks: enrolled, not revoked, read sparingly."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeml.fleet.devices.roster import REVOKED, UNKNOWN, DeviceRoster
from edgeml.fleet.store.db import Database


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def db(tmp_path: Path) -> Database:
    database = Database(f"sqlite:///{tmp_path / 'fleet.db'}")
    database.create()
    return database


def _enroll(db: Database, name: str, revoked: bool = False) -> None:
    with db.transaction() as conn:
        conn.execute(db.tables["devices"].insert().values(device_id=name, revoked=revoked))


def test_enrolled_revoked_and_unknown(db: Database) -> None:
    _enroll(db, "cam-1")
    _enroll(db, "cam-2", revoked=True)
    roster = DeviceRoster(db)
    assert roster.refusals(["cam-1", "cam-2", "cam-3"]) == {"cam-2": REVOKED, "cam-3": UNKNOWN}
    assert DeviceRoster(db, accept_unknown=True).refusals(["cam-2", "cam-3"]) == {"cam-2": REVOKED}
    assert DeviceRoster(db, accept_unknown=True).refusals(["cam-3"], enrolled_only=True) == {"cam-3": UNKNOWN}


def test_a_device_enrolled_a_moment_ago_is_admitted_with_its_first_message(db: Database) -> None:
    clock = Clock()
    roster = DeviceRoster(db, clock=clock)
    _enroll(db, "cam-1")
    assert roster.refusal("cam-1") is None
    clock.now += 0.2  # well within the 10 s refresh: a new name still triggers a read
    _enroll(db, "cam-2")
    assert roster.refusal("cam-2") is None
    assert roster.reads == 2


def test_unknown_names_cost_a_bounded_number_of_reads(db: Database) -> None:
    clock = Clock()
    roster = DeviceRoster(db, clock=clock)
    for _ in range(1000):  # the same unknown name, over and over, within a second
        clock.now += 0.0005
        assert roster.refusal("ghost") == UNKNOWN
    assert roster.reads == 1
    for i in range(100):  # many new names, 10 ms apart: at most one read per min_read_s
        clock.now += 0.01
        roster.refusal(f"ghost-{i}")
    assert roster.reads <= 1 + 11


def test_revocation_takes_effect_within_the_refresh(db: Database) -> None:
    clock = Clock()
    _enroll(db, "cam-1")
    roster = DeviceRoster(db, clock=clock, refresh_s=10.0)
    assert roster.refusal("cam-1") is None
    with db.transaction() as conn:
        conn.execute(db.tables["devices"].update().values(revoked=True))
    clock.now += 10.5
    assert roster.refusal("cam-1") == REVOKED
