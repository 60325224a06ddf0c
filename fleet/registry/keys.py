"""Key files of a registry: online keys in ``DIR/keys/``, root keys in ``DIR/offline-keys/``.

Keys are unencrypted PKCS#8 PEM files (mode 0600), one per key. The root keys are written to a separate
directory only so that ``edgeml fleet init`` can hand them over: they must be moved off the server
(to an offline machine or hardware tokens) before the registry goes into service.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner, Signer

from edgeml.errors import MetadataError, StorageError
from edgeml.fsutil import atomic_write_bytes

__all__ = ["OFFLINE_NOTE", "generate", "load_root_signers", "load_signer", "save_signer"]

OFFLINE_NOTE = """\
!!! THESE ARE THE REGISTRY'S ROOT KEYS. THEY DO NOT BELONG ON THE SERVER. !!!

Whoever holds the root keys can make every device trust anything. Move this directory to an offline
machine (or hardware tokens) now, keep a backup, and bring the keys back only to rotate keys
(`edgeml fleet keys rotate root DIR --offline-keys PATH`).
"""


def generate() -> CryptoSigner:
    """A new Ed25519 signer."""
    return CryptoSigner.generate_ed25519()


def save_signer(signer: CryptoSigner, path: Path) -> None:
    """Write ``signer``'s private key to ``path`` (PEM, mode 0600), atomically.

    Raises:
        StorageError: The file cannot be written.
    """
    atomic_write_bytes(path, signer.private_bytes)
    try:
        os.chmod(path, 0o600)
    except OSError as exc:
        raise StorageError(f"cannot restrict permissions of {path}: {exc.strerror}") from exc


def load_signer(path: Path) -> Signer:
    """Load one private key file.

    Raises:
        MetadataError: The file is missing or is not a PEM private key.
    """
    try:
        key = load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise MetadataError(f"key file {path} is missing", hint="restore it from the registry's backup") from exc
    except (OSError, ValueError, TypeError) as exc:
        raise MetadataError(f"key file {path} is not a readable PEM private key: {exc}") from exc
    try:
        return CryptoSigner(key)
    except (ValueError, TypeError) as exc:
        raise MetadataError(f"key file {path} holds an unsupported key type") from exc


def load_root_signers(directory: Path) -> list[Signer]:
    """Load every ``root-*.pem`` in ``directory``.

    Raises:
        MetadataError: There are none, or one cannot be read.
    """
    files = sorted(directory.glob("root-*.pem")) if directory.is_dir() else []
    if not files:
        raise MetadataError(f"no root keys (root-*.pem) in {directory}",
                            hint="pass the offline key directory with --offline-keys")
    return [load_signer(f) for f in files]
