"""A/B model slots on disk: ``STATE_DIR/slots/{a,b}`` and the active-slot pointer ``slots/active.json``.

A bundle is staged by extracting it into a hidden temporary directory, fsyncing every file, and renaming
the directory over the inactive slot, so a slot is always either absent or complete. The pointer names
the serving slot, its version and the sha256 of its manifest, and is replaced through the one
atomic-write helper; :meth:`Slots.verify` re-checks a slot against the pointer before anything loads it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from edgeml import fsutil
from edgeml.bundle import MANIFEST_NAME, Bundle, Manifest, sha256_file
from edgeml.errors import BundleError, BundleIntegrityError, StorageError

__all__ = ["SLOT_NAMES", "SlotInfo", "Slots"]

SLOT_NAMES = ("a", "b")
_POINTER = "active.json"


@dataclass(frozen=True)
class SlotInfo:
    """One slot's content.

    Attributes:
        slot: ``"a"`` or ``"b"``.
        version: The model version staged in it.
        manifest_sha256: sha256 of its ``manifest.json``.
    """

    slot: str
    version: str
    manifest_sha256: str


class Slots:
    """The two slots and the pointer under ``state_dir/slots``.

    Args:
        state_dir: The agent's state directory (created if needed).
    """

    def __init__(self, state_dir: str | Path) -> None:
        self.root = Path(state_dir) / "slots"
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, slot: str) -> Path:
        if slot not in SLOT_NAMES:
            raise StorageError(f"unknown slot {slot!r}")
        return self.root / slot

    def active(self) -> SlotInfo | None:
        """The slot the pointer names, or None before the first model.

        Raises:
            StorageError: The pointer is unreadable.
        """
        try:
            raw = json.loads((self.root / _POINTER).read_bytes())
            return SlotInfo(str(raw["slot"]), str(raw["version"]), str(raw["manifest_sha256"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StorageError(f"the active-slot pointer {self.root / _POINTER} is unreadable: {exc}") from exc

    def inactive(self) -> str:
        """The slot a new model may be staged into (never the active one)."""
        current = self.active()
        return "b" if current is not None and current.slot == "a" else "a"

    def set_active(self, info: SlotInfo) -> None:
        """Point at ``info`` atomically and durably.

        Raises:
            StorageError: The pointer cannot be written.
        """
        data = {"slot": info.slot, "version": info.version, "manifest_sha256": info.manifest_sha256}
        fsutil.atomic_write_bytes(self.root / _POINTER, (json.dumps(data, sort_keys=True) + "\n").encode())

    def clear_active(self) -> None:
        """Remove the pointer (nothing serves)."""
        (self.root / _POINTER).unlink(missing_ok=True)
        fsutil.fsync_dir(self.root)

    def stage(self, bundle_path: str | Path, slot: str) -> SlotInfo:
        """Extract a verified bundle into ``slot``, replacing what was there.

        Raises:
            StorageError: ``slot`` is the active slot, or the disk refused.
            BundleError: The bundle does not extract (a hash differs, a member is unsafe).
        """
        current = self.active()
        if current is not None and current.slot == slot:
            raise StorageError(f"refusing to stage into slot {slot}: it is the active slot")
        self.discard_scratch()
        work = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.root))
        try:
            with Bundle(bundle_path) as bundle:
                bundle.extract(work)
                version = bundle.manifest.version
            _fsync_tree(work)
            dest = self.path(slot)
            if dest.exists():
                os.replace(dest, self.root / f".trash-{slot}")
                shutil.rmtree(self.root / f".trash-{slot}", ignore_errors=True)
            os.replace(work, dest)
        except OSError as exc:
            raise StorageError(f"cannot stage into slot {slot}: {exc.strerror or exc}") from exc
        finally:
            shutil.rmtree(work, ignore_errors=True)
        fsutil.fsync_dir(self.root)
        return SlotInfo(slot, version, sha256_file(self.path(slot) / MANIFEST_NAME))

    def remove(self, slot: str) -> None:
        """Delete a slot's content (never the active slot's)."""
        current = self.active()
        if current is not None and current.slot == slot:
            return
        shutil.rmtree(self.path(slot), ignore_errors=True)
        fsutil.fsync_dir(self.root)

    def discard_scratch(self) -> None:
        """Remove half-staged directories left by a crash."""
        for leftover in self.root.glob(".staging-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        for leftover in self.root.glob(".trash-*"):
            shutil.rmtree(leftover, ignore_errors=True)

    def verify(self, info: SlotInfo) -> Manifest:
        """Check that ``info.slot`` holds exactly what ``info`` says; return its manifest.

        Raises:
            BundleIntegrityError: The manifest or a file differs (a slot damaged after staging).
            BundleError: The slot is missing or its manifest is malformed.
        """
        slot_dir = self.path(info.slot)
        manifest_path = slot_dir / MANIFEST_NAME
        if not manifest_path.is_file():
            raise BundleError(f"slot {info.slot} holds no model")
        if sha256_file(manifest_path) != info.manifest_sha256:
            raise BundleIntegrityError(f"slot {info.slot}: manifest.json differs from the one staged")
        manifest = Manifest.from_dict(json.loads(manifest_path.read_bytes()))
        for name, entry in manifest.files.items():
            path = slot_dir / name
            if not path.is_file() or path.stat().st_size != entry.size or sha256_file(path) != entry.sha256:
                raise BundleIntegrityError(f"slot {info.slot}: {name} does not match its manifest hash")
        if manifest.version != info.version:
            raise BundleIntegrityError(f"slot {info.slot} holds {manifest.version}, expected {info.version}")
        return manifest


def _fsync_tree(root: Path) -> None:
    """fsync every file under ``root`` and every directory (so a rename publishes durable content)."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsutil.fsync_dir(Path(dirpath))
