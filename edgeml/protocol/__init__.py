"""The MQTT protocol between devices and the fleet: topic tree, message schemas, broker policy.

This package is the one place where the topic layout and the message formats are defined. Devices
(``edge_agent``) and the fleet server (``fleet``) both import it; it needs only the standard library.

    topics.py    the topic tree, device ids, fleet client ids, each device's broker permissions
    codec.py     bounded JSON (size, depth, 64-bit integers, finite floats, clean strings), the messages' base
    messages.py  Command (and UpdateArgs), Request, Reply, Telemetry, State, DistInfo, and parse()
    events.py    what devices report on ``events``: UpdateEvent (with its Cause), DriftEvent, ...
    uploads.py   capture uploads: UploadBegin/UploadChunk frames, the UploadAck command, the sample stream

Topic tree (everything under :data:`PREFIX`, ``edgeml/v1/``)::

    edgeml/v1/devices/{device_id}/state       device -> fleet  State (retained), the device's current status
    edgeml/v1/devices/{device_id}/telemetry   device -> fleet  Telemetry, periodic metrics
    edgeml/v1/devices/{device_id}/events      device -> fleet  DeviceEvent (update progress and results, drift)
    edgeml/v1/devices/{device_id}/requests    device -> fleet  Request (MQTT 3.1.1 request/response)
    edgeml/v1/devices/{device_id}/uploads     device -> fleet  UploadBegin/UploadChunk frames (captured samples)
    edgeml/v1/devices/{device_id}/commands    fleet -> device  Command
    edgeml/v1/devices/{device_id}/replies     fleet -> device  Reply to a Request (correlation_id)
    edgeml/v1/dist/{rollout_id}/#             fleet -> devices shared distribution of a rollout (broadcast)
    edgeml/v1/dist/{rollout_id}/{file_id}/info       DistInfo (retained): path, size and chunk size of a file
    edgeml/v1/dist/{rollout_id}/{file_id}/{index}    chunk ``index`` of that file (retained, raw bytes)

Device ids (also their broker user names, and their MQTT client ids, which the broker enforces) match
``[a-z0-9][a-z0-9-]{0,62}``. Each device may publish only to its own ``state``, ``telemetry``, ``events``,
``requests`` and ``uploads``, and subscribe only to its own ``commands`` and ``replies`` plus ``edgeml/v1/dist/#``
(:func:`acl_for_device`); fleet processes read and write everything under ``edgeml/v1/`` with client ids
that no device id can equal (:func:`fleet_client_id`). Whatever a device sends is checked by every consumer
against the identity it came from: the topic's device id must equal the payload's, and the device must be
enrolled and not revoked.

Broadcast: the fleet publishes a rollout's files once, as retained messages, and every device that
subscribes to ``edgeml/v1/dist/{rollout_id}/{file_id}/#`` (:func:`dist_file_filter`; ``file_id`` is
:func:`dist_file_id` of the file's repository path) receives them from the broker. Chunk payloads are the
file's raw bytes (not JSON): nothing in them is trusted, the device checks the assembled file against the
signed TUF metadata. A device that misses chunks asks the distribution service for just those ranges.

Messages are UTF-8 JSON objects carrying a ``schema`` field such as ``"edgeml.command/1"``. :func:`parse`
checks the size limit of the kind (:data:`MAX_BYTES`) before decoding, the JSON's bounds (nesting depth,
64-bit integers, finite numbers, strings a database accepts), then the schema version, the required fields,
their types, patterns and ranges; anything wrong raises :class:`ProtocolError`, never another exception.
"""

from edgeml.protocol.codec import INT64_MAX, MAX_BYTES, MAX_DEPTH, ProtocolError, check_json
from edgeml.protocol.events import (
    EVENT_TYPES,
    UPDATE_STATES,
    CaptureEvent,
    Cause,
    DeviceEvent,
    DriftEvent,
    PongEvent,
    RejectedEvent,
    RollbackEvent,
    UpdateEvent,
)
from edgeml.protocol.messages import (
    COMMAND_TYPES,
    MAX_DIST_CHUNK,
    MAX_REPLY_DATA,
    CaptureArgs,
    Command,
    DistInfo,
    Kind,
    Reply,
    Request,
    State,
    Telemetry,
    UpdateArgs,
    parse,
)
from edgeml.protocol.topics import (
    DEVICE_CHANNELS_IN,
    DEVICE_CHANNELS_OUT,
    DIST_FILTER,
    PREFIX,
    acl_for_device,
    device_topic,
    dist_chunk_topic,
    dist_file_filter,
    dist_file_id,
    dist_info_topic,
    dist_topic,
    fleet_client_id,
    is_device_id,
    parse_device_topic,
    tcp_no_delay,
    validate_device_id,
)
from edgeml.protocol.uploads import CaptureSample, UploadAck, UploadBegin, UploadChunk, decode_frame

Message = Command | Request | Reply | Telemetry | State | DistInfo | DeviceEvent

__all__ = [
    "COMMAND_TYPES",
    "DEVICE_CHANNELS_IN",
    "DEVICE_CHANNELS_OUT",
    "DIST_FILTER",
    "EVENT_TYPES",
    "INT64_MAX",
    "MAX_BYTES",
    "MAX_DEPTH",
    "MAX_DIST_CHUNK",
    "MAX_REPLY_DATA",
    "PREFIX",
    "UPDATE_STATES",
    "CaptureArgs",
    "CaptureEvent",
    "CaptureSample",
    "Cause",
    "Command",
    "DeviceEvent",
    "DistInfo",
    "DriftEvent",
    "Kind",
    "Message",
    "PongEvent",
    "ProtocolError",
    "RejectedEvent",
    "Reply",
    "Request",
    "RollbackEvent",
    "State",
    "Telemetry",
    "UpdateArgs",
    "UpdateEvent",
    "UploadAck",
    "UploadBegin",
    "UploadChunk",
    "acl_for_device",
    "check_json",
    "decode_frame",
    "device_topic",
    "dist_chunk_topic",
    "dist_file_filter",
    "dist_file_id",
    "dist_info_topic",
    "dist_topic",
    "fleet_client_id",
    "is_device_id",
    "parse",
    "parse_device_topic",
    "tcp_no_delay",
    "validate_device_id",
]
