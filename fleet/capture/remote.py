"""``capture ls`` and ``capture pull`` against a fleet server's URL: the operator API of :mod:`.web`.

The token, the refusal of plain ``http://`` to other hosts and of redirects are the remote CLI's
(:class:`~edgeml.fleet.operator_api.RemoteFleet`). A pulled tar is read within a size limit and unpacked
member by member, only the dataset's four regular files, into a temporary folder renamed into place.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from edgeml.errors import ConfigError, EdgeMLError
from edgeml.fleet.capture.pull import CaptureFilters, PulledDataset
from edgeml.fleet.operator_api import RemoteFleet
from edgeml.fsutil import atomic_output_dir

__all__ = ["MAX_PULL_BYTES", "remote_list", "remote_pull"]

#: Largest dataset a remote pull accepts (the tar's bytes).
MAX_PULL_BYTES = 4 * 1024**3
_MEMBERS = frozenset({"samples.npz", "provenance.jsonl", "dataset.json", "labels.csv"})


def _query(filters: CaptureFilters) -> dict[str, Any]:
    return {k: v for k, v in filters.to_dict().items() if v is not None}


def remote_list(url: str, token: str, filters: CaptureFilters, *, insecure: bool = False) -> list[dict[str, Any]]:
    """The rows of ``capture ls`` from a fleet server (viewer token).

    Raises:
        ConfigError, AuthError, EdgeMLError: As the remote CLI's other commands.
    """
    fleet = RemoteFleet(url, token, insecure=insecure)
    q = _query(filters)  # since and until as ISO-8601 times, which the server reads as such
    path = "/api/captures" + (f"?{urllib.parse.urlencode(q)}" if q else "")
    return list(fleet._call("GET", path)["captures"])


def remote_pull(url: str, token: str, out_dir: Path, filters: CaptureFilters, *,
                insecure: bool = False) -> PulledDataset:
    """Write the dataset folder a fleet server pulls for ``filters`` (operator token) to ``out_dir``.

    Raises:
        ConfigError: ``out_dir`` exists, or the server refused.
        EdgeMLError: The answer is larger than :data:`MAX_PULL_BYTES` or not a dataset.
    """
    out = Path(out_dir).absolute()
    if out.exists():
        raise ConfigError(f"{out} already exists", hint="choose a new output folder")
    fleet = RemoteFleet(url, token, insecure=insecure)
    request = urllib.request.Request(f"{fleet.url}/api/captures/pull", data=json.dumps(_query(filters)).encode(),
                                     method="POST", headers={**fleet.headers, "Content-Type": "application/json"})
    try:
        with fleet._opener.open(request, timeout=600) as response:
            data = response.read(MAX_PULL_BYTES + 1)
    except urllib.error.HTTPError as exc:
        raise fleet._refused(exc) from None
    except (urllib.error.URLError, OSError) as exc:
        raise ConfigError(f"cannot reach the fleet server at {fleet.url}: {getattr(exc, 'reason', exc)}") from exc
    if len(data) > MAX_PULL_BYTES:
        raise EdgeMLError(f"the dataset is larger than {MAX_PULL_BYTES} bytes", hint="narrow the filters")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output_dir(out.parent, prefix=".capture-pull") as work:
        try:
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                for member in tar.getmembers():
                    if member.name not in _MEMBERS or not member.isfile():
                        raise EdgeMLError(f"the fleet server's dataset holds an unexpected member {member.name!r}")
                    source = tar.extractfile(member)
                    assert source is not None  # a regular file
                    (work / member.name).write_bytes(source.read())
        except tarfile.TarError as exc:
            raise EdgeMLError(f"the fleet server's answer is not a dataset: {exc}") from exc
        if {p.name for p in work.iterdir()} != _MEMBERS:
            raise EdgeMLError("the fleet server's dataset is incomplete")
        meta = json.loads((work / "dataset.json").read_text())
        os.chmod(work, 0o755)
        os.replace(work, out)
    return PulledDataset(out, int(meta["count"]), str(meta["sha256"]))
