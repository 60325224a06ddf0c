"""Operator tokens: who may call the fleet server's HTTP API (and the dashboard, and the remote CLI).

A token is ``edgeml_`` followed by 32 random bytes, URL-safe base64. It is shown once, when it is created;
the ``tokens`` table keeps only its sha256, with a unique name and a :class:`Role`. Roles are ordered:
``viewer`` reads, ``operator`` also acts on the fleet (rollouts: start, pause, abort; rollbacks), ``admin``
also manages keys, devices and tokens. A request sends ``Authorization: Bearer <token>``;
:func:`authorized` wraps an :class:`~edgeml.fleet.http_server.HttpServer` route so that it answers 401 to
a missing, unknown or revoked token and 403 to a role below the route's, as JSON
(``{"error": ..., "status": ...}``). The remote CLI reads its token from ``$EDGEML_TOKEN``
(:func:`remote_headers`).

Tokens are looked up by their hash, then compared with :func:`hmac.compare_digest`: what a client can time
is an index lookup on a sha256, which tells nothing about the token's characters.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edgeml.errors import ConfigError, EdgeMLError, RegistryError
from edgeml.fleet.db import utcnow
from edgeml.fleet.http_server import Handler, Request, Response

__all__ = [
    "ENV_TOKEN",
    "AuthError",
    "AuthorizedHandler",
    "ForbiddenError",
    "Principal",
    "Role",
    "TokenRecord",
    "authenticate",
    "authorized",
    "bearer_token",
    "create_token",
    "list_tokens",
    "remote_headers",
    "require",
    "revoke_token",
]

#: The environment variable holding the remote CLI's operator token.
ENV_TOKEN = "EDGEML_TOKEN"
_PREFIX = "edgeml_"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class AuthError(EdgeMLError):
    """A request without a valid operator token: missing, unknown or revoked (HTTP 401)."""

    status = 401


class ForbiddenError(AuthError):
    """A valid token whose role is too low for what it asked (HTTP 403)."""

    status = 403


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



def create_token(db: Any, name: str, role: Role | str, *, audit: Any = None, actor: str | None = None) -> str:
    """Create a token called ``name`` with ``role``; returns the token, which is stored only as a hash.

    Args:
        db: The registry's :class:`~edgeml.fleet.db.Database`.
        name: A unique name (letters, digits, ``.``, ``_``, ``-``; up to 64).
        role: A :class:`Role` or its name.
        audit: An :class:`~edgeml.fleet.audit.AuditLog` to record ``token.create`` in, in the same transaction.
        actor: Who creates it (for the audit log).

    Raises:
        ConfigError: A bad name or role.
        RegistryError: A token of that name exists (revoked or not), or the database failed.
    """
    role = role if isinstance(role, Role) else Role.parse(role)
    if not _NAME.fullmatch(name):
        raise ConfigError(f"bad token name {name!r}", hint="use up to 64 letters, digits, '.', '_' or '-'")
    token = _PREFIX + secrets.token_urlsafe(32)
    t = db.tables["tokens"]
    with _transaction(db, audit) as conn:
        if conn.execute(db.sa.select(t.c.id).where(t.c.name == name)).scalar() is not None:
            raise RegistryError(f"a token named {name!r} exists", hint="token names are never reused; choose another")
        conn.execute(t.insert().values(name=name, role=role.label, token_hash=_hash(token), created_at=utcnow(),
                                       revoked=False))
        if audit is not None:
            audit.append(actor or "unknown", "token.create", name, {"role": role.label}, conn=conn)
    return token


def revoke_token(db: Any, name: str, *, audit: Any = None, actor: str | None = None) -> None:
    """Revoke the token called ``name``: it is refused from now on.

    Args:
        db: The registry's :class:`~edgeml.fleet.db.Database`.
        name: The token's name.
        audit: An :class:`~edgeml.fleet.audit.AuditLog` to record ``token.revoke`` in, in the same transaction.
        actor: Who revokes it (for the audit log).

    Raises:
        RegistryError: No token has that name, or the database failed.
    """
    t = db.tables["tokens"]
    with _transaction(db, audit) as conn:
        if conn.execute(t.update().where(t.c.name == name).values(revoked=True)).rowcount != 1:
            raise RegistryError(f"no token named {name!r}", hint="list them with `edgeml fleet tokens ls DIR`")
        if audit is not None:
            audit.append(actor or "unknown", "token.revoke", name, {}, conn=conn)


def _transaction(db: Any, audit: Any) -> Any:
    return audit.transaction() if audit is not None else db.transaction()


def list_tokens(db: Any) -> list[TokenRecord]:
    """Every token, in creation order.

    Raises:
        RegistryError: The database failed.
    """
    t = db.tables["tokens"]
    with db.transaction() as conn:
        rows = conn.execute(db.sa.select(t).order_by(t.c.id)).mappings().all()
    return [TokenRecord(r["name"], Role.parse(r["role"]), r["created_at"], bool(r["revoked"]), r["last_used_at"])
            for r in rows]


def authenticate(db: Any, token: str | None) -> Principal:
    """Who holds ``token``; records when it was last used.

    Raises:
        AuthError: The token is missing, unknown or revoked.
        RegistryError: The database failed.
    """
    if not token:
        raise AuthError("no operator token", hint="send 'Authorization: Bearer <token>' (edgeml fleet tokens create)")
    digest = _hash(token)
    t = db.tables["tokens"]
    with db.transaction() as conn:
        row = conn.execute(db.sa.select(t.c.name, t.c.role, t.c.token_hash, t.c.revoked)
                           .where(t.c.token_hash == digest)).first()
        if row is None or not hmac.compare_digest(str(row.token_hash), digest):
            raise AuthError("unknown operator token")
        if row.revoked:
            raise AuthError(f"operator token {row.name!r} is revoked")
        conn.execute(t.update().where(t.c.token_hash == digest).values(last_used_at=utcnow()))
    return Principal(str(row.name), Role.parse(row.role))


def require(principal: Principal, role: Role) -> None:
    """Refuse ``principal`` unless its role is ``role`` or higher.

    Raises:
        ForbiddenError: Its role is lower.
    """
    if principal.role < role:
        raise ForbiddenError(f"token {principal.name!r} is a {principal.role.label}; this needs {role.label}")


def bearer_token(headers: dict[str, str]) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (names lower-cased), or None."""
    scheme, _, token = headers.get("authorization", "").strip().partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


