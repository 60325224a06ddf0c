"""Operator tokens: who may call the fleet server's HTTP API (and the dashboard, and the remote CLI).

A token is ``edgeml_`` followed by 32 random bytes, URL-safe base64. It is shown once, when it is created;
the ``tokens`` table keeps only its sha256, with a unique name and a :class:`Role`. Roles are ordered:
``viewer`` reads, ``operator`` also acts on the fleet (rollouts: start, pause, abort; rollbacks), ``admin``
also manages keys, devices and tokens. A request sends ``Authorization: Bearer <token>``; :func:`authorize`
names who sent it or raises :class:`AuthError` (401: missing, unknown or revoked) or :class:`ForbiddenError`
(403: a role too low), which the HTTP listener turns into JSON (:mod:`~edgeml.fleet.web.server`).

The remote CLI reads its token with :func:`operator_token`: from a file only its owner can read
(``--token-file``), else from ``$EDGEML_TOKEN``; never from a command-line argument, which every local user
sees in the process list. :func:`read_secret` reads such a file (the broker password's too).

Tokens are looked up by their hash, then compared with :func:`hmac.compare_digest`: what a client can time
is an index lookup on a sha256, which tells nothing about the token's characters.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import hmac
import os
import re
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeml.errors import ConfigError, EdgeMLError, RegistryError
from edgeml.fleet.store import schema
from edgeml.fleet.store.db import as_utc, utcnow
from edgeml.fleet.store.schema import sa

if TYPE_CHECKING:
    from edgeml.fleet.store.db import Database

__all__ = [
    "ENV_TOKEN",
    "AuthError",
    "ForbiddenError",
    "Principal",
    "Role",
    "TokenRecord",
    "authenticate",
    "authorize",
    "bearer_token",
    "create_token",
    "list_tokens",
    "operator_token",
    "read_secret",
    "require",
    "revoke_token",
]

#: The environment variable holding the remote CLI's operator token.
ENV_TOKEN = "EDGEML_TOKEN"
_PREFIX = "edgeml_"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class AuthError(EdgeMLError):
    """A request without a valid operator token: missing, unknown or revoked (HTTP 401)."""


class ForbiddenError(AuthError):
    """A valid token whose role is too low for what it asked (HTTP 403)."""


class Role(enum.IntEnum):
    """An operator token's role; a higher role may do everything a lower one may."""

    VIEWER = 1
    OPERATOR = 2
    ADMIN = 3

    @property
    def label(self) -> str:
        """The role's name as stored and typed: ``viewer``, ``operator``, ``admin``."""
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> Role:
        """The role called ``text``.

        Raises:
            ConfigError: No role has that name.
        """
        try:
            return cls[text.strip().upper()]
        except KeyError:
            raise ConfigError(f"unknown role {text!r}", hint="one of: viewer, operator, admin") from None


@dataclass(frozen=True)
class Principal:
    """Who a request is from: the token's name and role."""

    name: str
    role: Role

    @property
    def actor(self) -> str:
        """The audit log's actor for this principal: ``token:<name>``."""
        return f"token:{self.name}"


@dataclass(frozen=True)
class TokenRecord:
    """One row of the ``tokens`` table (never the token itself)."""

    name: str
    role: Role
    created_at: dt.datetime
    revoked: bool
    last_used_at: dt.datetime | None


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(db: Database, name: str, role: Role | str, *, audit: Any = None, actor: str | None = None) -> str:
    """Create a token called ``name`` with ``role``; returns the token, which is stored only as a hash.

    Args:
        db: The registry's :class:`~edgeml.fleet.store.db.Database`.
        name: A unique name (letters, digits, ``.``, ``_``, ``-``; up to 64).
        role: A :class:`Role` or its name.
        audit: An :class:`~edgeml.fleet.audit.log.AuditLog` to record ``token.create`` in, in the same transaction.
        actor: Who creates it (for the audit log).

    Raises:
        ConfigError: A bad name or role.
        RegistryError: A token of that name exists (revoked or not), or the database failed.
    """
    role = role if isinstance(role, Role) else Role.parse(role)
    if not _NAME.fullmatch(name):
        raise ConfigError(f"bad token name {name!r}", hint="use up to 64 letters, digits, '.', '_' or '-'")
    token = _PREFIX + secrets.token_urlsafe(32)
    t = schema.tokens
    with _transaction(db, audit) as conn:
        if conn.execute(sa.select(t.c.id).where(t.c.name == name)).scalar() is not None:
            raise RegistryError(f"a token named {name!r} exists", hint="token names are never reused; choose another")
        conn.execute(t.insert().values(name=name, role=role.label, token_hash=_hash(token), created_at=utcnow(),
                                       revoked=False))
        if audit is not None:
            audit.append(actor or "unknown", "token.create", name, {"role": role.label}, conn=conn)
    return token


