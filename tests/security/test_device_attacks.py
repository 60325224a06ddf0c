"""What one enrolled device can try against the fleet, and that an honest device loses nothing meanwhile.

Each test is an attack with the attacker device's real credentials against a real fleet (see conftest):
the attack must be refused, and the honest devices' telemetry must be stored exactly once and
acknowledged, their commands delivered, and rollouts to them must complete. The threat table in
docs/security.md names these tests.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest

from edgeml.fleet.devices.broker_control import BrokerControl
from edgeml.protocol import State, Telemetry, UpdateEvent, device_topic, fleet_client_id
from tests.security.conftest import ATTACKER, HONEST, STOLEN, WAIT, Deployment


def honest_telemetry_complete(d: Deployment, device: str = HONEST[0], timeout: float = 60.0) -> int:
    """Wait until every entry the honest device appended so far was acknowledged; check the store holds each
    exactly once with no gap. Returns how many there are."""
    outbox = d.agents[device].telemetry.outbox
    mark = outbox.next_seq
    deadline = time.monotonic() + timeout
    while outbox.acked < mark - 1:
        assert time.monotonic() < deadline, f"{device}: acknowledged {outbox.acked} of {mark - 1}"
        time.sleep(0.1)
    seqs = d.telemetry_seqs(device)
    assert len(seqs) == len(set(seqs)), "a telemetry entry was stored twice"
    assert seqs[:mark] == list(range(mark)), "a telemetry entry is missing"
    assert outbox.dropped == 0
    return mark


def ping(d: Deployment, device: str = HONEST[0]) -> None:
    """A command to the honest device arrives: its pong is seen."""
    watcher = d.observer(device_topic(device, "events"))
    command_id = d.command(device, "ping")
    watcher.wait(lambda: any(json.loads(m.payload).get("id") == command_id for m in watcher.messages),
                 what=f"{device}'s pong")
    watcher.close()


# --- identity -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("client_id", [HONEST[0], "edgeml.rollouts", fleet_client_id("ingest"),
                                       fleet_client_id("dist"), "fleet", ""])
def test_a_device_cannot_take_another_client_id(deployment: Deployment, client_id: str) -> None:
    """Connecting with a victim's client id would drop the victim and wipe its session: refused."""
    watcher = deployment.observer(device_topic(HONEST[0], "state"))
    for _ in range(3):
        probe = deployment.probe(ATTACKER, client_id=client_id)
        rc = probe.connect()
        assert rc.is_failure and rc.value == 0x87, rc  # not authorized
        probe.close()
    time.sleep(1.0)
    offline = [m for m in watcher.messages if json.loads(m.payload or b"{}").get("status") == "offline"]
    assert offline == []  # the victim's connection never dropped (its last will would say offline)
    ping(deployment)
    honest_telemetry_complete(deployment)


@pytest.mark.parametrize(("user", "password"), [("nobody", "x"), (HONEST[0], "guess"), ("fleet", "guess"),
                                                ("fleet-admin", "guess")])
def test_unknown_users_and_wrong_passwords_are_refused(deployment: Deployment, user: str, password: str) -> None:
    probe = deployment.probe(user, client_id=user if user not in ("fleet", "fleet-admin") else "x.y",
                             password=password)
    rc = probe.connect()
    assert rc.is_failure and rc.value in (0x86, 0x87), rc


# --- subscriptions --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("topic", [
    "$share/ingest/edgeml/v1/devices/+/telemetry",  # the ingest workers' group: would take a share of every device's
    "$share/edgeml-dist/edgeml/v1/devices/+/requests",  # the distribution services' group
    "$share/ingest/edgeml/v1/devices/+/state",
    "#", "edgeml/v1/#", "edgeml/v1/devices/+/telemetry", f"edgeml/v1/devices/{HONEST[0]}/commands",
    f"edgeml/v1/devices/{HONEST[0]}/replies", "$SYS/#", "$CONTROL/dynamic-security/#",
])
def test_a_device_cannot_subscribe_beyond_its_own_topics(deployment: Deployment, topic: str) -> None:
    attacker = deployment.attacker()
    assert attacker.subscribe(topic).value == 0x87, topic  # the broker refuses the subscription itself
    assert not attacker.subscribe(device_topic(ATTACKER, "commands")).is_failure  # its own are fine


