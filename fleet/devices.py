"""Device enrollment: identities in the registry database, broker passwd/ACL regenerated from them.

:func:`enroll` records a device (id, tags, password hash), rewrites ``BROKER_DIR/passwd`` and ``acl`` from the
database's non-revoked devices plus the fleet user (whose existing hash is kept), and writes the device's
bootstrap file ``BROKER_DIR/credentials/NAME.bootstrap.json`` (0600): broker host/port, CA certificate,
user name/password and the registry's trusted TUF root. :func:`revoke` marks a device revoked, rewrites both
files without it and optionally sends SIGHUP to the broker, which makes Mosquitto reload them.

Devices listed in the broker directory by ``broker-config --device`` but never enrolled are not in the
database, so the first regeneration drops them: enroll every device.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import re
import secrets
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeml.errors import ConfigError, RegistryError
from edgeml.fleet.audit import local_actor, open_audit
from edgeml.fsutil import atomic_write_bytes
from edgeml.protocol import ProtocolError, mosquitto_acl, validate_device_id

__all__ = ["DeviceRecord", "enroll", "list_devices", "regenerate_broker_files", "revoke"]


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
    from edgeml.fleet.registry import Registry

    return Registry(registry_dir, db_url=db_url)


def _fleet_hash(broker_dir: Path, fleet_user: str) -> str:
    try:
        lines = (broker_dir / "passwd").read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read {broker_dir / 'passwd'}: {exc.strerror}",
                          hint="create the broker directory with `edgeml fleet broker-config`") from exc
    for line in lines:
        user, _, hashed = line.partition(":")
        if user == fleet_user and hashed:
            return hashed
    raise ConfigError(f"{broker_dir / 'passwd'} has no fleet user {fleet_user!r}", hint="check --fleet-user")


def _write_like(path: Path, data: bytes, mode: int) -> None:
    """Atomically replace ``path``, keeping its owner (the broker's user) and setting ``mode``."""
    try:
        old = path.stat()
    except FileNotFoundError:
        old = None
    atomic_write_bytes(path, data)
    os.chmod(path, mode)
    if old is not None and (old.st_uid, old.st_gid) != (os.geteuid(), os.getegid()) and os.geteuid() == 0:
        os.chown(path, old.st_uid, old.st_gid)


def regenerate_broker_files(broker_dir: Path, devices: dict[str, str], *, fleet_user: str = "fleet") -> None:
    """Rewrite ``passwd`` and ``acl`` in ``broker_dir`` for ``{device id: password hash}`` plus the fleet user.

    Raises:
        ConfigError: The broker directory has no passwd entry for ``fleet_user``, or an id is invalid.
    """
    fleet_hash = _fleet_hash(broker_dir, fleet_user)
    try:
        acl = mosquitto_acl(sorted(devices), fleet_user=fleet_user)
    except ProtocolError as exc:
        raise ConfigError(exc.message, hint=exc.hint) from exc
    entries = {fleet_user: fleet_hash, **devices}
    passwd = "".join(f"{user}:{hashed}\n" for user, hashed in sorted(entries.items()))
    _write_like(broker_dir / "passwd", passwd.encode(), 0o640)
    _write_like(broker_dir / "acl", acl.encode(), 0o644)


def _active(db: Any, conn: Any) -> dict[str, str]:
    t = db.tables["devices"]
    rows = conn.execute(db.sa.select(t.c.device_id, t.c.password_hash).where(t.c.revoked == db.sa.false()))
    return {name: hashed for name, hashed in rows if hashed}


def _listener_port(broker_dir: Path) -> int:
    try:
        match = re.search(r"^listener (\d+)", (broker_dir / "mosquitto.conf").read_text(), flags=re.M)
    except OSError:
        match = None
    return int(match.group(1)) if match else 8883


def enroll(registry_dir: Path, name: str, broker_dir: Path, *, tags: dict[str, str] | None = None,
           broker_host: str = "localhost", broker_port: int | None = None, fleet_user: str = "fleet",
           db_url: str | None = None, actor: str | None = None) -> Path:
    """Enroll device ``name``; returns the path of its bootstrap file (0600, hand it to the device only).

    Raises:
        ConfigError: The id is invalid or equals the fleet user, or the broker directory is incomplete.
        RegistryError: A device of that name is already enrolled (revoked or not).
    """
    from edgeml.fleet.broker import hash_password

    try:
        validate_device_id(name)
    except ProtocolError as exc:
        raise ConfigError(exc.message, hint=exc.hint) from exc
    if name == fleet_user:
        raise ConfigError(f"{name!r} is the fleet user's name; choose another device id")
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
            t = db.tables["devices"]
            if conn.execute(db.sa.select(t.c.id).where(t.c.device_id == name)).scalar() is not None:
                raise RegistryError(f"device {name!r} is already enrolled",
                                    hint="device ids are never reused; choose another name")
            conn.execute(t.insert().values(device_id=name, tags=dict(tags or {}), password_hash=hash_password(password),
                                           revoked=False, created_at=dt.datetime.now(dt.timezone.utc)))
            regenerate_broker_files(broker_dir, _active(db, conn), fleet_user=fleet_user)
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


def revoke(registry_dir: Path, name: str, broker_dir: Path, *, broker_pid: int | None = None,
           fleet_user: str = "fleet", db_url: str | None = None, actor: str | None = None) -> None:
    """Revoke device ``name``: its broker login is removed; with ``broker_pid`` the broker reloads now.

    Raises:
        RegistryError: No device of that name is enrolled.
        ConfigError: The broker process cannot be signalled.
    """
    registry = _registry(registry_dir, db_url)
    db = registry.database()
    try:
        log = open_audit(registry.dir, db=db)
        with registry.locked(), log.transaction() as conn:
            t = db.tables["devices"]
            if conn.execute(db.sa.select(t.c.id).where(t.c.device_id == name)).scalar() is None:
                raise RegistryError(f"no device {name!r} is enrolled",
                                    hint="list them with `edgeml fleet devices ls DIR`")
            conn.execute(t.update().where(t.c.device_id == name).values(revoked=True))
            regenerate_broker_files(Path(broker_dir), _active(db, conn), fleet_user=fleet_user)
            log.append(actor or local_actor(), "device.revoke", name, {}, conn=conn)
    finally:
        db.close()
    if broker_pid is not None:
        try:
            os.kill(broker_pid, signal.SIGHUP)
        except OSError as exc:
            raise ConfigError(f"device {name!r} is revoked, but the broker (pid {broker_pid}) could not be told "
                              f"to reload: {exc.strerror}", hint="send it SIGHUP or restart it") from exc


def list_devices(registry_dir: Path, *, db_url: str | None = None) -> list[DeviceRecord]:
    """Every enrolled device, in enrollment order."""
    registry = _registry(registry_dir, db_url)
    db = registry.database()
    try:
        t = db.tables["devices"]
        with db.transaction() as conn:
            rows = conn.execute(db.sa.select(t).order_by(t.c.id)).mappings().all()
    finally:
        db.close()
    return [DeviceRecord(r["device_id"], dict(r["tags"] or {}), r["created_at"], bool(r["revoked"]),
                         r["last_seen"], r["installed"]) for r in rows]
