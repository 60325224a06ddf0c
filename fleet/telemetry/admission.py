"""What the ingest worker admits: its settings, and the check of one message before it is queued.

:func:`check_message` parses a message from a device's ``telemetry`` or ``state`` topic into its typed, bounded
form (:mod:`edgeml.protocol`) and refuses one that names another device than its topic's, with a reason of
:data:`REJECT_REASONS`; :class:`IngestSettings` says how the worker batches, acknowledges and treats devices.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgeml.errors import ConfigError
from edgeml.protocol import MAX_BYTES, ProtocolError, State, Telemetry, parse, parse_device_topic

__all__ = ["REJECT_REASONS", "IngestSettings", "RejectedMessage", "check_message"]

#: Why a message was not stored (the keys of the worker's ``stats()["rejected"]``).
REJECT_REASONS = ("topic", "oversized", "malformed", "device-mismatch", "revoked", "unknown-device", "poison",
                  "internal")


@dataclass(frozen=True)
class IngestSettings:
    """How an :class:`IngestWorker` batches, acknowledges and treats devices."""

    batch_size: int = 500  # rows per database transaction, at most
    flush_ms: float = 50.0  # longest wait, in milliseconds, between a row's arrival and its commit
    state: bool = True  # subscribe to devices' state (turn on in one process of a scale-out deployment)
    accept_unknown: bool = False  # store telemetry of devices that are not enrolled (development brokers only)
    enrolled_refresh_s: float = 10.0  # how often the list of enrolled / revoked devices is re-read
    receive_maximum: int = 2000  # MQTT 5: most messages the broker sends before the worker acknowledges
    session_expiry_s: int = 3600  # MQTT 5: how long the broker keeps a named worker's session while it is away
    reconnect_min_s: float = 0.5  # first reconnect delay after the connection drops, in seconds
    reconnect_max_s: float = 10.0  # longest reconnect delay, in seconds
    retry_max_s: float = 5.0  # longest wait between retries of a batch the database refused, in seconds
    ack_interval_s: float = 0.2  # shortest time between two acks to one device; a newer high waits that long
    last_seen_s: float = 1.0  # telemetry moves a device's last_seen at most once per this many seconds

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.flush_ms < 0 or self.receive_maximum < 1 or self.ack_interval_s < 0 \
                or self.last_seen_s < 0:
            raise ConfigError(f"ingest settings: need batch_size >= 1, flush_ms >= 0, receive_maximum >= 1, "
                              f"ack_interval_s >= 0 and last_seen_s >= 0, got {self.batch_size}, {self.flush_ms}, "
                              f"{self.receive_maximum}, {self.ack_interval_s}, {self.last_seen_s}")


class RejectedMessage(ProtocolError):
    """A message the ingest worker does not store; ``reason`` is one of :data:`REJECT_REASONS`."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def check_message(topic: str, payload: bytes | bytearray) -> Telemetry | State:
    """Check one message from a device's ``telemetry`` or ``state`` topic.

    Args:
        topic: The MQTT topic it arrived on.
        payload: Its payload.

    Raises:
        RejectedMessage: It is not a valid message of its topic's kind, or it names another device.
    """
    payload = bytes(payload)
    try:
        device_id, channel = parse_device_topic(topic)
    except ProtocolError as exc:
        raise RejectedMessage("topic", exc.message) from exc
    if channel not in ("telemetry", "state"):
        raise RejectedMessage("topic", f"not a telemetry or state topic: {topic!r}")
    if len(payload) > MAX_BYTES[channel]:
        raise RejectedMessage("oversized", f"{channel}: {len(payload)} bytes exceed {MAX_BYTES[channel]}")
    try:
        message = parse(channel, payload)
    except ProtocolError as exc:
        raise RejectedMessage("malformed", exc.message) from exc
    assert isinstance(message, (Telemetry, State))  # parse returns the kind asked for
    if message.device_id != device_id:
        raise RejectedMessage("device-mismatch", f"{channel} of {message.device_id!r} on {device_id!r}'s topic")
    return message