def test_telemetry_and_downloads_are_not_swallowed_by_an_intruder_in_the_share_groups(deployment: Deployment) -> None:
    intruder = deployment.attacker()  # one connection: its client id is bound to it, a second would replace it
    for group in ("$share/ingest/edgeml/v1/devices/+/telemetry", "$share/edgeml-dist/edgeml/v1/devices/+/requests",
                  "$share/ingest/edgeml/v1/devices/+/state"):
        assert intruder.subscribe(group).value == 0x87
    before = honest_telemetry_complete(deployment)
    time.sleep(2.0)  # several telemetry reports of both honest devices meanwhile
    for device in HONEST:
        assert honest_telemetry_complete(deployment, device) >= (before if device == HONEST[0] else 1)
    version, _, status = deployment.rollout()  # downloads by get requests and broadcast
    assert status.state == "completed", status
    assert {a.status()["version"] for a in deployment.agents.values()} == {version}
    assert not intruder.messages


# --- forged and poison messages -------------------------------------------------------------------------------


def test_a_state_naming_another_device_changes_nothing(deployment: Deployment) -> None:
    attacker = deployment.attacker()
    before = deployment.device_row(HONEST[0])
    forged = State(HONEST[0], "serving", model="tiny", version="9.9.9", slot="a",
                   capabilities={"runtimes": {"onnxruntime": "0.0.1"}, "arch": "forged"}, clock_synced=True)
    assert attacker.publish(device_topic(ATTACKER, "state"), forged.to_bytes(), retain=True) == 0
    attacker.publish(device_topic(ATTACKER, "state"), forged.to_bytes())
    time.sleep(2.0)  # several controller ticks and ingest batches
    after = deployment.device_row(HONEST[0])
    assert (after["installed"], after["capabilities"]) == (before["installed"], before["capabilities"])
    assert deployment.device_row(ATTACKER)["installed"] in (None, {})  # nor is it recorded as the attacker's
    devices = {row["device_id"]: row for row in deployment.http_json("/api/devices")}
    assert "9.9.9" not in json.dumps(devices[HONEST[0]])
    version, _, status = deployment.rollout()  # planned from the true data
    assert status.state == "completed", status


def _telemetry(**fields: Any) -> bytes:
    doc = {"schema": "edgeml.telemetry/1", "device_id": ATTACKER, "seq": 1, "sent_at": 1.7e9, "metrics": {}}
    return json.dumps({**doc, **fields}).encode()


POISON = [
    ("seq 2^63", _telemetry(seq=2**63)),
    ("seq 2^64", _telemetry(seq=2**64)),
    ("negative seq", _telemetry(seq=-1)),
    ("infinite metric", _telemetry(metrics={"x": 1}).replace(b'"x": 1', b'"x": 1e999')),
    ("NaN metric", _telemetry(metrics={"x": 1}).replace(b'"x": 1', b'"x": NaN')),
    ("huge integer metric", _telemetry(metrics={"x": 10**400})),
    ("NUL in a string", _telemetry(metrics={"x": "a\u0000b"})),
    ("lone surrogate", _telemetry(metrics={"x": 1}).replace(b'"x": 1', b'"x": "\\udc00"')),
    ("deep nesting", _telemetry(metrics={"x": 1}).replace(b'"x": 1', b'"x": ' + b"[" * 5000 + b"]" * 5000)),
    ("another device's id", _telemetry(device_id=HONEST[0], seq=10**6)),
    ("too large", _telemetry(metrics={"pad": "x" * 70_000})),
    ("not JSON", b"\xff\xfe garbage"),
]


