"""A production Mosquitto configuration for the fleet: TLS only, no anonymous access, identities enforced.

:func:`write_broker_config` lays out a directory::

    mosquitto.conf          TLS listener (bound where told), no anonymous access, the dynamic-security plugin,
                            a message size limit, persistence
    dynamic-security.json   every identity and what it may do (Mosquitto's dynamic-security plugin)
    tls/ca.crt              the CA devices trust (generated self-signed unless one is given)
    tls/server.crt, tls/server.key
    data/                   Mosquitto's persistence location
    credentials/NAME.json   one per device, one for the fleet user and one for the broker admin (mode 0600)

Identities (Mosquitto's dynamic-security plugin, which ships with Mosquitto 2):

* a device is a client whose user name *and* MQTT client id are its device id: the broker refuses a
  connection that pairs its credentials with any other client id, so no device can take another's session
  or a fleet process's; its role (``edgeml-device-NAME``) lets it publish only to its own topics and
  subscribe only to its own ``commands`` and ``replies`` and to ``edgeml/v1/dist/#``
  (:func:`edgeml.protocol.acl_for_device`). Every other subscription is refused by the broker, ``#`` and
  shared subscriptions (``$share/...``) included, so no device can take a share of the fleet's messages;
* the fleet user (``fleet``) may do everything under ``edgeml/v1/`` and subscribe through shared
  subscriptions there; its processes use client ids with a ``.``, which no device id has;
* the broker admin (``fleet-admin``) may only use the plugin's control topic, through which enrollment
  adds devices and revocation disables them (disconnecting a connected one at once):
  :mod:`~edgeml.fleet.devices.broker_control`.

The defaults deny everything not granted. :func:`dynsec_config` and :func:`mosquitto_conf` do no I/O and
are tested without a broker; ``tests/security/`` runs the attacks against a real Mosquitto.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import os
import secrets
import sysconfig
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeml.errors import ConfigError
from edgeml.fsutil import atomic_output_dir
from edgeml.protocol import PREFIX, ProtocolError, acl_for_device, validate_device_id
from edgeml.protocol.messages import MAX_DIST_CHUNK

__all__ = [
    "ADMIN_USER",
    "DYNSEC_FILE",
    "FLEET_USER",
    "MESSAGE_SIZE_LIMIT",
    "PBKDF2_ITERATIONS",
    "RESERVED_USERS",
    "TlsFiles",
    "device_client",
    "device_role",
    "dynsec_config",
    "find_dynsec_plugin",
    "hash_password",
    "mosquitto_conf",
    "self_signed_tls",
    "verify_password",
    "write_broker_config",
]

PBKDF2_ITERATIONS = 101  # what mosquitto_passwd 2.0 and the dynamic-security plugin use
_SALT_BYTES = 12  # likewise
FLEET_USER = "fleet"
ADMIN_USER = "fleet-admin"
#: Broker user names that are never device ids.
RESERVED_USERS = frozenset({FLEET_USER, ADMIN_USER})
DYNSEC_FILE = "dynamic-security.json"
#: Largest PUBLISH payload the broker accepts from anyone: a broadcast chunk and its topic, with room to
#: spare. What devices send is much smaller, and every fleet consumer checks its own, smaller, limits
#: (edgeml.protocol.MAX_BYTES) before decoding anything.
MESSAGE_SIZE_LIMIT = MAX_DIST_CHUNK + 64 * 1024
_FLEET_ROLE, _ADMIN_ROLE = "edgeml-fleet", "edgeml-admin"
_PLUGIN = "mosquitto_dynamic_security.so"
_PLUGIN_DIRS = ("/usr/lib/{multiarch}", "/usr/lib", "/usr/local/lib", "/usr/lib/x86_64-linux-gnu",
                "/usr/lib/aarch64-linux-gnu", "/usr/lib/arm-linux-gnueabihf", "/opt/homebrew/lib")


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of an existing PKI: the CA that devices trust and the broker's certificate and key."""

    cafile: Path
    certfile: Path
    keyfile: Path


