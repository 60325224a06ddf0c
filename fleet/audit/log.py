"""The fleet's audit log: an append-only hash chain of fleet actions, its heads signed by an online key.

Every fleet action (:data:`ACTIONS`) appends one row to the ``audit`` table: ``seq`` (1, 2, 3... without
gaps), ``at`` (UTC), the authenticated ``actor`` (``token:<name>`` over HTTP, ``$EDGEML_ACTOR`` or
``local:<os user>`` from the local CLI), ``action``, ``subject``, ``details`` (JSON) and
``hash = sha256(canonical JSON of seq, at, actor, action, subject, details, prev_hash)``, where
``prev_hash`` is the previous row's hash (:data:`GENESIS` for seq 1).

Signed heads: after every append, ``(seq, hash, signed_at)`` of the new last row is signed with the
registry's online audit key and stored twice: in the ``audit_heads`` table, in the same transaction as the
row, and, once that transaction has committed, as one JSON line appended to ``DIR/audit/heads.log``.
Fleet actions are human-scale (publishes, enrollments), so signing every append costs nothing noticeable
(one Ed25519 signature) and leaves no unsigned tail. The file is what catches a truncation: whoever can
edit the database can also delete its last rows together with their heads, but the file still names the
last seq. Keep the file append-only (``chattr +a``) or ship its lines off the server (syslog) so that the
same person cannot also cut it.

The audit key: ``DIR/keys/audit.pem``, an Ed25519 key like the registry's other online keys, created on
first use. Verification uses its public key.

Concurrency: appends are serialized by the database (``BEGIN IMMEDIATE`` or the write lock on SQLite, a
transaction-scoped advisory lock on PostgreSQL) before the last seq is read, so concurrent appends from
many processes give one gapless chain.

:meth:`AuditLog.verify` recomputes the chain and checks every signed head; the first problem is reported
with its kind: ``"edit"`` (a row's content no longer matches its hash, or a signed head's hash),
``"deletion"`` (a gap in seq, or a row whose prev_hash is not its predecessor's hash), ``"truncation"``
(a signed head names a seq beyond the last row), ``"bad-signature"`` (a head that the audit key did not
sign) or ``"uncovered"`` (entries after the last signed head, or a log with entries and no head at all).

Coverage: whoever can write the database alone can append a row with a correctly chained hash, and can
delete heads, but cannot sign. So the last entry must be covered by a valid signed head (in the database or
the file), and a log with entries must have heads. Honest operation always leaves the log covered: every
append signs its head in the same transaction as the row, and :meth:`AuditLog.sign_head` (the server's
timer, ``audit_head_s``) only re-signs a head that is already covered. Neither :meth:`AuditLog.append` nor
:meth:`AuditLog.sign_head` signs over an uncovered tail: they refuse (``RegistryError``), since a new head
would launder the forged rows.

Verifying while others append: :meth:`AuditLog.verify` reads the heads file first, then the entries and the
database's heads in one read snapshot (a deferred ``BEGIN`` on SQLite in WAL mode, ``REPEATABLE READ`` on
PostgreSQL). A line reaches the file only after its transaction committed, so every entry the file names is
in the snapshot, and every entry in the snapshot has its database head there too: a concurrent append can
neither look uncovered nor look truncated. The file can lag the database (a crash between the commit and the
write), which verify accepts: the database's head covers those entries.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import getpass
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeml.errors import MetadataError, RegistryError, StorageError
from edgeml.fleet.audit.chain import (
    ACTIONS,
    GENESIS,
    AuditEntry,
    AuditReport,
    HeadSigner,
    Problem,
    SignedHead,
    as_utc_time,
    check_chain,
    check_entry,
    entry_hash,
)
from edgeml.fleet.store import schema
from edgeml.fleet.store.schema import sa

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from edgeml.fleet.store.db import Database

__all__ = [
    "ACTIONS",
    "ENV_ACTOR",
    "GENESIS",
    "AuditEntry",
    "AuditLog",
    "AuditReport",
    "HeadSigner",
    "Problem",
    "SignedHead",
    "check_chain",
    "entry_hash",
    "local_actor",
    "open_audit",
    "record",
]
#: The environment variable naming the actor of local CLI actions (default ``local:<os user>``).
ENV_ACTOR = "EDGEML_ACTOR"
_PG_LOCK_KEY = 0x6564676D61  # pg_advisory_xact_lock key of audit appends ("edgma")


def local_actor() -> str:
    """The actor of a local CLI action: ``$EDGEML_ACTOR``, else ``local:<os user>``."""
    actor = os.environ.get(ENV_ACTOR)
    if actor:
        return actor
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry for the uid (containers)
        user = str(os.getuid())
    return f"local:{user}"


def _in_transaction(conn: Connection) -> bool:
    """Whether pysqlite has begun a transaction on ``conn`` (it begins lazily, before the first write)."""
    return bool(getattr(conn.connection.dbapi_connection, "in_transaction", False))


class AuditLog:
    """The audit log in ``db``, its heads signed by ``signer`` and appended to ``heads_file``.

    Args:
        db: The registry's :class:`~edgeml.fleet.store.db.Database`.
        signer: The :class:`HeadSigner` of the audit key (None: no key yet; the log can be read, and
            verified while it is empty, but not appended to).
        heads_file: The append-only file of signed heads (None: heads go to the database only, and a
            truncation that also removes the heads' rows goes unnoticed).
    """

    def __init__(self, db: Database, signer: HeadSigner | None, heads_file: Path | None = None) -> None:
        self.db = db
        self.signer = signer
        self.heads_file = heads_file
        self._pending: list[SignedHead] = []

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        """A database transaction for appends; their heads go to the heads file once it has committed."""
        try:
            with self.db.transaction() as conn:
                yield conn
        except BaseException:
            self._pending.clear()
            raise
        self.flush_heads()

    def append(self, actor: str, action: str, subject: str, details: dict[str, Any] | None = None, *,
               conn: Connection | None = None) -> AuditEntry:
        """Append one entry and sign the new head.

        With ``conn`` the entry joins the caller's transaction: call :meth:`flush_heads` after it commits
        (or use :meth:`transaction`, which does). Without, the entry is committed in its own transaction.

        Args:
            actor: Who did it (``token:<name>``, ``local:<user>``).
            action: One of :data:`ACTIONS`.
            subject: What it was done to.
            details: JSON-serializable facts about it.
            conn: A connection inside a transaction of :attr:`db` (None: a new transaction).

        Raises:
            ConfigError: An unknown action, an empty actor, or details that are not JSON.
            RegistryError: The database failed; nothing was appended.
        """
        if conn is None:
            with self.transaction() as own:
                return self.append(actor, action, subject, details, conn=own)
        doc = check_entry(actor, action, subject, details)
        self._lock(conn)
        t = schema.audit
        last = conn.execute(sa.select(t.c.seq, t.c.hash).order_by(t.c.seq.desc()).limit(1)).first()
        if last is not None:
            self._check_covered(conn, int(last[0]), str(last[1]))
        seq, prev = (int(last[0]) + 1, str(last[1])) if last is not None else (1, GENESIS)
        at = dt.datetime.now(dt.timezone.utc)
        digest = entry_hash(seq, at, actor, action, subject, doc, prev)
        conn.execute(t.insert().values(seq=seq, at=at, actor=actor, action=action, subject=subject, details=doc,
                                       prev_hash=prev, hash=digest))
        self._store_head(conn, self._key().sign(seq, digest))
        return AuditEntry(seq, at, actor, action, subject, doc, prev, digest)

    def sign_head(self) -> SignedHead | None:
        """Sign the current head again (e.g. on a timer, to show when it was last seen); None: log empty.

        Only a head that a valid signature already covers is signed again: a row appended outside edgeml stays
        uncovered, for :meth:`verify` to report.

        Raises:
            RegistryError: The database failed, or the last entry is covered by no signed head.
        """
        with self.transaction() as conn:
            self._lock(conn)
            t = schema.audit
            last = conn.execute(sa.select(t.c.seq, t.c.hash).order_by(t.c.seq.desc()).limit(1)).first()
            if last is None:
                return None
            self._check_covered(conn, int(last[0]), str(last[1]))
            head = self._key().sign(int(last[0]), str(last[1]))
            self._store_head(conn, head)
        return head

    def _check_covered(self, conn: Connection, seq: int, hash_: str) -> None:
        """Refuse to sign over ``(seq, hash_)``, the last row, unless the latest head signed it (under the lock).

        Every append and re-signing stores its head in the row's transaction, so honestly the latest head always
        covers the last row; a row inserted with write access to the database alone never is.
        """
        h = schema.audit_heads
        row = conn.execute(sa.select(h).order_by(h.c.id.desc()).limit(1)).mappings().first()
        head = None if row is None else SignedHead(int(row["seq"]), row["hash"], as_utc_time(row["signed_at"]),
                                                   row["keyid"], row["signature"])
        if head is None or (head.seq, head.hash) != (seq, hash_) or not self._key().check(head):
            raise RegistryError(f"the audit log's last entry (seq {seq}) is covered by no signed head: it was "
                                "written outside edgeml, or its head was deleted; refusing to sign over it",
                                hint="run `edgeml fleet audit verify DIR`, and remove the entries it names once "
                                     "they are understood")

    def flush_heads(self) -> None:
        """Append the heads signed in committed transactions to the heads file.

        Raises:
            StorageError: The file cannot be written.
        """
        pending, self._pending = self._pending, []
        if self.heads_file is None or not pending:
            return
        try:
            self.heads_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.heads_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                os.write(fd, "".join(h.to_line() for h in pending).encode())
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise StorageError(f"cannot append to {self.heads_file}: {exc.strerror}") from exc

    def _store_head(self, conn: Connection, head: SignedHead) -> None:
        conn.execute(schema.audit_heads.insert().values(
            seq=head.seq, hash=head.hash, signed_at=head.signed_at, keyid=head.keyid, signature=head.signature))
        self._pending.append(head)

    def _lock(self, conn: Connection) -> None:
        """Serialize appends before the last seq is read (held until the transaction ends)."""
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
        elif conn.dialect.name == "sqlite":
            if not _in_transaction(conn):
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            else:  # a write takes SQLite's write lock, even one that changes no row
                conn.exec_driver_sql("UPDATE audit SET seq = seq WHERE 1 = 0")

    def entries(self, *, limit: int | None = None) -> list[AuditEntry]:
        """The entries in seq order (with ``limit``: the last ``limit`` of them).

        Raises:
            RegistryError: The database failed.
        """
        with self.db.transaction() as conn:
            return self._entries(conn, limit)

    def _entries(self, conn: Connection, limit: int | None = None) -> list[AuditEntry]:
        t = schema.audit
        query = sa.select(t).order_by(t.c.seq.desc() if limit else t.c.seq)
        if limit:
            query = query.limit(limit)
        rows = conn.execute(query).mappings().all()
        entries = [AuditEntry(int(r["seq"]), as_utc_time(r["at"]), r["actor"], r["action"], r["subject"], r["details"],
                              r["prev_hash"], r["hash"]) for r in rows]
        return sorted(entries, key=lambda e: e.seq)

    def heads(self) -> tuple[list[SignedHead], list[SignedHead | int]]:
        """``(heads in the database, heads in the file)``; an unparseable file line appears as its line number.

        Raises:
            RegistryError: The database failed.
            StorageError: The heads file exists but cannot be read.
        """
        in_file = self._file_heads()
        with self.db.transaction() as conn:
            return self._db_heads(conn), in_file

    def _db_heads(self, conn: Connection) -> list[SignedHead]:
        t = schema.audit_heads
        rows = conn.execute(sa.select(t).order_by(t.c.id)).mappings().all()
        return [SignedHead(int(r["seq"]), r["hash"], as_utc_time(r["signed_at"]), r["keyid"], r["signature"])
                for r in rows]

    def _file_heads(self) -> list[SignedHead | int]:
        in_file: list[SignedHead | int] = []
        if self.heads_file is not None:
            try:
                lines = self.heads_file.read_text().splitlines() if self.heads_file.exists() else []
            except OSError as exc:
                raise StorageError(f"cannot read {self.heads_file}: {exc.strerror}") from exc
            for number, line in enumerate(lines, 1):
                try:
                    in_file.append(SignedHead.from_line(line))
                except (ValueError, KeyError, TypeError):
                    in_file.append(number)
        return in_file

    def verify(self) -> AuditReport:
        """Recompute the chain and check every signed head (see the module docstring for the kinds).

        Safe while others append: the heads file is read first, then the entries and the database's heads in
        one read snapshot (see the module docstring).

        Raises:
            RegistryError: The database failed.
            StorageError: The heads file cannot be read.
        """
        in_file = self._file_heads()  # first: a line is written only after its entry committed
        with self.db.transaction() as conn:
            self._snapshot(conn)
            entries, in_db = self._entries(conn), self._db_heads(conn)
        if self.signer is None and not (entries or in_db or in_file):
            return AuditReport(0, 0, 0)
        return check_chain(entries, in_db, in_file, self._key())

    @staticmethod
    def _snapshot(conn: Connection) -> None:
        """Make ``conn``'s reads one consistent snapshot (the first statement of its transaction)."""
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        elif conn.dialect.name == "sqlite" and not _in_transaction(conn):
            conn.exec_driver_sql("BEGIN")  # pysqlite begins only before writes; in WAL mode this is a snapshot

    def _key(self) -> HeadSigner:
        if self.signer is None:
            raise MetadataError("the audit key (DIR/keys/audit.pem) is missing",
                                hint="restore it from the registry's backup; without it no head can be checked")
        return self.signer


def open_audit(registry_dir: Path, *, db_url: str | None = None, create_key: bool = True,
               db: Database | None = None) -> AuditLog:
    """The audit log of the registry in ``registry_dir``: its database, ``keys/audit.pem``, ``audit/heads.log``.

    Close it with ``log.db.close()``; pass ``db`` to use a :class:`~edgeml.fleet.store.db.Database` already open
    (e.g. to append inside a transaction of it, with :meth:`AuditLog.transaction`).

    Raises:
        RegistryError: ``registry_dir`` is not a registry.
        MetadataError: The audit key is unreadable.
    """
    from edgeml.fleet.registry.repository import Registry

    registry = Registry(registry_dir, db_url=db_url)
    exists = (registry.dir / "keys" / "audit.pem").exists()
    signer = HeadSigner.for_registry(registry.dir, create=create_key) if create_key or exists else None
    return AuditLog(db if db is not None else registry.database(), signer, registry.dir / "audit" / "heads.log")


def record(registry_dir: Path, actor: str, action: str, subject: str, details: dict[str, Any] | None = None, *,
           db_url: str | None = None) -> AuditEntry:
    """Append one entry to a registry's audit log, in its own transaction, and sign the new head.

    Args:
        registry_dir: The registry directory.
        actor: Who did it (:func:`local_actor` for the local CLI, ``Principal.actor`` over HTTP).
        action: One of :data:`ACTIONS`.
        subject: What it was done to.
        details: JSON-serializable facts about it.
        db_url: The registry database's URL (default: as
            :class:`~edgeml.fleet.registry.repository.Registry` resolves it).

    Raises:
        ConfigError: An unknown action or details that are not JSON.
        RegistryError: The registry or its database failed.
        MetadataError: The audit key cannot be read.
    """
    log = open_audit(registry_dir, db_url=db_url)
    try:
        return log.append(actor, action, subject, details)
    finally:
        log.db.close()

