"""Plain loopback MQTT brokers for tests: a real Mosquitto or the embedded amqtt broker, behind one helper.

``plain_broker(kind)`` yields ``(host, port)`` of an anonymous, plain-TCP broker on 127.0.0.1, so that one
test can be parametrized over :data:`BROKERS` and run unchanged on both::

    @pytest.fixture(params=BROKERS)
    def broker(request):
        with plain_broker(request.param) as address:
            yield address

A missing Mosquitto (or amqtt) calls :func:`tests.conftest.require_service`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager

from tests.conftest import require_service
from tests.fleet.mosquitto import anonymous_mosquitto

__all__ = ["BROKERS", "plain_broker"]

#: The broker kinds :func:`plain_broker` starts.
BROKERS = ("mosquitto", "amqtt")


@contextmanager
def _mosquitto() -> Iterator[tuple[str, int]]:
    with anonymous_mosquitto() as (port, _):
        yield "127.0.0.1", port


@contextmanager
def _amqtt() -> Iterator[tuple[str, int]]:
    if importlib.util.find_spec("amqtt") is None:
        require_service("amqtt", False, "amqtt not installed (pip install 'edgeml[fleet]')")
    from edgeml.fleet.devices.embedded_broker import EmbeddedBroker

    with EmbeddedBroker() as broker:
        yield broker.host, broker.port


@contextmanager
def plain_broker(kind: str) -> Iterator[tuple[str, int]]:
    """Start an anonymous plain-TCP broker on 127.0.0.1 for the duration of the block.

    Args:
        kind: ``"mosquitto"`` (a real Mosquitto process) or ``"amqtt"`` (:class:`EmbeddedBroker`).

    Yields:
        ``(host, port)`` of the listener.
    """
    starters = {"mosquitto": _mosquitto, "amqtt": _amqtt}
    if kind not in starters:
        raise ValueError(f"unknown broker kind {kind!r} (expected one of {BROKERS})")
    with starters[kind]() as address:
        yield address
