"""The audit log's rules, with no database: entries, their hash chain, signed heads, and verification.

:func:`entry_hash` and :func:`check_chain` are the whole integrity check (the first problem found, by kind);
:class:`HeadSigner` signs and checks heads with the registry's audit key. :mod:`.log` stores entries and heads
(see its docstring for the design: coverage, concurrency, verifying while others append).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeml.errors import ConfigError, StorageError

__all__ = [
    "ACTIONS",
    "GENESIS",
    "AuditEntry",
    "AuditReport",
    "HeadSigner",
    "Problem",
    "SignedHead",
    "check_chain",
    "as_utc_time",
    "check_entry",
    "entry_hash",
]

#: Every action the audit log records.
ACTIONS = ("publish", "keys.rotate", "device.enroll", "device.revoke", "rollout.start", "rollout.pause",
           "rollout.resume", "rollout.abort", "rollback", "token.create", "token.revoke")
#: The prev_hash of seq 1.
GENESIS = "0" * 64
_HEAD_CONTEXT = b"edgeml-audit-head/1\n"  # signed before the head's JSON, so no other message verifies


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def as_utc_time(value: dt.datetime) -> dt.datetime:
    """``value`` as an aware UTC datetime (SQLite gives naive datetimes back: they were stored in UTC)."""
    return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value.astimezone(dt.timezone.utc)


def _iso(value: dt.datetime) -> str:
    return as_utc_time(value).isoformat(timespec="microseconds")



@dataclass(frozen=True)
class AuditEntry:
    """One row of the audit log.

    Attributes:
        seq: Its position in the chain, from 1.
        at: When it was appended (UTC).
        actor: Who did it (``token:<name>``, ``local:<user>``).
        action: One of :data:`ACTIONS`.
        subject: What it was done to (a target path, a device id, a token name...).
        details: More about it (JSON).
        prev_hash: The previous entry's hash (:data:`GENESIS` for seq 1).
        hash: :func:`entry_hash` of the fields above.
    """

    seq: int
    at: dt.datetime
    actor: str
    action: str
    subject: str
    details: dict[str, Any]
    prev_hash: str
    hash: str


def entry_hash(seq: int, at: dt.datetime, actor: str, action: str, subject: str, details: dict[str, Any],
               prev_hash: str) -> str:
    """The sha256 (hex) of an entry: over the canonical JSON of its fields and the previous hash."""
    doc = {"seq": seq, "at": _iso(at), "actor": actor, "action": action, "subject": subject,
           "details": details, "prev_hash": prev_hash}
    return hashlib.sha256(_canonical(doc)).hexdigest()


@dataclass(frozen=True)
class SignedHead:
    """A signature over the chain's head: the last entry's seq and hash at ``signed_at``."""

    seq: int
    hash: str
    signed_at: dt.datetime
    keyid: str
    signature: str

    def message(self) -> bytes:
        """The bytes that are signed."""
        return _HEAD_CONTEXT + _canonical({"seq": self.seq, "hash": self.hash, "signed_at": _iso(self.signed_at)})

    def to_line(self) -> str:
        """One line of ``heads.log`` (with its newline)."""
        doc = {"seq": self.seq, "hash": self.hash, "signed_at": _iso(self.signed_at), "keyid": self.keyid,
               "signature": self.signature}
        return _canonical(doc).decode() + "\n"

    @classmethod
    def from_line(cls, line: str) -> SignedHead:
        """Parse a ``heads.log`` line.

        Raises:
            ValueError: The line is not a signed head.
        """
        doc = json.loads(line)
        if not isinstance(doc, dict) or not isinstance(doc.get("seq"), int):
            raise ValueError("not a signed head")
        return cls(doc["seq"], str(doc["hash"]), dt.datetime.fromisoformat(doc["signed_at"]), str(doc["keyid"]),
                   str(doc["signature"]))


class HeadSigner:
    """Signs and checks chain heads with one Ed25519 key.

    Args:
        signer: A securesystemslib signer (its ``public_key`` checks signatures).
    """

    def __init__(self, signer: Any) -> None:
        self._signer = signer
        self.public_key = signer.public_key
        self.keyid = str(self.public_key.keyid)

    @classmethod
    def for_registry(cls, registry_dir: Path, *, create: bool = True) -> HeadSigner:
        """The audit key of a registry, ``DIR/keys/audit.pem``; created on first use when ``create``.

        Raises:
            MetadataError: The key file is missing (and not ``create``) or unreadable.
            StorageError: It cannot be created.
        """
        from edgeml.fleet.registry import keys

        path = Path(registry_dir) / "keys" / "audit.pem"
        if create and not path.exists():
            _create_key_once(path, keys.generate().private_bytes)
        return cls(keys.load_signer(path))

    def sign(self, seq: int, hash_: str, signed_at: dt.datetime | None = None) -> SignedHead:
        """Sign ``(seq, hash)`` now (or at ``signed_at``)."""
        unsigned = SignedHead(seq, hash_, as_utc_time(signed_at or dt.datetime.now(dt.timezone.utc)), self.keyid, "")
        signature = self._signer.sign(unsigned.message())
        return SignedHead(seq, hash_, unsigned.signed_at, self.keyid, str(signature.signature))

    def check(self, head: SignedHead) -> bool:
        """Whether this key signed ``head``."""
        from securesystemslib.exceptions import Error as SslibError
        from securesystemslib.signer import Signature

        if head.keyid != self.keyid:
            return False
        try:
            self.public_key.verify_signature(Signature(head.keyid, head.signature), head.message())
        except (SslibError, ValueError):
            return False
        return True


def _create_key_once(path: Path, pem: bytes) -> None:
    """Write ``pem`` to ``path`` (0600) unless a concurrent creator got there first."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
            fh.flush()
            os.fsync(fh.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)  # atomic create-if-absent: the first key wins
    except OSError as exc:
        raise StorageError(f"cannot create the audit key {path}: {exc.strerror}") from exc
    finally:
        tmp.unlink(missing_ok=True)