def test_poison_telemetry_is_refused_and_storage_goes_on(deployment: Deployment) -> None:
    attacker = deployment.attacker()
    for _ in range(3):
        for _name, payload in POISON:
            attacker.publish(device_topic(ATTACKER, "telemetry"), payload)
    good = Telemetry(ATTACKER, 0, 1.7e9, {"fps": 30.0})
    assert attacker.publish(device_topic(ATTACKER, "telemetry"), good.to_bytes()) == 0  # its own, valid: stored
    deadline = time.monotonic() + WAIT
    while deployment.telemetry_seqs(ATTACKER) != [0]:
        assert time.monotonic() < deadline, deployment.telemetry_seqs(ATTACKER)
        time.sleep(0.1)
    assert 10**6 not in deployment.telemetry_seqs(HONEST[0])
    honest_telemetry_complete(deployment)
    rows = deployment.http_json(f"/api/devices/{ATTACKER}/telemetry?limit=50")  # strict JSON: no NaN or Infinity
    assert [r["seq"] for r in rows] == [0]
    deployment.http_json(f"/api/devices/{HONEST[0]}/telemetry?limit=50")
    deployment.http_json("/api/telemetry?metric=latency_p99_ms&by=device")
    deployment.http_json("/api/devices")


# --- events -------------------------------------------------------------------------------------------------


def _event(**fields: Any) -> bytes:
    doc = {"schema": "edgeml.event/1", "type": "update", "device_id": ATTACKER, "at": 1.7e9, "model": "tiny",
           "version": "9.0.0", "target": "onnx", "state": "committed", "rollout": "r-x", "id": "c-x"}
    return json.dumps({**doc, **fields}).encode()


def test_hostile_events_do_not_stall_rollouts(deployment: Deployment) -> None:
    attacker = deployment.attacker()
    _, quiet_s, status = deployment.rollout()
    assert status.state == "completed", status
    hostile = [b'{"a":' * 3000 + b"1" + b"}" * 3000,  # nested past the recursion limit, inside 16 KiB
               b"[" * 16000,
               _event(reason="x" * 900_000),  # under the broker's limit, over the fleet's
               _event(device_id=HONEST[0]),  # a result in another device's name
               _event(cause="p99 latency was bad"), _event(state="exploded"), _event(type="gossip"),
               _event(at=float("1e300")), b"null", b"{}"]
    stop = time.monotonic() + 60.0
    flood_sent = 0

    def flood() -> None:
        nonlocal flood_sent
        while time.monotonic() < stop and not done:
            for payload in hostile:
                attacker.client.publish(device_topic(ATTACKER, "events"), payload, qos=0)
                flood_sent += 1
            time.sleep(0.005)

    done = False
    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    try:
        rid_version, attacked_s, status = deployment.rollout()
    finally:
        done = True
        thread.join()
    assert status.state == "completed", status
    assert {a.status()["version"] for a in deployment.agents.values()} == {rid_version}
    assert flood_sent > 500
    # the rollout went as it does without the attack (not a timing benchmark: a wide liveness bound)
    assert attacked_s < quiet_s * 3 + 20, (quiet_s, attacked_s)
    ping(deployment)
    honest_telemetry_complete(deployment)


def test_an_oversized_message_costs_only_the_sender_its_connection(deployment: Deployment) -> None:
    attacker = deployment.attacker()
    attacker.client.publish(device_topic(ATTACKER, "events"), b"x" * (2 * 1024 * 1024), qos=1)
    attacker.wait(lambda: attacker.disconnects, what="the broker dropping the attacker")
    ping(deployment)
    honest_telemetry_complete(deployment)


# --- requests -----------------------------------------------------------------------------------------------


def _get(reply_to: str, path: str = "metadata/timestamp.json", cid: str = "c1") -> bytes:
    return json.dumps({"schema": "edgeml.request/1", "correlation_id": cid, "reply_to": reply_to, "method": "get",
                       "params": {"path": path, "offset": 0, "length": 4096}}).encode()