#: A route handler that is told who called it.
AuthorizedHandler = Callable[[Request, Principal], Response]


def authorized(db: Any, role: Role) -> Callable[[AuthorizedHandler], Handler]:
    """Wrap a handler so that it runs only for a bearer token of ``role`` or higher.

    Usage: ``server.add_route("POST", pattern, authorized(db, Role.OPERATOR)(handler))``, where
    ``handler(request, principal)`` returns a :class:`Response`. Refusals are JSON
    ``{"error": ..., "status": ...}``: 401 (with ``WWW-Authenticate: Bearer``) for a missing, unknown or
    revoked token, 403 for a role too low, 503 when the database cannot be reached.

    Args:
        db: The registry's :class:`~edgeml.fleet.db.Database`.
        role: The lowest role allowed.
    """

    def wrap(handler: AuthorizedHandler) -> Handler:
        def guarded(request: Request) -> Response:
            try:
                principal = authenticate(db, bearer_token(request.headers))
                require(principal, role)
            except AuthError as exc:
                response = Response.json({"error": exc.message, "status": exc.status}, exc.status)
                challenge = {"WWW-Authenticate": 'Bearer realm="edgeml"'} if exc.status == 401 else {}
                return dataclasses.replace(response, headers=challenge)
            except RegistryError as exc:
                return Response.json({"error": exc.message, "status": 503}, 503)
            return handler(request, principal)

        guarded.__name__ = getattr(handler, "__name__", "guarded")
        guarded.__doc__ = handler.__doc__
        return guarded

    return wrap


def remote_headers(token: str | None = None) -> dict[str, str]:
    """The headers with which the CLI calls a remote fleet server: the token given, else ``$EDGEML_TOKEN``.

    Raises:
        AuthError: No token was given and ``$EDGEML_TOKEN`` is not set.
    """
    token = token or os.environ.get(ENV_TOKEN)
    if not token:
        raise AuthError("no operator token for the remote fleet server",
                        hint=f"set {ENV_TOKEN} (create one with `edgeml fleet tokens create DIR NAME --role ...`)")
    return {"Authorization": f"Bearer {token}"}