def revoke_token(db: Database, name: str, *, audit: Any = None, actor: str | None = None) -> None:
    """Revoke the token called ``name``: it is refused from now on.

    Args:
        db: The registry's :class:`~edgeml.fleet.store.db.Database`.
        name: The token's name.
        audit: An :class:`~edgeml.fleet.audit.log.AuditLog` to record ``token.revoke`` in, in the same transaction.
        actor: Who revokes it (for the audit log).

    Raises:
        RegistryError: No token has that name, or the database failed.
    """
    t = schema.tokens
    with _transaction(db, audit) as conn:
        if conn.execute(t.update().where(t.c.name == name).values(revoked=True)).rowcount != 1:
            raise RegistryError(f"no token named {name!r}", hint="list them with `edgeml fleet tokens ls DIR`")
        if audit is not None:
            audit.append(actor or "unknown", "token.revoke", name, {}, conn=conn)


def _transaction(db: Database, audit: Any) -> Any:
    return audit.transaction() if audit is not None else db.transaction()


def list_tokens(db: Database) -> list[TokenRecord]:
    """Every token, in creation order.

    Raises:
        RegistryError: The database failed.
    """
    t = schema.tokens
    with db.transaction() as conn:
        rows = conn.execute(sa.select(t).order_by(t.c.id)).mappings().all()
    return [TokenRecord(r["name"], Role.parse(r["role"]), r["created_at"], bool(r["revoked"]), r["last_used_at"])
            for r in rows]


#: How often a token's use is written (``last_used_at``): reading the API must not mean writing the database.
USE_RECORDED_EVERY = dt.timedelta(minutes=1)


def authenticate(db: Database, token: str | None) -> Principal:
    """Who holds ``token``; records when it was last used (at most once per :data:`USE_RECORDED_EVERY`).

    Raises:
        AuthError: The token is missing, unknown or revoked.
        RegistryError: The database failed.
    """
    if not token:
        raise AuthError("no operator token", hint="send 'Authorization: Bearer <token>' (edgeml fleet tokens create)")
    digest = _hash(token)
    t = schema.tokens
    with db.transaction() as conn:
        row = conn.execute(sa.select(t.c.name, t.c.role, t.c.token_hash, t.c.revoked, t.c.last_used_at)
                           .where(t.c.token_hash == digest)).first()
        if row is None or not hmac.compare_digest(str(row.token_hash), digest):
            raise AuthError("unknown operator token")
        if row.revoked:
            raise AuthError(f"operator token {row.name!r} is revoked")
        now = utcnow()
        last = as_utc(row.last_used_at)
        if last is None or now - last >= USE_RECORDED_EVERY:  # not a write per request (8 per dashboard refresh)
            conn.execute(t.update().where((t.c.token_hash == digest) & (
                t.c.last_used_at.is_(None) | (t.c.last_used_at < now - USE_RECORDED_EVERY))).values(last_used_at=now))
    return Principal(str(row.name), Role.parse(row.role))


def require(principal: Principal, role: Role) -> None:
    """Refuse ``principal`` unless its role is ``role`` or higher.

    Raises:
        ForbiddenError: Its role is lower.
    """
    if principal.role < role:
        raise ForbiddenError(f"token {principal.name!r} is a {principal.role.label}; this needs {role.label}")


def bearer_token(headers: Mapping[str, str]) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None.

    Args:
        headers: The request's headers: a case-insensitive mapping, or a dict with lower-cased names.
    """
    scheme, _, token = (headers.get("authorization") or "").strip().partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


def authorize(db: Database, headers: Mapping[str, str], role: Role) -> Principal:
    """Who sent a request with ``headers``, if their bearer token has ``role`` or higher.

    Raises:
        AuthError: The token is missing, unknown or revoked (401).
        ForbiddenError: Its role is lower (403).
        RegistryError: The database failed (503).
    """
    principal = authenticate(db, bearer_token(headers))
    require(principal, role)
    return principal


def read_secret(path: Path, what: str) -> str:
    """The secret in the file ``path`` (its first line, stripped): a token or a password.

    Args:
        path: A file that only its owner can read or write (mode 0600 or 0400).
        what: What it holds, for messages (e.g. ``"operator token"``).

    Raises:
        ConfigError: The file cannot be read, is empty, or others may read or change it.
    """
    try:
        mode = path.stat().st_mode
        if not stat.S_ISREG(mode):
            raise ConfigError(f"{path} is not a regular file; it cannot hold the {what}")
        if mode & 0o077:
            raise ConfigError(f"{path} holds the {what} but others may read or change it "
                              f"(mode {stat.S_IMODE(mode):o})", hint=f"chmod 600 {path}")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the {what} from {path}: {getattr(exc, 'strerror', None) or exc}",
                          hint="give a file that holds only the secret, readable by you alone") from exc
    secret = text.strip().splitlines()[0].strip() if text.strip() else ""
    if not secret:
        raise ConfigError(f"{path} is empty; it should hold the {what}")
    return secret


def operator_token(token_file: Path | None = None) -> str:
    """The remote CLI's operator token: the first line of ``token_file``, else ``$EDGEML_TOKEN``.

    Raises:
        AuthError: Neither is given.
        ConfigError: ``token_file`` cannot be used (see :func:`read_secret`).
    """
    if token_file is not None:
        return read_secret(Path(token_file), "operator token")
    token = os.environ.get(ENV_TOKEN, "").strip()
    if not token:
        raise AuthError("no operator token for the remote fleet server",
                        hint=f"set {ENV_TOKEN} or give --token-file FILE (create a token with "
                             "`edgeml fleet tokens create DIR NAME --role ...`)")
    return token