def test_requests_cannot_aim_replies_at_another_device_or_flood_the_service(deployment: Deployment) -> None:
    attacker = deployment.attacker()
    victim = deployment.observer(device_topic(HONEST[0], "replies"))
    for i in range(50):
        attacker.client.publish(device_topic(ATTACKER, "requests"), _get(device_topic(HONEST[0], "replies"),
                                                                          cid=f"x{i}"), qos=1)
    assert not attacker.subscribe(device_topic(ATTACKER, "replies")).is_failure
    flood = 8000  # far more than the per-device rate (400/s, bursts of 800) of each distribution service
    for i in range(flood):
        attacker.client.publish(device_topic(ATTACKER, "requests"), _get(device_topic(ATTACKER, "replies"),
                                                                          path="targets/../../etc/passwd",
                                                                          cid=f"f{i}"), qos=0)
    version, _, status = deployment.rollout()
    assert status.state == "completed", status
    assert not [m for m in victim.messages if b'"x' in m.payload]  # no reply was aimed at the honest device
    replies = [json.loads(m.payload) for m in attacker.messages]
    assert all(not r["ok"] for r in replies)  # the traversal is refused
    assert len(replies) < 0.8 * flood  # and the flood was cut by the rate limit


# --- revocation ---------------------------------------------------------------------------------------------


def test_a_revoked_device_is_cut_off_and_ignored(deployment: Deployment) -> None:
    from edgeml.fleet.devices.enrollment import revoke

    stolen = deployment.probe(STOLEN)
    stolen.client.will_set(device_topic(STOLEN, "state"), State(STOLEN, "offline").to_bytes(), qos=1, retain=True)
    assert not stolen.connect().is_failure
    assert stolen.publish(device_topic(STOLEN, "state"), State(STOLEN, "idle").to_bytes(), retain=True) == 0
    deadline = time.monotonic() + WAIT
    while deployment.device_row(STOLEN)["status"] != "idle":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    control = BrokerControl.from_broker_dir(deployment.broker_dir, host="localhost", port=deployment.port)
    revoke(deployment.registry.dir, STOLEN, deployment.broker_dir, control=control, db_url=deployment.db_url)
    stolen.wait(lambda: stolen.disconnects, what="the broker kicking the revoked device")
    assert stolen.disconnects[0].value == 0x98  # administrative action
    again = deployment.probe(STOLEN)
    assert again.connect().value == 0x87
    # its last will (published by the broker as it was kicked, before any consumer's cache knew) and a later
    # replay of its state are not recorded: the store checks the revocation in the same statement
    replay = deployment.probe("fleet", client_id=fleet_client_id("test-replay"))
    assert not replay.connect().is_failure
    replay.publish(device_topic(STOLEN, "state"), State(STOLEN, "serving", model="tiny", version="6.6.6").to_bytes())
    time.sleep(2.5)
    row = deployment.device_row(STOLEN)
    assert row["revoked"] and row["status"] == "idle" and row["installed"] in (None, {})
    time.sleep(8.0)  # the consumers' caches refresh (10 s): its telemetry is refused too
    replay.publish(device_topic(STOLEN, "telemetry"), Telemetry(STOLEN, 5, 1.7e9, {}).to_bytes())
    time.sleep(1.5)
    assert deployment.telemetry_seqs(STOLEN) == []
    ping(deployment)
    honest_telemetry_complete(deployment)


def test_an_update_result_for_another_devices_rollout_row_is_ignored(deployment: Deployment) -> None:
    """The attacker answers the honest devices' rollout in its own name: it has no row there, nothing moves."""
    attacker = deployment.attacker()
    version, _, status = deployment.rollout()
    assert status.state == "completed"
    forged = UpdateEvent(device_id=ATTACKER, at=time.time(), id="c-forged", rollout=status.id, model="tiny",
                         version=version, target="onnx", state="rolled_back", cause="latency", reason="forged")
    assert attacker.publish(device_topic(ATTACKER, "events"), forged.to_bytes()) == 0
    time.sleep(1.0)
    rows = deployment.query("SELECT device_id, state FROM rollout_devices WHERE rollout_id = :r", r=status.id)
    assert sorted(rows) == sorted((d, "committed") for d in HONEST)
