"""The agent as a systemd service: the unit file and ``edgeml agent install-service``.

The unit runs ``edgeml agent run`` as ``Type=notify``: the agent says ``READY=1`` once it serves and its API
listens, and pets the watchdog (``WATCHDOG=1``) at least every second (half of ``WATCHDOG_USEC`` when that
is shorter, see :class:`~edgeml.edge_agent.host.SystemdNotifier`), so ``WatchdogSec=`` of a few tens of
seconds restarts a hung agent without false alarms. ``Restart=on-failure`` with a start limit restarts a
crashed agent but stops a crash loop; the state directory keeps the update record, so an update that
crashed the agent resumes (or rolls back) on the next start.

``deploy/systemd/edgeml-agent.service`` is :func:`render_unit` with the default :class:`ServiceSettings`
(a test keeps them equal). :func:`install_service` renders the unit for the running installation (its own
``edgeml`` script), writes it, optionally creates the system user, and enables and starts it.

Errors beside the code that raises them::

    EdgeMLError
    └── ServiceError                the service cannot be installed
        ├── NotRootError            installing into /etc/systemd/system, creating a user or starting needs root
        ├── UnitExistsError         a different unit is already installed there (use --force)
        └── SystemctlMissingError   systemctl (or useradd) is not on PATH: no systemd here
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from edgeml.errors import ConfigError, EdgeMLError, StorageError
from edgeml.fsutil import atomic_write_bytes

__all__ = [
    "DEFAULT_UNIT_PATH",
    "InstallResult",
    "NotRootError",
    "ServiceError",
    "ServiceSettings",
    "SystemctlMissingError",
    "UnitExistsError",
    "current_executable",
    "install_service",
    "render_unit",
]

#: Where ``install-service`` writes the unit unless told otherwise.
DEFAULT_UNIT_PATH = Path("/etc/systemd/system/edgeml-agent.service")

_NAME = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")


class ServiceError(EdgeMLError):
    """The agent's systemd service cannot be installed."""


class NotRootError(ServiceError):
    """The step needs root (writing a system unit, creating a user, systemctl)."""


class UnitExistsError(ServiceError):
    """A different unit file is already installed at the target path."""


class SystemctlMissingError(ServiceError):
    """A system tool the step needs (systemctl, useradd) is not on PATH."""


