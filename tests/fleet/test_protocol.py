"""The MQTT protocol: topics, message round trips and rejection of bad input, each device's permissions."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeml.errors import EdgeMLError
from edgeml.protocol import (
    MAX_BYTES,
    CaptureEvent,
    Cause,
    Command,
    DistInfo,
    DriftEvent,
    Message,
    PongEvent,
    ProtocolError,
    RejectedEvent,
    Reply,
    Request,
    RollbackEvent,
    State,
    Telemetry,
    UpdateArgs,
    UpdateEvent,
    UploadBegin,
    UploadChunk,
    acl_for_device,
    device_topic,
    dist_topic,
    fleet_client_id,
    is_device_id,
    parse,
    parse_device_topic,
    validate_device_id,
)

MESSAGES: list[tuple[str, Message]] = [
    ("command", Command(id="c-1", type="update", args={"version": "1.2.0", "urls": ["a", "b"]}, issued_at=1.7e9)),
    ("command", Command(id="c-2", type="ping")),
    ("request", Request(correlation_id="r1", reply_to="edgeml/v1/devices/cam-1/replies", method="get_rollout",
                        params={"n": 1})),
    ("reply", Reply(correlation_id="r1", ok=True, result={"rollout": "r-9"})),
    ("reply", Reply(correlation_id="r1", ok=False, error="no rollout")),
    ("telemetry", Telemetry(device_id="cam-1", seq=0, sent_at=12.5, metrics={"fps": 29.9, "drift": None})),
    ("state", State(device_id="cam-1", status="running", model="digits", version="1.0.0", slot="a",
                    capabilities={"runtimes": ["onnxruntime"]}, clock_synced=True)),
    ("state", State(device_id="cam-1", status="idle")),
    ("command", Command(id="a-7", type="telemetry-ack", args={"seq": 41})),
    ("dist", DistInfo(path="targets/digits/1.0.0/ab12.onnx-int8.edgeml", size=1_000_000, chunk=262_144)),
    ("event", UpdateEvent(device_id="cam-1", at=1.7e9, id="c-1", rollout="r-1", model="digits", version="1.2.0",
                          target="onnx-int8", state="rolled_back", event="fail", reason="probation: p99 ...",
                          cause=Cause.LATENCY.value)),
    ("event", DriftEvent(device_id="cam-1", at=1.7e9, version="1.2.0", window={"score": 0.7, "flagged": True})),
    ("event", RejectedEvent(device_id="cam-1", at=1.7e9, reason="bad command", suppressed=3)),
    ("event", PongEvent(device_id="cam-1", at=1.7e9, id="p-1")),
    ("event", RollbackEvent(device_id="cam-1", at=1.7e9, id="c-9", accepted=True)),
    ("event", CaptureEvent(device_id="cam-1", at=1.7e9, id="c-3", entries=12, bytes=4096)),
    ("upload", UploadBegin(device_id="cam-1", upload="u-1", size=70_000, sha256="ab" * 32, chunk=65_536, samples=3,
                           trigger="drift", command_id=None, tag="site-a", drift={"score": 0.4})),
    ("upload", UploadChunk(device_id="cam-1", upload="u-1", index=1)),
]


@pytest.mark.parametrize(("kind", "message"), MESSAGES)
def test_round_trip(kind: str, message: Message) -> None:
    data = message.to_bytes()
    assert parse(kind, data) == message
    assert type(parse(kind, data)) is type(message)
    assert json.loads(data)["schema"] == f"edgeml.{kind}/1"


def _doc(kind: str) -> dict[str, Any]:
    return dict(json.loads(next(m for k, m in MESSAGES if k == kind).to_bytes()))


@pytest.mark.parametrize(("kind", "change", "match"), [
    ("command", {"schema": "edgeml.command/2"}, "unsupported schema"),
    ("state", {"schema": None}, "unsupported schema"),
    ("command", {"type": "format-disk"}, "unknown type"),
    ("dist", {"path": "metadata/root.json"}, "must be targets/"),
    ("dist", {"path": "targets/../x"}, "must be targets/"),
    ("dist", {"chunk": 0}, "0 < chunk"),
    ("dist", {"chunk": 2 * 1024 * 1024}, "0 < chunk"),
    ("dist", {"size": -1}, "size >= 0"),
    ("command", {"id": 5}, "'id' must be str"),
    ("command", {"args": []}, "'args' must be dict"),
    ("command", {"extra": 1}, "unknown fields"),
    ("request", {"reply_to": "edgeml/v1/devices/cam-2/commands"}, "reply_to"),
    ("request", {"reply_to": "elsewhere"}, "reply_to"),
    ("reply", {"ok": False, "error": None}, "'error' is required"),
    ("reply", {"ok": 1}, "'ok' must be bool"),
    ("telemetry", {"seq": -1}, "'seq' must be within"),
    ("telemetry", {"seq": True}, "'seq' must be int"),
    ("telemetry", {"seq": 1.5}, "'seq' must be int"),
    ("telemetry", {"device_id": "Cam_1"}, "invalid device id"),
    ("state", {"clock_synced": "yes"}, "'clock_synced' must be bool"),
    ("state", {"status": ""}, "'status' must not be empty"),
    ("state", {"status": "Running Fine"}, "'status' must be a lowercase word"),
    ("state", {"slot": "c"}, "'slot' must be"),
    ("state", {"model": "../x"}, "'model' must be"),
    ("state", {"capabilities": {f"k{i}": i for i in range(65)}}, "more than 64"),
    ("telemetry", {"seq": 2**63}, "64-bit range"),
    ("telemetry", {"seq": 2**63 - 1, "metrics": {"x": 10**19}}, "64-bit range"),
    ("telemetry", {"sent_at": -5.0}, "'sent_at' must be within"),
    ("telemetry", {"metrics": {f"m{i}": i for i in range(257)}}, "more than 256 metrics"),
    ("command", {"id": "a b"}, "'id' must be a token"),
    ("command", {"id": "x" * 65}, "'id' must be a token"),
    ("request", {"method": "GET /"}, "'method' must be a lowercase word"),
    ("request", {"correlation_id": "#"}, "'correlation_id' must be a token"),
    ("event", {"type": "gossip"}, "unknown type"),
    ("event", {"type": "drift"}, "unknown fields|required"),
    ("event", {"state": "exploded"}, "unknown update state"),
    ("event", {"cause": "the p99 was bad"}, "unknown cause"),
    ("event", {"reason": "x" * 1001}, "longer than 1000"),
    ("event", {"device_id": "Cam 2"}, "invalid device id"),
    ("event", {"at": float("1e300")}, "'at' must be within"),
    ("event", {"rollout": "../r"}, "invalid device id"),
    ("event", {"model": "M!"}, "'model' must be"),
    ("event", {"schema": None}, "unsupported schema"),
])
def test_invalid_fields_rejected(kind: str, change: dict[str, Any], match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        parse(kind, json.dumps({**_doc(kind), **change}).encode())


@pytest.mark.parametrize("kind", sorted(MAX_BYTES))
def test_missing_field_rejected(kind: str) -> None:
    doc = _doc(kind)
    required = {"command": "id", "request": "method", "reply": "ok", "telemetry": "seq", "state": "status",
                "dist": "size", "event": "state", "upload": "upload"}
    del doc[required[kind]]
    with pytest.raises(ProtocolError):
        parse(kind, json.dumps(doc).encode())


@pytest.mark.parametrize("kind", sorted(MAX_BYTES))
def test_oversized_rejected(kind: str) -> None:
    payload = json.dumps({**_doc(kind), "pad": "x" * MAX_BYTES[kind]}).encode()
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        parse(kind, payload)


def test_oversized_not_encoded() -> None:
    assert MAX_BYTES["command"] == 16 * 1024 and MAX_BYTES["telemetry"] == 64 * 1024
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        Command(id="c", type="capture", args={"blob": "x" * MAX_BYTES["command"]}).to_bytes()


@pytest.mark.parametrize("payload", [b"", b"{", b"[]", b'"x"', b"\xff\xfe", b'{"schema": NaN}', b"[" * 100000,
                                     b"null"])
def test_malformed_rejected(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse("state", payload[: MAX_BYTES["state"]])


def test_unknown_kind_rejected() -> None:
    with pytest.raises(ProtocolError, match="unknown message kind"):
        parse("gossip", b"{}")


def test_constructor_validates() -> None:
    with pytest.raises(ProtocolError):
        Telemetry(device_id="cam-1", seq=-3, sent_at=0.0)
    with pytest.raises(ProtocolError):
        Telemetry(device_id="cam-1", seq=1, sent_at=float("nan"))
    assert issubclass(ProtocolError, EdgeMLError)


@pytest.mark.parametrize("device_id", ["", "-cam", "Cam", "cam_1", "cam/1", "cam+", "#", "a" * 64, "cam 1", "é"])
def test_bad_device_ids_rejected(device_id: str) -> None:
    with pytest.raises(ProtocolError, match="invalid device id"):
        validate_device_id(device_id)
    with pytest.raises(ProtocolError):
        device_topic(device_id, "telemetry")


@pytest.mark.parametrize("device_id", ["a", "0", "cam-1", "a" * 63, "x-"])
def test_good_device_ids(device_id: str) -> None:
    topic = device_topic(device_id, "state")
    assert topic == f"edgeml/v1/devices/{device_id}/state"
    assert parse_device_topic(topic) == (device_id, "state")


@pytest.mark.parametrize("topic", ["edgeml/v1/devices/cam-1", "edgeml/v2/devices/cam-1/state",
                                   "edgeml/v1/devices/cam-1/secrets", "edgeml/v1/devices/+/state",
                                   "edgeml/v1/devices/cam-1/state/x"])
def test_bad_topics_rejected(topic: str) -> None:
    with pytest.raises(ProtocolError):
        parse_device_topic(topic)


def test_dist_topic() -> None:
    assert dist_topic("r-1") == "edgeml/v1/dist/r-1"
    assert dist_topic("r-1", "chunks/3") == "edgeml/v1/dist/r-1/chunks/3"
    with pytest.raises(ProtocolError):
        dist_topic("r-1", "#")


def test_acl_for_device() -> None:
    assert acl_for_device("cam-1") == [
        ("publish", "edgeml/v1/devices/cam-1/state"), ("publish", "edgeml/v1/devices/cam-1/telemetry"),
        ("publish", "edgeml/v1/devices/cam-1/events"), ("publish", "edgeml/v1/devices/cam-1/requests"),
        ("publish", "edgeml/v1/devices/cam-1/uploads"),
        ("subscribe", "edgeml/v1/devices/cam-1/commands"), ("receive", "edgeml/v1/devices/cam-1/commands"),
        ("subscribe", "edgeml/v1/devices/cam-1/replies"), ("receive", "edgeml/v1/devices/cam-1/replies"),
        ("subscribe", "edgeml/v1/dist/#"), ("receive", "edgeml/v1/dist/#"),
    ]
    assert not any(topic.startswith("$") or "+" in topic for _, topic in acl_for_device("cam-1"))


@pytest.mark.parametrize("role", ["rollouts", "ingest", "dist", "admin"])
def test_fleet_client_ids_are_never_device_ids(role: str) -> None:
    assert not is_device_id(fleet_client_id(role)) and not is_device_id(fleet_client_id(role, unique=False))
    assert fleet_client_id(role) != fleet_client_id(role)  # unique per process


def _update(**args: Any) -> Command:
    return Command(id="c-1", type="update", args={"model": "digits", "version": "1.2.0", "target": "onnx", **args})


def test_update_args() -> None:
    args = UpdateArgs.from_command(_update(rollout="r-1", thresholds={"max_error_rate": 0.1},
                                           broadcast={"rollout": "r-1", "path": "targets/x"}))
    assert (args.model, args.version, args.target, args.rollout) == ("digits", "1.2.0", "onnx", "r-1")
    assert UpdateArgs.from_command(Command(id="c-1", type="update", args=args.to_dict())) == args


@pytest.mark.parametrize(("args", "match"), [
    ({"model": "../../etc"}, "'model' must be"),
    ({"target": "onnx/../../x"}, "'target' must be"),
    ({"version": 3}, "'version' must be a string"),
    ({"rollout": "R 1"}, "invalid device id"),
    ({"thresholds": {"max_error_rate": "high"}}, "must be a number"),
    ({"thresholds": {"Bad Key": 1}}, "thresholds"),
    ({"broadcast": {"rollout": "r-1"}}, "'broadcast' must be"),
    ({"format_disk": True}, "unknown arguments"),
])
def test_update_args_rejected(args: dict[str, Any], match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        UpdateArgs.from_command(_update(**args))
    with pytest.raises(ProtocolError, match="'model' is required|argument 'model'"):
        UpdateArgs.from_command(Command(id="c-1", type="update", args={"version": "1.0.0", "target": "onnx"}))


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(sorted(MAX_BYTES)),
       payload=st.one_of(st.binary(max_size=512),
                         st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                                      lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                                          max_size=6),
                                      max_leaves=12).map(lambda o: json.dumps(o).encode())))
def test_parse_raises_only_protocol_error(kind: str, payload: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        parse(kind, payload)


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                     lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
                     max_leaves=6)


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(sorted(MAX_BYTES)), data=st.data())
def test_parse_mutated_valid_message(kind: str, data: st.DataObject) -> None:
    doc = _doc(kind)
    doc[data.draw(st.sampled_from(sorted(doc)))] = data.draw(_JSON)
    with contextlib.suppress(ProtocolError):
        parse(kind, json.dumps(doc).encode())