def hash_password(password: str, *, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS) -> str:
    """Hash a password the way ``mosquitto_passwd`` does: ``$7$<iterations>$<b64 salt>$<b64 sha512 pbkdf2>``."""
    salt = secrets.token_bytes(_SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password(hashed: str, password: str) -> bool:
    """Whether ``password`` matches a ``$7$`` hash (from :func:`hash_password` or ``mosquitto_passwd``)."""
    parts = hashed.split("$")
    if len(parts) != 5 or parts[1] != "7" or not parts[2].isdigit():
        return False
    salt = base64.b64decode(parts[3])
    return hmac.compare_digest(hash_password(password, salt=salt, iterations=int(parts[2])), hashed)


def find_dynsec_plugin() -> Path:
    """Where this machine's Mosquitto keeps its dynamic-security plugin (Debian's path for this machine when
    none is found: the broker may run elsewhere; ``broker-config --plugin`` overrides it)."""
    multiarch = sysconfig.get_config_var("MULTIARCH") or "x86_64-linux-gnu"
    candidates = [Path(d.format(multiarch=multiarch)) / _PLUGIN for d in _PLUGIN_DIRS]
    return next((p for p in candidates if p.is_file()), candidates[0])


def _acl(kind: str, topic: str, allow: bool = True) -> dict[str, Any]:
    return {"acltype": kind, "topic": topic, "allow": allow, "priority": 0}


_ACL_KINDS = {"publish": ("publishClientSend",), "receive": ("publishClientReceive",),
              "subscribe": ("subscribeLiteral", "subscribePattern")}


def device_role(device_id: str) -> dict[str, Any]:
    """The dynamic-security role of one device, from :func:`edgeml.protocol.acl_for_device`: a literal
    subscription for its own topics, a pattern for ``edgeml/v1/dist/#`` (any filter under it)."""
    acls = []
    for access, topic in acl_for_device(device_id):
        if access == "subscribe":
            acls.append(_acl("subscribePattern" if topic.endswith("#") else "subscribeLiteral", topic))
        else:
            acls.append(_acl(_ACL_KINDS[access][0], topic))
    return {"rolename": f"edgeml-device-{device_id}", "acls": acls}


def _dynsec_hash(password_hash: str) -> dict[str, Any]:
    """A ``$7$`` hash (:func:`hash_password`) as the plugin stores it: password, salt, iterations."""
    parts = password_hash.split("$")
    if len(parts) != 5 or parts[1] != "7" or not parts[2].isdigit():
        raise ConfigError("a broker password hash is not in Mosquitto's $7$ format")
    return {"password": parts[4], "salt": parts[3], "iterations": int(parts[2])}


def device_client(device_id: str, password_hash: str, *, disabled: bool = False) -> dict[str, Any]:
    """The dynamic-security client of one device: user name and client id both its id, its own role."""
    validate_device_id(device_id)
    client = {"username": device_id, "clientid": device_id, "textname": f"edgeml device {device_id}",
              **_dynsec_hash(password_hash), "roles": [{"rolename": f"edgeml-device-{device_id}", "priority": 0}]}
    if disabled:
        client["disabled"] = True
    return client


def dynsec_config(fleet_hash: str, admin_hash: str, devices: Mapping[str, str],
                  revoked: Sequence[str] = ()) -> dict[str, Any]:
    """The dynamic-security plugin's configuration (``dynamic-security.json``) for the fleet.

    Args:
        fleet_hash: The fleet user's ``$7$`` password hash.
        admin_hash: The broker admin's.
        devices: Device id -> ``$7$`` password hash.
        revoked: Device ids among ``devices`` that are disabled (they cannot connect).

    Raises:
        ConfigError: A device id is invalid or reserved, or a hash is malformed.
    """
    bad = sorted(set(devices) & RESERVED_USERS)
    if bad:
        raise ConfigError(f"device ids {bad} are reserved for the fleet's own broker users")
    fleet_acls = [_acl("publishClientSend", f"{PREFIX}#"), _acl("publishClientReceive", f"{PREFIX}#"),
                  _acl("subscribePattern", f"{PREFIX}#"), _acl("subscribePattern", f"$share/+/{PREFIX}#")]
    control = "$CONTROL/dynamic-security/#"
    admin_acls = [_acl("publishClientSend", control), _acl("publishClientReceive", control),
                  _acl("subscribePattern", control)]
    try:
        roles = [{"rolename": _FLEET_ROLE, "acls": fleet_acls}, {"rolename": _ADMIN_ROLE, "acls": admin_acls}]
        roles += [device_role(d) for d in sorted(devices)]
        clients = [{"username": FLEET_USER, "textname": "edgeml fleet processes", **_dynsec_hash(fleet_hash),
                    "roles": [{"rolename": _FLEET_ROLE, "priority": 0}]},
                   {"username": ADMIN_USER, "textname": "edgeml enrollment and revocation", **_dynsec_hash(admin_hash),
                    "roles": [{"rolename": _ADMIN_ROLE, "priority": 0}]}]
        clients += [device_client(d, h, disabled=d in revoked) for d, h in sorted(devices.items())]
    except ProtocolError as exc:
        raise ConfigError(exc.message, hint=exc.hint) from exc
    deny = {"publishClientSend": False, "publishClientReceive": False, "subscribe": False, "unsubscribe": True}
    return {"defaultACLAccess": deny, "clients": clients, "groups": [], "roles": roles}


def mosquitto_conf(base_dir: Path, *, port: int = 8883, bind: str | None = None,
                   plugin: Path | None = None) -> str:
    """The text of ``mosquitto.conf`` for a layout installed at ``base_dir`` (absolute paths in the file).

    Args:
        base_dir: Where the layout lives on the broker's host.
        port: The TLS listener's port.
        bind: The address it listens on (None: every address).
        plugin: The dynamic-security plugin (default: :func:`find_dynsec_plugin`).
    """
    return "\n".join([
        "# edgeml fleet broker (generated by `edgeml fleet broker-config`): TLS only, authenticated, each",
        "# identity bound to its client id and topics by the dynamic-security plugin",
        "per_listener_settings false",
        "allow_anonymous false",
        f"plugin {plugin or find_dynsec_plugin()}",
        f"plugin_opt_config_file {base_dir / DYNSEC_FILE}",
        "# no message larger than a broadcast chunk; fleet consumers check their own, smaller, limits",
        f"message_size_limit {MESSAGE_SIZE_LIMIT}",
        "persistence true",
        f"persistence_location {base_dir / 'data'}/",
        "# request/response chunk transfers stall on Nagle + delayed ACK without this (2x measured)",
        "set_tcp_nodelay true",
        "# QoS 1 messages queued per client while it is slow or reconnecting (the default 1000 drops telemetry",
        "# meant for an ingest worker that is restarting); the byte cap bounds the broker's memory",
        "max_queued_messages 100000",
        "max_queued_bytes 268435456",
        "",
        f"listener {port}" + (f" {bind}" if bind else ""),
        f"cafile {base_dir / 'tls' / 'ca.crt'}",
        f"certfile {base_dir / 'tls' / 'server.crt'}",
        f"keyfile {base_dir / 'tls' / 'server.key'}",
        "tls_version tlsv1.2",
        "",
    ])


def _name(common_name: str) -> object:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def self_signed_tls(hostname: str, *, days: int = 825) -> tuple[bytes, bytes, bytes]:
    """Generate a CA and a server certificate for ``hostname`` (DNS name or IP address).

    Returns:
        ``(ca_cert_pem, server_cert_pem, server_key_pem)``; the CA key is discarded, so this CA can sign
        nothing else.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name, name = _name(f"edgeml fleet CA {hostname}"), _name(hostname)
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)  # type: ignore[arg-type]
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now).not_valid_after(now + dt.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    try:
        san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(hostname))
    except ValueError:
        san = x509.DNSName(hostname)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(ca_name)  # type: ignore[arg-type]
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([san]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    pem = serialization.Encoding.PEM
    return ca.public_bytes(pem), cert.public_bytes(pem), key_pem


def _write(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _write_tls(work: Path, hostname: str, tls: TlsFiles | None) -> None:
    if tls is None:
        ca, cert, key = self_signed_tls(hostname)
    else:
        try:
            ca, cert, key = (Path(p).read_bytes() for p in (tls.cafile, tls.certfile, tls.keyfile))
        except OSError as exc:
            raise ConfigError(f"cannot read TLS file: {exc}", hint="check --cafile/--certfile/--keyfile") from exc
    _write(work / "tls" / "ca.crt", ca, 0o644)
    _write(work / "tls" / "server.crt", cert, 0o644)
    _write(work / "tls" / "server.key", key, 0o600)


def write_broker_config(out_dir: Path, devices: Sequence[str], *, hostname: str = "localhost", port: int = 8883,
                        bind: str | None = None, tls: TlsFiles | None = None, base_dir: Path | None = None,
                        plugin: Path | None = None) -> dict[str, str]:
    """Write the broker layout (see the module docstring) to the new directory ``out_dir``.

    Args:
        out_dir: Where to write; must not exist yet (credentials are never overwritten).
        devices: Device ids (their broker user names and client ids); prefer enrolling them
            (:func:`edgeml.fleet.devices.enrollment.enroll`), which keeps the registry in step.
        hostname: Name devices connect to (the generated server certificate's subject).
        port: TLS listener port.
        bind: Address the listener binds (None: every address).
        tls: An existing CA/server certificate/key to use instead of generating a self-signed one.
        base_dir: Where the layout will be installed on the broker host (default: ``out_dir``).
        plugin: The dynamic-security plugin's path on the broker host (default: :func:`find_dynsec_plugin`).

    Returns:
        ``{user: password}`` of every generated user (devices, ``fleet`` and ``fleet-admin``).

    Raises:
        ConfigError: ``out_dir`` exists, or a device id is invalid, duplicated or reserved.
    """
    out_dir = Path(out_dir).absolute()
    if out_dir.exists():
        raise ConfigError(f"{out_dir} already exists", hint="choose a new output directory")
    if len(set(devices)) != len(devices):
        raise ConfigError(f"device ids must be unique: {list(devices)}")
    if bind is not None:
        try:
            ipaddress.ip_address(bind)
        except ValueError as exc:
            raise ConfigError(f"--bind must be an IP address, got {bind!r}") from exc
    creds = {user: secrets.token_urlsafe(24) for user in [FLEET_USER, ADMIN_USER, *devices]}
    hashes = {user: hash_password(pw) for user, pw in creds.items()}
    config = dynsec_config(hashes[FLEET_USER], hashes[ADMIN_USER], {d: hashes[d] for d in devices})
    with atomic_output_dir(out_dir.parent, prefix="broker") as work:
        _write(work / "mosquitto.conf", mosquitto_conf(base_dir or out_dir, port=port, bind=bind,
                                                       plugin=plugin).encode(), 0o644)
        _write(work / DYNSEC_FILE, json.dumps(config, indent=1).encode(), 0o600)
        _write_tls(work, hostname, tls)
        (work / "data").mkdir(mode=0o700)
        for user, password in creds.items():
            role = "fleet" if user == FLEET_USER else "admin" if user == ADMIN_USER else "device"
            doc = {"username": user, "password": password, "host": hostname, "port": port, "ca": "tls/ca.crt",
                   "role": role}
            _write(work / "credentials" / f"{user}.json", json.dumps(doc, indent=2).encode(), 0o600)
        os.chmod(work / "credentials", 0o700)
        os.chmod(work, 0o755)
        os.replace(work, out_dir)  # same filesystem: atomic rename
    return creds
