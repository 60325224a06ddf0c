"""The agent's settings: the device's bootstrap bundle plus local settings from ``agent.toml``.

``agent.toml``::

    [agent]
    bootstrap = "/etc/edgeml/cam-1.bootstrap.json"   # written by `edgeml fleet devices enroll` (0600)
    state_dir = "/var/lib/edgeml"                    # slots, update record, outbox, metadata
    api_host = "127.0.0.1"                           # local inference API (loopback only by default)
    api_port = 8471
    api_socket = "/run/edgeml/agent.sock"            # optional Unix socket for the same API ("" = none)
    telemetry_interval_s = 10
    threads = 0                                      # runtime intra-op threads (0 = all cores)
    clock = "auto"                                   # or "assume-synced" (containers with a host clock)
    runtimes = ["onnxruntime", "litert"]             # offer only these to the fleet (default: all installed)
    tls = true                                       # false only for a plain loopback test broker

Relative paths are relative to the TOML file. Every value is checked against its field's type
(:func:`edgeml.typed_config.convert`: ``tls = "false"`` is refused, not truthy); every problem is a
:class:`~edgeml.errors.ConfigError` that names the file, the key and what was expected.
"""

from __future__ import annotations

import base64
import binascii
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from edgeml.capabilities import RUNTIME_NAMES
from edgeml.errors import ConfigError
from edgeml.protocol import ProtocolError, validate_device_id
from edgeml.typed_config import convert

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (JetPack 6)
    import tomli as tomllib

__all__ = ["AgentConfig", "Bootstrap", "load_bootstrap", "load_config"]



@dataclass(frozen=True)
class Bootstrap:
    """What enrollment gave the device: its identity, broker access and trusted TUF root."""

    device_id: str
    username: str
    password: str
    host: str
    port: int
    ca_pem: str | None = None
    tuf_root: bytes = b""


@dataclass(frozen=True)
class AgentConfig:
    """Local settings of one agent (units in the names; see the module docstring for the TOML form)."""

    bootstrap: Bootstrap
    state_dir: Path
    api_host: str = "127.0.0.1"
    api_port: int = 8471  # 0 picks a free port (printed at start)
    api_socket: Path | None = None
    telemetry_interval_s: float = 10.0
    threads: int = 0
    clock: str = "auto"  # "auto" reads the kernel's NTP status; "assume-synced" trusts the clock
    tls: bool = True
    max_request_bytes: int = 16 * 1024 * 1024  # largest inference request body
    runtimes: tuple[str, ...] | None = None  # the runtimes offered to the fleet (None: every one installed)

    def __post_init__(self) -> None:
        if self.runtimes is not None:
            bad = [r for r in self.runtimes if r not in RUNTIME_NAMES]
            if bad or not self.runtimes:
                raise ConfigError(f"runtimes must name at least one of {', '.join(RUNTIME_NAMES)}, got "
                                  f"{list(self.runtimes)}")
        if self.clock not in ("auto", "assume-synced"):
            raise ConfigError(f"clock must be 'auto' or 'assume-synced', got {self.clock!r}")
        if not 0 <= self.api_port <= 65535:
            raise ConfigError(f"api_port must be 0..65535, got {self.api_port}")
        if self.telemetry_interval_s <= 0:
            raise ConfigError(f"telemetry_interval_s must be > 0, got {self.telemetry_interval_s}")


def load_bootstrap(path: Path) -> Bootstrap:
    """Read a bootstrap file written by ``edgeml fleet devices enroll``.

    Raises:
        ConfigError: It is missing, not JSON, or lacks a field.
    """
    try:
        doc = json.loads(Path(path).read_text())
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        fields = {k: v for k, v in doc.items() if k != "tuf_root_b64"}
        root = base64.b64decode(doc["tuf_root_b64"], validate=True)
        boot = convert(Bootstrap, fields, where=f"the bootstrap file {path}", tuf_root=root)
        validate_device_id(boot.device_id)
    except OSError as exc:
        raise ConfigError(f"cannot read the bootstrap file {path}: {exc.strerror}",
                          hint="enroll the device with `edgeml fleet devices enroll` and copy its file here") from exc
    except (ValueError, KeyError, TypeError, binascii.Error, ProtocolError) as exc:
        raise ConfigError(f"the bootstrap file {path} is malformed: {exc}") from exc
    return boot


def load_config(path: Path) -> AgentConfig:
    """Read ``agent.toml`` and the bootstrap file it names.

    Raises:
        ConfigError: The file is missing or malformed, or a key is unknown or has a wrong type.
    """
    path = Path(path)
    try:
        table = tomllib.loads(path.read_text()).get("agent")
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    if not isinstance(table, dict):
        raise ConfigError(f"{path} has no [agent] table")
    where = f"{path} [agent]"
    for key in ("bootstrap", "state_dir"):
        if not isinstance(table.get(key), str):
            raise ConfigError(f"{where}: {key!r} (a path, relative to the file) is required")
    base = path.parent
    socket = table.get("api_socket")
    if socket is not None and not isinstance(socket, str):
        raise ConfigError(f"{where}: 'api_socket' must be a path, got {type(socket).__name__}")
    return convert(AgentConfig, table, where=where, bootstrap=load_bootstrap(base / table["bootstrap"]),
                   state_dir=(base / table["state_dir"]).resolve(),
                   api_socket=(base / socket).resolve() if socket else None)
