"""The fleet simulator's settings: :class:`Knobs` (how the simulated fleet behaves), each device's
:class:`DeviceProfile`, and the capabilities it presents (see :mod:`edgeml.fleet.sim.simulator`)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from edgeml.capabilities import Capabilities
from edgeml.errors import ConfigError

__all__ = ["JETSON", "PI", "REAL_LABEL", "STANDIN_LABEL", "DeviceProfile", "Knobs", "parse_tags"]

STANDIN_LABEL = "stand-in runtime (fixed latency)"
REAL_LABEL = "real runtime (the one each bundle names)"
#: A Raspberry Pi as the simulator presents it: LiteRT only, no GPU.
PI = Capabilities(runtimes={"litert": "2.16.1"}, arch="aarch64")
#: A Jetson: onnxruntime with the GPU providers and TensorRT.
JETSON = Capabilities(runtimes={"onnxruntime": "1.20.1", "tensorrt": "10.3.0"}, arch="aarch64",
                      compute_capability="8.7", l4t="36.4.0",
                      providers=["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])


def parse_tags(items: list[str]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``["site=a,b", "hw=x"]`` -> ``(("site", ("a", "b")), ("hw", ("x",)))``.

    Raises:
        ConfigError: An item is not ``KEY=VALUE[,VALUE...]``.
    """
    out = []
    for item in items:
        key, sep, values = item.partition("=")
        choices = tuple(v for v in values.split(",") if v)
        if not sep or not key or not choices:
            raise ConfigError(f"bad tag distribution {item!r}", hint="use KEY=VALUE[,VALUE...], e.g. site=lab,field")
        out.append((key, choices))
    return tuple(out)


@dataclass(frozen=True)
class Knobs:
    """How the simulated fleet behaves. Fractions choose exactly ``round(fraction * n)`` devices.

    Attributes:
        fail: Fraction of devices whose misbehaving versions fail (see ``fail_mode``).
        fail_mode: ``"smoke"``: wrong outputs on the golden vectors (the update ends ``failed``);
            ``"errors"``: every live request fails (probation ends ``rolled_back`` on the error rate).
        slow: Fraction of devices on which misbehaving versions are ``slow_factor`` times slower.
        slow_factor: Latency multiplier of a slow device (p99 included).
        drift: Fraction of devices that report drift (``drift_score``, flagged) on misbehaving versions.
        drift_score: The drift score such a device reports.
        bad_versions: The versions that misbehave on the chosen devices (empty: every version).
        pi_fraction: Fraction of devices with :data:`PI` capabilities (the others: :data:`JETSON`).
        tags: Tag distributions ``((key, (value, ...)), ...)``: each device gets one value per key.
        seed: Seed of every choice.
        standin: Use :class:`SimRuntime` (True) or the runtime each bundle names (False).
        latency_ms: The stand-in runtime's latency per call, in milliseconds.
        rps: Synthetic requests per second per serving device.
        telemetry_interval_s: Seconds between telemetry reports.
        fetch_concurrency: Downloads in flight at once per process (the others wait their turn).
        poll_s: How often probation looks at the health numbers.
        traffic_threads: Threads that run the synthetic requests, per process.
        nice: Added to the niceness of the worker processes (``processes`` > 1), so that the simulation of
            many devices on one machine does not starve the fleet server under test sharing it (0: as is).
    """

    fail: float = 0.0
    fail_mode: str = "smoke"
    slow: float = 0.0
    slow_factor: float = 2.0
    drift: float = 0.0
    drift_score: float = 0.9
    bad_versions: tuple[str, ...] = ()
    pi_fraction: float = 0.0
    tags: tuple[tuple[str, tuple[str, ...]], ...] = ()
    seed: int = 0
    standin: bool = True
    latency_ms: float = 2.0
    rps: float = 5.0
    telemetry_interval_s: float = 5.0
    fetch_concurrency: int = 32
    poll_s: float = 0.2
    traffic_threads: int = 16
    nice: int = 0

    def validated(self) -> Knobs:
        """These knobs, after checking them.

        Raises:
            ConfigError: A fraction outside 0..1, an unknown fail mode or a non-positive rate or size.
        """
        for name in ("fail", "slow", "drift", "pi_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"--{name.replace('_', '-')} must be a fraction within 0..1, got {value}")
        if self.fail_mode not in ("smoke", "errors"):
            raise ConfigError(f"unknown fail mode {self.fail_mode!r}", hint="use smoke or errors")
        if self.slow_factor < 1.0 or self.latency_ms < 0 or self.rps < 0:
            raise ConfigError("slow factor must be >= 1, latency and rps >= 0")
        if self.telemetry_interval_s <= 0 or min(self.fetch_concurrency, self.traffic_threads) < 1 or self.poll_s <= 0:
            raise ConfigError("telemetry interval and poll must be > 0, concurrency and threads >= 1")
        return self

    def _rank(self, kind: str, index: int) -> bytes:
        return hashlib.sha256(f"{self.seed}:{kind}:{index}".encode()).digest()

    def chosen(self, kind: str, fraction: float, n: int) -> frozenset[int]:
        """Exactly ``round(fraction * n)`` device indices for ``kind``, the same for the same seed."""
        order = sorted(range(n), key=lambda i: self._rank(kind, i))
        return frozenset(order[:round(fraction * n)])

    def profiles(self, n: int, prefix: str) -> list[DeviceProfile]:
        """Every device's identity, capabilities, tags and faults."""
        sets = {k: self.chosen(k, getattr(self, k), n) for k in ("fail", "slow", "drift")}
        pis = self.chosen("pi", self.pi_fraction, n)
        out = []
        for i in range(n):
            tags = {key: values[int.from_bytes(self._rank(f"tag:{key}", i)[:4], "big") % len(values)]
                    for key, values in self.tags}
            faults = frozenset(k for k, members in sets.items() if i in members)
            out.append(DeviceProfile(i, f"{prefix}-{i:05d}", PI if i in pis else JETSON, tags, faults))
        return out


@dataclass(frozen=True)
class DeviceProfile:
    """One simulated device's identity and faults.

    Attributes:
        index: Its index in the fleet (0..n-1).
        device_id: Its id (``{prefix}-{index:05d}``).
        capabilities: What it reports it can run.
        tags: Its tags (reported in the state's capabilities under ``"tags"``).
        faults: Which of ``fail``, ``slow``, ``drift`` it shows on misbehaving versions.
    """

    index: int
    device_id: str
    capabilities: Capabilities
    tags: dict[str, str] = field(default_factory=dict)
    faults: frozenset[str] = frozenset()