@dataclass(frozen=True)
class Problem:
    """One thing :meth:`AuditLog.verify` found wrong: the seq, the kind and a one-line reason."""

    seq: int
    kind: str
    reason: str


@dataclass(frozen=True)
class AuditReport:
    """The result of :meth:`AuditLog.verify`.

    Attributes:
        entries: How many rows the chain has.
        last_seq: The last row's seq (0: none).
        heads_checked: How many signed heads (database and file) were checked.
        problems: Everything found wrong, lowest seq first (empty: the log is intact).
    """

    entries: int
    last_seq: int
    heads_checked: int
    problems: tuple[Problem, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        """Whether nothing was found wrong."""
        return not self.problems

    @property
    def kind(self) -> str | None:
        """The first problem's kind: ``"edit"``, ``"deletion"``, ``"truncation"``, ``"bad-signature"`` or
        ``"uncovered"``."""
        return self.problems[0].kind if self.problems else None

    @property
    def bad_seq(self) -> int | None:
        """The seq of the first problem."""
        return self.problems[0].seq if self.problems else None

    def summary(self) -> str:
        """One line: ``ok: ...`` or ``tampered: KIND at seq N: reason``."""
        if self.ok:
            return f"ok: {self.entries} entries, last seq {self.last_seq}, {self.heads_checked} signed heads checked"
        first = self.problems[0]
        more = f" (and {len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
        return f"tampered: {first.kind} at seq {first.seq}: {first.reason}{more}"


def check_chain(entries: list[AuditEntry], in_db: list[SignedHead], in_file: list[SignedHead | int],
                signer: HeadSigner) -> AuditReport:
    """The rules of :meth:`AuditLog.verify`, without I/O.

    Args:
        entries: The rows in seq order.
        in_db: The signed heads in the database.
        in_file: The signed heads in the heads file (an int: the number of a line that is not a head).
        signer: The audit key (only its public key is used).
    """
    problems: list[Problem] = []
    by_seq = {e.seq: e for e in entries}
    expected, prev = 1, GENESIS
    for e in entries:
        if e.seq != expected:
            problems.append(Problem(expected, "deletion", f"seq {expected}..{e.seq - 1} missing"))
        elif e.prev_hash != prev:
            problems.append(Problem(e.seq, "deletion", f"prev_hash is not seq {e.seq - 1}'s hash (rows removed "
                                                       "or re-linked)"))
        if entry_hash(e.seq, e.at, e.actor, e.action, e.subject, e.details, e.prev_hash) != e.hash:
            problems.append(Problem(e.seq, "edit", "the row's content does not match its hash"))
        expected, prev = e.seq + 1, e.hash
    last_seq = entries[-1].seq if entries else 0
    heads = [(h, "database") for h in in_db] + [(h, "heads file") for h in in_file]
    covered = 0  # the highest seq a valid head signs, with the hash it has
    for head, where in heads:
        if isinstance(head, int):
            problems.append(Problem(last_seq, "bad-signature", f"{where} line {head} is not a signed head"))
        elif not signer.check(head):
            problems.append(Problem(head.seq, "bad-signature", f"the {where}'s head for seq {head.seq} is not "
                                                               "signed by the audit key"))
        elif head.seq > last_seq:
            problems.append(Problem(last_seq + 1, "truncation", f"the {where} has a signed head at seq "
                                                                f"{head.seq}, the log ends at seq {last_seq}"))
        elif head.seq not in by_seq:
            problems.append(Problem(head.seq, "deletion", f"the {where} has a signed head at seq {head.seq}, "
                                                          "which is missing"))
        elif by_seq[head.seq].hash != head.hash:
            problems.append(Problem(head.seq, "edit", f"seq {head.seq}'s hash differs from the {where}'s "
                                                      "signed head"))
        else:
            covered = max(covered, head.seq)
    if entries and covered < last_seq:
        problems.append(_uncovered([e for e in entries if e.seq > covered], any_head=bool(heads)))
    order = {"edit": 0, "deletion": 1, "truncation": 2, "bad-signature": 3, "uncovered": 4}
    first = {(p.seq, p.kind): p for p in reversed(problems)}  # one per (seq, kind): the first found
    return AuditReport(len(entries), last_seq, len(heads), tuple(sorted(first.values(),
                                                                        key=lambda p: (p.seq, order[p.kind]))))


def _uncovered(tail: list[AuditEntry], *, any_head: bool) -> Problem:
    """The problem of entries after the last valid signed head: how many, from which seq, since when."""
    n, first = len(tail), tail[0]
    what = f"{n} entr{'y' if n == 1 else 'ies'} (seq {first.seq}" + (f"..{tail[-1].seq}" if n > 1 else "") + (
        f", appended since {_iso(first.at)})")
    if not any_head:
        return Problem(first.seq, "uncovered", f"the log has {what} and no signed head at all, in the database or "
                                               "the heads file: the heads were deleted")
    return Problem(first.seq, "uncovered", f"{what} {'is' if n == 1 else 'are'} covered by no signed head: written "
                                           "outside edgeml (with write access to the database), or their heads "
                                           "were deleted")


def check_entry(actor: str, action: str, subject: str, details: dict[str, Any] | None) -> dict[str, Any]:
    """``details`` as it will read back from the database; raises ConfigError for a bad entry."""
    if action not in ACTIONS:
        raise ConfigError(f"unknown audit action {action!r}", hint="one of: " + ", ".join(ACTIONS))
    if not actor or not isinstance(subject, str):
        raise ConfigError("an audit entry needs an actor and a subject")
    try:
        doc = json.loads(_canonical(details or {}))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"audit details must be JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise ConfigError("audit details must be a JSON object")
    return doc
