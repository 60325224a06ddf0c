"""The persisted update record: one JSON file, always replaced through :func:`~edgeml.fsutil.atomic_write_bytes`.

After SIGKILL or power loss the file holds either the previous record or the new one, never a torn
mix; the state machine (:mod:`.machine`) writes it on entering every state, before the step runs.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from edgeml import fsutil
from edgeml.bundle import check_name, check_semver
from edgeml.errors import BundleError, ConfigError, StorageError

from .health import Thresholds
from .states import State

__all__ = ["RECORD_SCHEMA", "RecordStore", "UpdateRecord", "UpdateRequest"]

RECORD_SCHEMA = "edgeml.update/1"


@dataclass(frozen=True)
class UpdateRequest:
    """What the fleet asked this device to install.

    Attributes:
        model: Model name.
        version: Version to install.
        target: Compile target (e.g. ``onnx``, ``onnx-int8``).
        rollout: The rollout's id (reported back), if any.
        thresholds: Health limits from the rollout (unset keys keep their defaults).
        id: This update's id (generated when empty).
        delta_from: The version a signed delta rebuilds this bundle from (offered by the fleet), or None.
    """

    model: str
    version: str
    target: str
    rollout: str | None = None
    thresholds: Thresholds = field(default_factory=Thresholds)
    id: str = ""
    delta_from: str | None = None

    def validated(self) -> UpdateRequest:
        """This request with an id, after checking its fields.

        Raises:
            ConfigError: A malformed model name, version or target.
        """
        try:
            check_name(self.model)
            check_semver(self.version)
        except BundleError as exc:
            raise ConfigError(f"bad update request: {exc.message}") from exc
        if not self.target or "/" in self.target:
            raise ConfigError(f"bad update request: target {self.target!r}")
        if self.delta_from is not None:
            try:
                check_semver(self.delta_from)
            except BundleError as exc:
                raise ConfigError(f"bad update request: delta base: {exc.message}") from exc
        return self if self.id else dataclasses.replace(self, id=uuid.uuid4().hex[:12])


@dataclass
class UpdateRecord:
    """Everything the agent must remember about one update across crashes.

    Attributes:
        id, model, version, target, rollout: From the request.
        thresholds: The health limits in force (as a dict of :class:`Thresholds` fields).
        state: The current :class:`State` value.
        active_slot: The slot that served when the update started (None for a first model).
        candidate_slot: The slot the new model is staged into.
        previous_version, previous_manifest_sha256: The version that served when the update started, and
            the sha256 of its slot's manifest (what a rollback re-checks before pointing back at it).
        bundle_path, bundle_sha256: The verified download and its signed hash.
        manifest_sha256: sha256 of the staged slot's manifest.json.
        reason: Why the update failed or rolled back (None while fine / on commit).
        cause: The same as a :class:`~edgeml.protocol.Cause` value, for the fleet's rules.
        visits: state value -> times entered (the loop guard reads it).
        crashes: Times the agent died while the new model was serving (probation crash counter).
        probation_started: Wall-clock time probation began (survives a reboot; monotonic time does not).
        baseline: ``{"p99_ms", "confidence"}`` measured on this device before the switch.
        history: ``[from, event, to, wall time]`` per transition, oldest first.
        delta_from: The base version of the delta offered (None: full bundle only).
        transfer: How the bundle came (``kind`` delta/full, ``bytes``, ``full_bytes``, ``fallback``), once known.
    """

    id: str
    model: str
    version: str
    target: str
    rollout: str | None = None
    thresholds: dict[str, Any] = field(default_factory=dict)
    state: str = State.NOTIFIED.value
    active_slot: str | None = None
    candidate_slot: str | None = None
    previous_version: str | None = None
    previous_manifest_sha256: str | None = None
    bundle_path: str | None = None
    bundle_sha256: str | None = None
    manifest_sha256: str | None = None
    reason: str | None = None
    cause: str | None = None
    visits: dict[str, int] = field(default_factory=dict)
    crashes: int = 0
    probation_started: float | None = None
    baseline: dict[str, float | None] | None = None
    history: list[list[Any]] = field(default_factory=list)
    delta_from: str | None = None
    transfer: dict[str, Any] | None = None
    schema: str = RECORD_SCHEMA

    @classmethod
    def new(cls, request: UpdateRequest) -> UpdateRecord:
        """A record in NOTIFIED for ``request`` (which must be validated)."""
        return cls(id=request.id, model=request.model, version=request.version, target=request.target,
                   rollout=request.rollout, thresholds=request.thresholds.to_dict(),
                   visits={State.NOTIFIED.value: 1}, delta_from=request.delta_from)

    @property
    def current(self) -> State:
        return State(self.state)

    @property
    def limits(self) -> Thresholds:
        return Thresholds.from_dict(self.thresholds)

    def enter(self, event: str, to: State, now: float | None = None) -> None:
        """Move to ``to`` (counting the visit) and note the transition in the history."""
        self.history.append([self.state, event, to.value, round(time.time() if now is None else now, 3)])
        self.state = to.value
        self.visits[to.value] = self.visits.get(to.value, 0) + 1

    def chain(self) -> list[str]:
        """The states entered so far, oldest first (the first is NOTIFIED)."""
        return [State.NOTIFIED.value, *(h[2] for h in self.history)]

    def to_json(self) -> bytes:
        # a shallow dict: dataclasses.asdict deep-copies every list and dict first; and no ``indent``: with it
        # json uses its pure-Python encoder, ~10x slower than the C one (~0.6 ms a save, a save per state)
        doc = {f.name: getattr(self, f.name) for f in _FIELDS}
        return (json.dumps(doc, sort_keys=True, separators=(",", ":")) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes) -> UpdateRecord:
        """Parse a record.

        Raises:
            StorageError: Not a record this agent can read.
        """
        try:
            raw = json.loads(data)
            if raw.get("schema") != RECORD_SCHEMA:
                raise ValueError(f"schema {raw.get('schema')!r}")
            record = cls(**raw)
            State(record.state)
        except (ValueError, TypeError, AttributeError) as exc:
            raise StorageError(f"the update record is not readable: {exc}",
                               hint="remove it to forget the update; the active slot keeps serving") from exc
        return record


_FIELDS = fields(UpdateRecord)


class RecordStore:
    """The update record at ``path`` (one file, atomically replaced).

    Args:
        path: The record file, e.g. ``STATE_DIR/update.json``; its directory is created if needed.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def load(self) -> UpdateRecord | None:
        """The persisted record, or None when no update was ever recorded.

        Raises:
            StorageError: The file exists but is not a readable record.
        """
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot read {self.path}: {exc.strerror}") from exc
        return UpdateRecord.from_json(data)

    def save(self, record: UpdateRecord) -> None:
        """Persist ``record`` durably (write, fsync, rename, fsync the directory).

        Raises:
            StorageError: It cannot be written.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fsutil.atomic_write_bytes(self.path, record.to_json())  # looked up here: tests wrap the helper