@dataclass(frozen=True)
class ServiceSettings:
    """What the unit says; the defaults are those of ``deploy/systemd/edgeml-agent.service``."""

    #: The ``edgeml`` script (absolute): by default a virtual environment in /opt/edgeml, made with
    #: ``python3 -m venv /opt/edgeml && /opt/edgeml/bin/pip install 'edgeml[agent,ort]'``.
    executable: Path = Path("/opt/edgeml/bin/edgeml")
    config: Path = Path("/etc/edgeml/agent.toml")
    user: str = "edgeml"
    group: str = "edgeml"
    #: Must equal ``state_dir`` in agent.toml; under /var/lib it becomes ``StateDirectory=`` (created, owned
    #: by ``user``), elsewhere it must exist and be writable by ``user``.
    state_dir: Path = Path("/var/lib/edgeml")
    watchdog_s: int = 30  # the agent pets it every <= 1 s; a hang longer than this restarts the agent
    restart_s: int = 5  # pause before a restart
    start_limit_burst: int = 5  # at most this many starts ...
    start_limit_interval_s: int = 600  # ... in this window, then systemd stops trying (a crash loop)
    start_timeout_s: int = 120  # READY=1 comes after the active model is loaded (a TensorRT engine: seconds)
    stop_timeout_s: int = 30
    description: str = field(default="edgeml on-device agent: serve, update, report")

    def __post_init__(self) -> None:
        for name in ("executable", "config", "state_dir"):
            if not Path(getattr(self, name)).is_absolute():
                raise ConfigError(f"the service's {name} must be an absolute path, got {getattr(self, name)}")
        for name in ("user", "group"):
            if not _NAME.match(getattr(self, name)):
                raise ConfigError(f"{name} {getattr(self, name)!r} is not a valid system user/group name",
                                  hint="use lower-case letters, digits, '_' and '-', starting with a letter")
        for name in ("watchdog_s", "restart_s", "start_limit_burst", "start_limit_interval_s", "start_timeout_s",
                     "stop_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"the service's {name} must be > 0, got {getattr(self, name)}")
        if self.watchdog_s < 3:
            raise ConfigError(f"watchdog_s must be >= 3 (the agent pets it every second), got {self.watchdog_s}")
        if any(c in self.description for c in "\n%"):
            raise ConfigError("the service's description must be one line without '%'")


def _under(path: Path, root: str) -> str | None:
    """``path`` relative to ``root`` when it lies strictly under it (for systemd's *Directory= settings)."""
    try:
        rel = path.relative_to(root)
    except ValueError:
        return None
    return str(rel) if str(rel) not in ("", ".") else None


def _quote(value: object) -> str:
    """A command-line word for ExecStart= (quoted when it has spaces)."""
    text = str(value)
    return f'"{text}"' if any(c.isspace() for c in text) else text


def render_unit(settings: ServiceSettings | None = None) -> str:
    """The systemd unit text for the agent.

    Args:
        settings: What to put in it (default: :class:`ServiceSettings`, the checked-in unit).

    Returns:
        The unit file's text, ending in a newline.
    """
    s = settings or ServiceSettings()
    state_rel = _under(s.state_dir, "/var/lib")
    config_rel = _under(s.config.parent, "/etc")
    exec_start = " ".join(_quote(w) for w in (s.executable, "agent", "run", "--config", s.config))
    lines = [
        "# The edgeml on-device agent (written by `edgeml agent install-service`; regenerate rather than edit).",
        "[Unit]",
        f"Description={s.description}",
        "Wants=network-online.target",
        "After=network-online.target time-sync.target",
        f"StartLimitIntervalSec={s.start_limit_interval_s}",
        f"StartLimitBurst={s.start_limit_burst}",
        "",
        "[Service]",
        "Type=notify",
        "NotifyAccess=main",
        f"ExecStart={exec_start}",
        f"User={s.user}",
        f"Group={s.group}",
        "Restart=on-failure",
        f"RestartSec={s.restart_s}",
        f"WatchdogSec={s.watchdog_s}",
        f"TimeoutStartSec={s.start_timeout_s}",
        f"TimeoutStopSec={s.stop_timeout_s}",
        "Environment=PYTHONUNBUFFERED=1",
        *([f"StateDirectory={state_rel}", "StateDirectoryMode=0750"] if state_rel else []),
        *([f"ConfigurationDirectory={config_rel}"] if config_rel else []),
        "RuntimeDirectory=edgeml",  # /run/edgeml for the optional API socket (api_socket in agent.toml)
        "RuntimeDirectoryMode=0750",
        "# Hardening. No PrivateDevices= (TensorRT needs the GPU's device nodes) and no ProtectClock= (it",
        "# filters adjtimex(2), which the agent calls read-only to learn whether NTP has set the clock).",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        f"ReadWritePaths={s.state_dir}",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectControlGroups=yes",
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
        "UMask=0027",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
    ]
    return "\n".join(lines) + "\n"


def current_executable() -> Path:
    """The ``edgeml`` script of the running installation (beside ``sys.executable``, else on PATH).

    Raises:
        ConfigError: There is none (edgeml run from a source tree without its script installed).
    """
    beside = Path(sys.executable).absolute().parent / "edgeml"  # no resolve(): keep the venv's bin dir
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("edgeml")
    if found:
        return Path(found).absolute()
    raise ConfigError(f"cannot find the edgeml script beside {sys.executable} or on PATH",
                      hint="pass --executable /path/to/bin/edgeml")


@dataclass(frozen=True)
class InstallResult:
    """What :func:`install_service` did.

    Attributes:
        unit_path: Where the unit is.
        written: False when an identical unit was already there.
        user_created: Whether the system user was created.
        commands: The commands run (``useradd``, ``systemctl ...``), in order.
    """

    unit_path: Path
    written: bool
    user_created: bool
    commands: tuple[tuple[str, ...], ...]


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise SystemctlMissingError(f"{name} is not on PATH: this host does not look like it runs systemd",
                                    hint="install the unit by hand (--print shows it) or pass --no-start")
    return found


def _run(command: tuple[str, ...]) -> None:
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    except OSError as exc:
        raise ServiceError(f"cannot run {command[0]}: {exc.strerror}") from exc
    if proc.returncode != 0:
        raise ServiceError(f"`{' '.join(command)}` failed ({proc.returncode}): {proc.stderr.strip()[-500:]}",
                           hint="see `journalctl -xe`; the unit file is written, fix the cause and run it again")


def _user_command(settings: ServiceSettings) -> tuple[str, ...] | None:
    """The useradd command for the service user, or None when the user exists."""
    try:
        pwd.getpwnam(settings.user)
        return None
    except KeyError:
        pass
    group = ("--user-group",) if settings.group == settings.user else ("--gid", settings.group)
    return (_tool("useradd"), "--system", *group, "--home-dir", str(settings.state_dir), "--no-create-home",
            "--shell", "/usr/sbin/nologin", "--comment", "edgeml agent", settings.user)


def install_service(settings: ServiceSettings, *, unit_path: Path | None = None, create_user: bool = False,
                    start: bool = True, force: bool = False) -> InstallResult:
    """Write the agent's unit and (unless ``start=False``) enable and start it.

    Args:
        settings: What the unit says (see :func:`current_executable` for this installation's script).
        unit_path: Where to write it (default :data:`DEFAULT_UNIT_PATH`, which needs root).
        create_user: Create ``settings.user`` as a system user when it does not exist (needs root).
        start: Run ``systemctl daemon-reload`` and ``systemctl enable --now`` (needs root and systemd).
        force: Replace a different unit already at ``unit_path``.

    Returns:
        What was done.

    Raises:
        NotRootError: A step needs root and this process is not root.
        UnitExistsError: A different unit is at ``unit_path`` and ``force`` is False.
        SystemctlMissingError: systemctl or useradd is needed and not on PATH.
        ServiceError: useradd or systemctl failed.
        StorageError: The unit cannot be written.
    """
    target = Path(unit_path) if unit_path is not None else DEFAULT_UNIT_PATH
    needs_root = [why for why, needed in (("writing to /etc/systemd/system", unit_path is None),
                                          ("creating a system user", create_user),
                                          ("starting the service", start)) if needed]
    if needs_root and os.geteuid() != 0:
        raise NotRootError(f"{' and '.join(needs_root)} needs root",
                           hint="run it with sudo, or pass --unit-path PATH --no-start to only write the unit "
                                "(or --print to show it)")
    systemctl = _tool("systemctl") if start else None
    text = render_unit(settings)
    existing = target.read_text(encoding="utf-8") if target.is_file() else None
    if existing is not None and existing != text and not force:
        raise UnitExistsError(f"{target} exists and differs from the unit edgeml would write",
                              hint="compare with `edgeml agent install-service --print`; pass --force to replace it")
    commands: list[tuple[str, ...]] = []
    user_cmd = _user_command(settings) if create_user else None
    if user_cmd is not None:
        _run(user_cmd)
        commands.append(user_cmd)
    if existing != text:
        if not target.parent.is_dir():
            raise StorageError(f"cannot write {target}: {target.parent} is not a directory")
        atomic_write_bytes(target, text.encode())
        try:
            target.chmod(0o644)
        except OSError as exc:
            raise StorageError(f"cannot set the mode of {target}: {exc.strerror}") from exc
    if systemctl is not None:
        for command in ((systemctl, "daemon-reload"), (systemctl, "enable", "--now", target.name)):
            _run(command)
            commands.append(command)
    return InstallResult(target, existing != text, user_cmd is not None, tuple(commands))
