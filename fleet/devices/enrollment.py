"""Device enrollment: identities in the registry database and in the broker's dynamic-security plugin.

:func:`enroll` records a device (id, tags, password hash) and adds it to the broker, and writes the
device's bootstrap file ``BROKER_DIR/credentials/NAME.bootstrap.json`` (0600): broker host/port, CA
certificate, user name/password and the registry's trusted TUF root. :func:`revoke` marks a device revoked
and disables it on the broker, which disconnects it at once if it is connected.

The broker is changed either live, through a :class:`~edgeml.fleet.devices.broker_control.BrokerControl` (the
broker runs; the change and the database commit together, or neither happens), or, with ``control=None``,
by rewriting ``BROKER_DIR/dynamic-security.json`` from the database (the broker is stopped and reads it
when it starts): :mod:`~edgeml.fleet.devices.broker_control`.

Devices listed in the broker directory by ``broker-config --device`` but never enrolled are not in the
database, so the first offline rewrite drops them: enroll every device.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeml.errors import ConfigError, RegistryError
from edgeml.fleet.audit.log import local_actor, open_audit
from edgeml.fleet.devices.broker import RESERVED_USERS
from edgeml.fleet.devices.broker_control import BrokerControl, sync_file
from edgeml.fleet.store import schema
from edgeml.fleet.store.schema import sa
from edgeml.fsutil import atomic_write_bytes
from edgeml.protocol import ProtocolError, validate_device_id

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from edgeml.fleet.store.db import Database

__all__ = ["DeviceRecord", "enroll", "list_devices", "revoke", "sync_broker_file"]


@dataclass(frozen=True)
class DeviceRecord:
    """One device row: ``last_seen`` and ``installed`` stay empty until devices report."""

    name: str
    tags: dict[str, str]
    enrolled_at: dt.datetime | None
    revoked: bool
    last_seen: dt.datetime | None
    installed: Any


def _registry(registry_dir: Path, db_url: str | None) -> Any:
    from edgeml.fleet.registry.repository import Registry

    return Registry(registry_dir, db_url=db_url)


def _devices(db: Database, conn: Connection) -> dict[str, tuple[str, bool]]:
    t = schema.devices
    rows = conn.execute(sa.select(t.c.device_id, t.c.password_hash, t.c.revoked))
    return {name: (hashed, bool(revoked)) for name, hashed, revoked in rows if hashed}


def sync_broker_file(registry_dir: Path, broker_dir: Path, *, db_url: str | None = None) -> None:
    """Rewrite a stopped broker's ``dynamic-security.json`` from the registry's devices (revoked ones disabled).

    Raises:
        ConfigError: The broker directory has no dynamic-security file.
    """
    registry = _registry(registry_dir, db_url)
    db = registry.database()
    try:
        with db.transaction() as conn:
            devices = _devices(db, conn)
    finally:
        db.close()
    sync_file(Path(broker_dir), devices)


def _listener_port(broker_dir: Path) -> int:
    try:
        match = re.search(r"^listener (\d+)", (broker_dir / "mosquitto.conf").read_text(), flags=re.M)
    except OSError:
        match = None
    return int(match.group(1)) if match else 8883


def enroll(registry_dir: Path, name: str, broker_dir: Path, *, tags: dict[str, str] | None = None,
           broker_host: str = "localhost", broker_port: int | None = None, control: BrokerControl | None = None,
           db_url: str | None = None, actor: str | None = None) -> Path:
    """Enroll device ``name``; returns the path of its bootstrap file (0600, hand it to the device only).

    Args:
        registry_dir: The registry.
        name: The new device id (its broker user name and client id).
        broker_dir: The broker directory (``edgeml fleet broker-config``).
        tags: Labels for rollouts to select by.
        broker_host: The host the device connects to (written to its bootstrap file).
        broker_port: Its port (default: the broker's listener).
        control: The running broker to add it to (None: rewrite the stopped broker's file).
        db_url: The registry database (default: the registry's).
        actor: Who enrolls it, for the audit log.

    Raises:
        ConfigError: The id is invalid or reserved, the broker directory is incomplete, or the broker refused.
        RegistryError: A device of that name is already enrolled (revoked or not).
    """
    from edgeml.fleet.devices.broker import hash_password

    try:
        validate_device_id(name)
    except ProtocolError as exc:
        raise ConfigError(exc.message, hint=exc.hint) from exc
    if name in RESERVED_USERS:
        raise ConfigError(f"{name!r} is one of the fleet's own broker users; choose another device id")
    broker_dir = Path(broker_dir)
    registry = _registry(registry_dir, db_url)
    try:
        ca_pem = (broker_dir / "tls" / "ca.crt").read_text()
        root = (registry.metadata_dir / "root.json").read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {exc.filename}: {exc.strerror}") from exc
    password = secrets.token_urlsafe(24)
    bootstrap = broker_dir / "credentials" / f"{name}.bootstrap.json"
    db = registry.database()
    try:
        log = open_audit(registry.dir, db=db)
        with registry.locked(), log.transaction() as conn:
            t = schema.devices
            if conn.execute(sa.select(t.c.id).where(t.c.device_id == name)).scalar() is not None:
                raise RegistryError(f"device {name!r} is already enrolled",
                                    hint="device ids are never reused; choose another name")
            conn.execute(t.insert().values(device_id=name, tags=dict(tags or {}), password_hash=hash_password(password),
                                           revoked=False, created_at=dt.datetime.now(dt.timezone.utc)))
            if control is not None:
                control.add_device(name, password)  # the broker refused: nothing is committed
            else:
                sync_file(broker_dir, _devices(db, conn))
            log.append(actor or local_actor(), "device.enroll", name, {"tags": dict(tags or {})}, conn=conn)
            doc = {"device_id": name, "username": name, "password": password, "host": broker_host,
                   "port": broker_port or _listener_port(broker_dir), "ca_pem": ca_pem,
                   "tuf_root_b64": base64.b64encode(root).decode()}
            bootstrap.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            atomic_write_bytes(bootstrap, json.dumps(doc, indent=2).encode())
            os.chmod(bootstrap, 0o600)
    finally:
        db.close()
    return bootstrap


def revoke(registry_dir: Path, name: str, broker_dir: Path, *, control: BrokerControl | None = None,
           db_url: str | None = None, actor: str | None = None) -> None:
    """Revoke device ``name``: the fleet ignores it from now on, and the broker disables its login.

    The registry is changed first (every fleet process then refuses the device's messages within seconds),
    then the broker: live through ``control`` (the device is disconnected at once), or, without it, in the
    stopped broker's file. Revoking a revoked device again retries the broker.

    Raises:
        RegistryError: No device of that name is enrolled.
        ConfigError: The broker could not be told (the device is revoked in the registry all the same).
    """
    registry = _registry(registry_dir, db_url)
    db = registry.database()
    try:
        log = open_audit(registry.dir, db=db)
        with registry.locked(), log.transaction() as conn:
            t = schema.devices
            if conn.execute(sa.select(t.c.id).where(t.c.device_id == name)).scalar() is None:
                raise RegistryError(f"no device {name!r} is enrolled",
                                    hint="list them with `edgeml fleet devices ls DIR`")
            conn.execute(t.update().where(t.c.device_id == name).values(revoked=True))
            log.append(actor or local_actor(), "device.revoke", name, {}, conn=conn)
        with db.transaction() as conn:
            devices = _devices(db, conn)
    finally:
        db.close()
    try:
        if control is not None:
            control.disable_device(name)
        else:
            sync_file(Path(broker_dir), devices)
    except ConfigError as exc:
        raise ConfigError(f"device {name!r} is revoked in the registry (the fleet ignores it), but the broker "
                          f"was not changed: {exc.message}", hint="run the revocation again once the broker can "
                          "be reached (or with --offline while it is stopped)") from exc


def list_devices(registry_dir: Path, *, db_url: str | None = None) -> list[DeviceRecord]:
    """Every enrolled device, in enrollment order."""
    registry = _registry(registry_dir, db_url)
    db = registry.database()
    try:
        t = schema.devices
        with db.transaction() as conn:
            rows = conn.execute(sa.select(t).order_by(t.c.id)).mappings().all()
    finally:
        db.close()
    return [DeviceRecord(r["device_id"], dict(r["tags"] or {}), r["created_at"], bool(r["revoked"]),
                         r["last_seen"], r["installed"]) for r in rows]
