"""A small MQTT 3.1.1 broker inside the Python process (amqtt), for the demo and for tests.

This is the fallback when Mosquitto is not installed, so that ``edgeml`` can be tried on a laptop with
nothing but ``pip install 'edgeml[fleet]'``. It is **not a production broker**: anonymous clients may
connect, publish and subscribe to anything, there is no TLS, no ACL and no persistence, and it listens on
the loopback interface unless told otherwise. It also differs from the MQTT 3.1.1 standard in small ways:
amqtt delivers a message at the subscription's QoS even when it was published at a lower one. A fleet runs
Mosquitto with the configuration that ``edgeml fleet broker-config`` writes (TLS, per-device passwords, ACL).

The broker runs on its own asyncio event loop in a background thread::

    with EmbeddedBroker() as broker:       # port 0: a free port, resolved in broker.port
        client.connect(broker.host, broker.port)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from typing import Any

from edgeml._deps import require
from edgeml.errors import ConfigError

__all__ = ["EmbeddedBroker"]

_log = logging.getLogger(__name__)

#: amqtt logs every connection and packet at INFO; only its warnings and errors are of interest here.
_NOISY_LOGGERS = ("amqtt", "transitions")


class _NoStartupTraceback(logging.Filter):
    """Drop amqtt's traceback of a failed start (:meth:`EmbeddedBroker.start` raises it as a ConfigError), and
    shorten its traceback of one client connection that failed (a client that hung up mid-handshake, say) to
    one line: the broker keeps serving the others, and a traceback would read like a crash."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("Broker startup failed"):
            return False
        if message.startswith("Unhandled exception") and record.exc_info:
            error = record.exc_info[1]
            record.msg, record.args, record.exc_info = f"a client connection failed: {error!r}", (), None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


_FILTER = _NoStartupTraceback()


def _quiet_amqtt() -> None:
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    broker_log = logging.getLogger("amqtt.broker")
    if _FILTER not in broker_log.filters:
        broker_log.addFilter(_FILTER)


class EmbeddedBroker:
    """An anonymous MQTT 3.1.1 broker (amqtt) served from a background thread.

    Args:
        host: Address to listen on (default the loopback interface only).
        port: TCP port; 0 picks a free one (read it from :attr:`port` after :meth:`start`).

    Raises:
        MissingExtraError: amqtt is not installed (``edgeml[fleet]``).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._amqtt_broker = require("amqtt.broker", "fleet")
        self.host = host
        self.port = port
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def _config(self) -> dict[str, Any]:
        bind = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        return {
            "listeners": {"default": {"type": "tcp", "bind": bind}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }

    def start(self, timeout: float = 10.0) -> None:
        """Start the broker; returns once it accepts connections (and :attr:`port` is the real port).

        Args:
            timeout: Seconds to wait for the listener.

        Raises:
            ConfigError: The broker could not listen on ``host:port`` (e.g. the port is taken), or did not
                start within ``timeout``.
        """
        if self._thread is not None:
            raise ConfigError("the embedded broker is already started")
        _quiet_amqtt()
        self._ready.clear()
        self._error = None
        self._thread = threading.Thread(target=self._run, name="edgeml-embedded-broker", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            self.stop()
            raise ConfigError(f"the embedded MQTT broker did not start on {self.host}:{self.port} in {timeout} s")
        if self._error is not None:
            error, self._error = self._error, None
            self._thread.join()
            self._thread = None
            raise ConfigError(f"the embedded MQTT broker cannot listen on {self.host}:{self.port}: {error}",
                              hint="choose another port, or stop what is using it") from error

    def stop(self, timeout: float = 10.0) -> None:
        """Disconnect every client and close the listener (idempotent)."""
        thread, loop, stop = self._thread, self._loop, self._stop
        if thread is None:
            return
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed in between: the thread is ending anyway
                loop.call_soon_threadsafe(stop.set)
        thread.join(timeout)
        if thread.is_alive():
            _log.warning("the embedded MQTT broker did not stop within %s s", timeout)
        self._thread = None

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """``mqtt://host:port`` of the listener."""
        return f"mqtt://{self.host}:{self.port}"

    # --- the broker's thread --------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:
            if not self._ready.is_set():
                self._error = exc
                self._ready.set()
            else:
                _log.error("the embedded MQTT broker failed: %s", exc)
        finally:
            self._loop = None

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        broker = self._amqtt_broker.Broker(self._config())
        await broker.start()
        try:
            server = broker._servers["default"].instance  # amqtt does not expose the bound socket otherwise
            self.port = int(server.sockets[0].getsockname()[1])
            self._ready.set()
            await self._stop.wait()
        finally:
            await broker.shutdown()
