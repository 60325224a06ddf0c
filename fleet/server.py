"""``edgeml fleet serve``: the fleet server's parts, run together in one process or split over several.

Roles (:data:`ROLES`), each a part that already exists on its own:

* ``dist``: the :class:`~edgeml.fleet.registry.distribution.DistributionService`, answering devices' get requests
  for metadata and targets over MQTT;
* ``controller``: the :class:`~edgeml.fleet.rollouts.controller.RolloutController` (one per fleet: it is the only
  writer of rollout decisions), which also broadcasts each rollout's files through a distribution service
  (its own when ``dist`` runs elsewhere) and signs the audit log's head every ``audit_head_s``; with it, one per
  fleet as well, the :class:`~edgeml.fleet.capture.receiver.UploadReceiver` stores the samples devices upload
  under this host's registry directory (``capture``: False turns it off);
* ``ingest``: an :class:`~edgeml.fleet.telemetry.ingest.IngestWorker` storing telemetry and states (add processes
  with only this role to scale ingestion out);
* ``web``: the HTTP listener: the repository (read-only, the devices' HTTP fallback), the JSON API (rollouts,
  fleet views, audit), the dashboard at ``/`` and Prometheus metrics at ``/metrics``.

All roles of all processes meet in the database (SQLite for one machine, PostgreSQL for several) and on the
broker. With ``shared`` on (the default when the roles are split) the distribution services and the ingest
workers subscribe through MQTT 5 shared subscriptions, so two of them never handle the same message; an
MQTT 3.1.1 broker without shared subscriptions (the embedded one) needs all roles in one process.

Device states (the retained ``state`` messages) are written by the controller where it runs, else by the
ingest worker, so that a scale-out deployment does not write every state once per worker.

Every process, whatever its roles, also runs telemetry maintenance (:class:`~edgeml.fleet.telemetry.maintenance.
Maintenance`: hour rollups, retention, PostgreSQL's daily partitions) in a thread, unless ``retention`` is None; a
lease in the database lets one process at a time do the work, the others find it taken.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeml.errors import ConfigError
from edgeml.fleet.store import schema
from edgeml.fleet.store.schema import sa
from edgeml.fleet.telemetry.maintenance import RetentionSettings

if TYPE_CHECKING:
    from edgeml.fleet.store.db import Database

__all__ = ["ROLES", "FleetServer", "ServeSettings"]

_log = logging.getLogger(__name__)

#: Every role, in the order they start (the web listener last, once the rest is up).
ROLES = ("dist", "ingest", "controller", "web")


@dataclass(frozen=True)
class ServeSettings:
    """How ``edgeml fleet serve`` runs.

    Attributes:
        roles: The roles of this process (a subset of :data:`ROLES`).
        broker_host: The MQTT broker's host.
        broker_port: Its port.
        username: Broker user (the fleet user), or None for an anonymous broker.
        password: Its password.
        tls: SSL context for a TLS listener (None: plain TCP).
        http_host: Address of the HTTP listener (127.0.0.1: this machine only).
        http_port: Its port (0: a free one).
        db_url: SQLAlchemy URL of the database (None: ``$EDGEML_FLEET_DB_URL``, else SQLite in the registry).
        shared: Use shared subscriptions for distribution and ingest (None: when not every role is here).
        mqtt5: Speak MQTT 5 to the broker where a part can (False for an MQTT 3.1.1-only broker).
        tick_s: Seconds between the controller's decisions.
        client_id: The controller's MQTT client id (keep it across restarts: its session holds the events; keep a
            ``.`` in it, which no device id has, so that no device can take it).
        metrics_token: Require a viewer token on ``/metrics`` too.
        audit_head_s: Seconds between signatures of the audit log's head by the controller.
        broadcast: Whether the controller broadcasts each rollout's files (False: devices fetch them with get
            requests from the ``dist`` role of some process).
        retention: How long telemetry is kept and how maintenance runs (None: no maintenance in this process).
    """

    roles: frozenset[str] = frozenset(ROLES)
    broker_host: str = "localhost"
    broker_port: int = 1883
    username: str | None = None
    password: str | None = None
    tls: ssl.SSLContext | None = None
    http_host: str = "127.0.0.1"
    http_port: int = 8470
    db_url: str | None = None
    shared: bool | None = None
    mqtt5: bool = True
    tick_s: float = 1.0
    client_id: str = "edgeml.rollouts"
    metrics_token: bool = False
    audit_head_s: float = 3600.0
    broadcast: bool = True
    retention: RetentionSettings | None = field(default_factory=RetentionSettings)
    capture: bool = True  # receive capture uploads where the controller runs (fleet/capture/receiver.py)

    def __post_init__(self) -> None:
        from edgeml.protocol import is_device_id

        if is_device_id(self.client_id):
            raise ConfigError(f"the controller's client id {self.client_id!r} is a valid device id, so a device "
                              "could take it", hint="put a '.' in it, e.g. edgeml.rollouts")
        unknown = sorted(set(self.roles) - set(ROLES))
        if unknown or not self.roles:
            raise ConfigError(f"unknown or no roles {unknown or []}: choose among {', '.join(ROLES)}",
                              hint="e.g. --role controller --role web, or leave --role out for all of them")

    @property
    def is_shared(self) -> bool:
        """Whether distribution and ingest use shared subscriptions."""
        return self.shared if self.shared is not None else set(self.roles) != set(ROLES)


def _days(seconds: float) -> str:
    return "forever" if seconds <= 0 else f"{seconds / 86400:g} days"


class FleetServer:
    """The roles of one ``edgeml fleet serve`` process, started and stopped together.

    Example::

        with FleetServer(registry_dir, ServeSettings(broker_port=1883, http_port=0)) as server:
            print(server.http.url)

    Args:
        registry_dir: The registry directory.
        settings: What to run and where.
        log: Where to say what started (one line per part), e.g. ``typer.echo``.

    Raises:
        ConfigError: The registry, the database or the broker cannot be used (from :meth:`start`).
    """

    def __init__(self, registry_dir: Path, settings: ServeSettings,
                 log: Callable[[str], None] = lambda line: _log.info("%s", line)) -> None:
        self.dir, self.settings, self.log = Path(registry_dir), settings, log
        self.db: Database | None = None
        self.audit: Any = None
        self.dist: Any = None
        self.ingest: Any = None
        self.controller: Any = None
        self.http: Any = None
        self.maintenance: Any = None
        self.capture: Any = None
        self._stop = threading.Event()
        self._signer: threading.Thread | None = None

    @property
    def database(self) -> Database:
        """The registry database (while started)."""
        if self.db is None:
            raise RuntimeError("the fleet server is not started")
        return self.db

    @property
    def scheme(self) -> str:
        return "mqtts" if self.settings.tls is not None else "mqtt"

    def start(self) -> None:
        """Start every role of this process (nothing stays running if one fails)."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        from edgeml.fleet.registry.repository import Registry

        s, roles = self.settings, self.settings.roles
        self.db = Registry(self.dir, db_url=s.db_url).database()  # checks DIR is a registry first
        self.audit = self._audit_log()
        where = f"{self.scheme}://{s.broker_host}:{s.broker_port}"
        if "dist" in roles or ("controller" in roles and s.broadcast):
            self.dist = self._distribution()
            if "dist" in roles:
                self.log(f"mqtt: serving {self.dir / 'repository'} on {where}")
        if "ingest" in roles:
            self.ingest = self._ingest()
            self.log(f"ingest: telemetry from {where} into the database")
        if "controller" in roles:
            self.controller = self._controller()
            self.log(f"controller: rollouts over {where}")
            self._signer = threading.Thread(target=self._sign_heads, name="audit-heads", daemon=True)
            self._signer.start()
            if s.capture:
                self.capture = self._capture()
                self.log(f"capture: uploads from {where} into {self.dir / 'captures'}")
        if "web" in roles:
            self.http = self._web()
            self.log(f"http: dashboard {self.http.url}/ , API {self.http.url}/api/ , metrics {self.http.url}/metrics")
            self.log(f"http: serving {self.dir / 'repository'} on {self.http.url}/metadata/ and "
                     f"{self.http.url}/targets/")
        if s.retention is not None:
            from edgeml.fleet.telemetry.maintenance import Maintenance

            self.maintenance = Maintenance(self.database, s.retention)
            self.maintenance.start()
            self.log(f"telemetry: maintenance every {s.retention.every_s:g} s (one process at a time), raw rows kept "
                     f"{_days(s.retention.raw_s)}, minute rollups {_days(s.retention.minute_s)}, hour rollups "
                     f"{_days(s.retention.hour_s)}")

    def _audit_log(self) -> Any:
        """The audit log; its signing key is created only for an empty log (a second host must have the first
        host's ``keys/audit.pem``: a key of its own would sign heads that ``audit verify`` rejects)."""
        from edgeml.fleet.audit.log import open_audit

        key = self.dir / "keys" / "audit.pem"
        if not key.exists():
            t = schema.audit
            with self.database.transaction() as conn:
                entries = conn.execute(sa.select(sa.func.count()).select_from(t)).scalar()
            if entries:
                raise ConfigError(f"{key} is missing, but the audit log already has {entries} entries signed with "
                                  "another key", hint="copy keys/audit.pem from the registry's first host "
                                  "(every fleet server process signs with the same key)")
        return open_audit(self.dir, db=self.db)

    def _broker_error(self, part: str, exc: BaseException) -> ConfigError:
        s = self.settings
        return ConfigError(f"{part}: cannot use the broker at {self.scheme}://{s.broker_host}:{s.broker_port}: "
                           f"{exc}", hint="is the broker running, and are --broker-host/--broker-port/--ca right?")

    def _distribution(self) -> Any:
        from edgeml.fleet.registry.distribution import DistributionService

        s = self.settings
        from edgeml.fleet.devices.roster import DeviceRoster

        dist = DistributionService(self.dir, s.broker_host, s.broker_port, username=s.username, password=s.password,
                                   tls=s.tls, share_group="edgeml-dist" if s.is_shared else None,
                                   mqtt5=s.mqtt5 and s.is_shared, roster=DeviceRoster(self.database))
        try:
            dist.start()
        except (OSError, TimeoutError) as exc:
            raise self._broker_error("distribution", exc) from exc
        return dist

    def _ingest(self) -> Any:
        from edgeml.fleet.telemetry.ingest import IngestSettings, IngestWorker

        s = self.settings
        worker = IngestWorker(self.database, s.broker_host, s.broker_port, username=s.username, password=s.password,
                              tls=s.tls, share_group="ingest" if s.is_shared else None, mqtt5=s.mqtt5,
                              settings=IngestSettings(state="controller" not in s.roles))
        worker.start()  # ConfigError with the broker's answer when it cannot
        return worker

    def _controller(self) -> Any:
        from edgeml.errors import EdgeMLError
        from edgeml.fleet.rollouts.controller import RolloutController

        s = self.settings
        controller = RolloutController(self.database, s.broker_host, s.broker_port, dist=self.dist, username=s.username,
                                       password=s.password, tls=s.tls, client_id=s.client_id, tick_s=s.tick_s,
                                       audit=self.audit)
        try:
            controller.start()
        except EdgeMLError as exc:
            raise self._broker_error("controller", exc) from exc
        return controller

    def _capture(self) -> Any:
        from edgeml.fleet.capture.receiver import UploadReceiver
        from edgeml.fleet.devices.roster import DeviceRoster

        s = self.settings
        receiver = UploadReceiver(self.database, self.dir, s.broker_host, s.broker_port, username=s.username,
                                  password=s.password, tls=s.tls, roster=DeviceRoster(self.database))
        receiver.start()  # ConfigError with the broker's answer when it cannot
        return receiver

    def _web(self) -> Any:
        from edgeml.fleet.web.server import HttpServer, fleet_app

        s = self.settings
        app = fleet_app(self.dir, self.database, self.audit, ingest=self.ingest, capture=self.capture,
                        metrics_token=s.metrics_token)
        http = HttpServer(app, s.http_host, s.http_port)
        http.start()
        return http

    def _sign_heads(self) -> None:
        while not self._stop.wait(self.settings.audit_head_s):
            try:
                self.audit.sign_head()
            except Exception:  # the database may be away for a moment; the next round signs again
                _log.exception("signing the audit head failed")

    def stop(self) -> None:
        """Stop every part that started, the web listener first (idempotent)."""
        self._stop.set()
        for part in (self.http, self.maintenance, self.capture, self.controller, self.ingest, self.dist):
            if part is not None:
                try:
                    part.stop()
                except Exception:  # one part failing to stop must not keep the others running
                    _log.exception("stopping %s failed", type(part).__name__)
        self.http = self.maintenance = self.capture = self.controller = self.ingest = self.dist = None
        if self.db is not None:
            self.db.close()
            self.db = None

    def __enter__(self) -> FleetServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
