"""The options of a staged rollout, validated once at the boundary (CLI, HTTP API, the stored JSON).

:class:`RolloutOptions` says how a rollout proceeds (targets, selection, canary, waves, timeouts, probation) and
when it aborts (failure rate, p99 regression, error rate, drift, output shift); ``parse_*`` read the CLI's forms
(``5%``, ``10m``, ``site=lab,kind=cam``). :mod:`~edgeml.fleet.rollouts.rules` uses them; both are pure.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from edgeml.errors import ConfigError
from edgeml.thresholds import Thresholds
from edgeml.typed_config import convert

__all__ = ["RolloutError", "RolloutOptions", "parse_duration", "parse_fraction", "parse_selection"]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h)?")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_DEFAULT_OUTPUT_SHIFT = Thresholds.max_output_shift  # the agents' own limit


class RolloutError(ConfigError):
    """A rollout cannot be started or changed as asked (bad options, unknown model or version, no devices)."""


def parse_fraction(text: str | float, what: str) -> float:
    """``"5%"`` -> 0.05; a plain number is taken as a fraction (``"0.05"``).

    Raises:
        RolloutError: Not a number or a percentage.
    """
    raw = str(text).strip()
    try:
        value = float(raw[:-1]) / 100.0 if raw.endswith("%") else float(raw)
    except ValueError:
        raise RolloutError(f"{what} must be a percentage like 10% or a fraction like 0.1, got {text!r}") from None
    if not math.isfinite(value):
        raise RolloutError(f"{what} must be finite, got {text!r}")
    return value


def parse_duration(text: str | float, what: str) -> float:
    """``"10m"`` -> 600.0 seconds (units ms, s, m, h; none: seconds).

    Raises:
        RolloutError: Not a duration.
    """
    match = _DURATION.fullmatch(str(text).strip())
    if match is None:
        raise RolloutError(f"{what} must be a duration like 30s, 10m or 1h, got {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_selection(text: str | None) -> dict[str, str]:
    """``"site=lab,tier=canary"`` -> ``{"site": "lab", "tier": "canary"}`` (every tag must match).

    Raises:
        RolloutError: An item is not ``KEY=VALUE``.
    """
    tags: dict[str, str] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise RolloutError(f"bad --select item {item!r}", hint="use TAG=VALUE[,TAG=VALUE...]")
        tags[key.strip()] = value.strip()
    return tags


@dataclass(frozen=True)
class RolloutOptions:
    """How a rollout proceeds and when it aborts.

    Attributes:
        targets: Compile targets in order of preference; each device gets the first it can run.
        select: Tags a device must all have (empty: every enrolled device).
        canary: Fraction (0..1] of the devices in the canary (wave 0).
        waves: Cumulative fractions of the devices done after each later wave, increasing, the last 1.0.
        wave_timeout_s: Seconds a notified device (or an offline one, from its wave's start) may take.
        probation_s: Seconds of probation on each device before it commits.
        max_failure_rate: Abort when the failure rate exceeds this (0..1; 1.0: never on failures).
        min_devices: Smallest canary, and the finished devices needed before the failure rate counts.
        max_p99_regression: Abort when new/previous p99 exceeds this factor (> 1; None: no such check).
        max_error_rate: Abort when the devices' error rate exceeds this (0..1; None: no such check).
        max_drift: Abort when the devices' drift score exceeds this (0..1; None: no such check).
        max_output_shift: Abort when the devices' output-shift score exceeds this (0..1; None: no such check).
            The default is the agents' own limit (``Thresholds.max_output_shift``): a rollout of a model whose
            outputs moved stops on the devices' telemetry or their rollbacks for it. Also sent to the agents when
            it differs from their default.
        device_thresholds: More health thresholds for the agents (``Thresholds`` names, e.g. min_requests).
    """

    targets: tuple[str, ...]
    select: Mapping[str, str] = field(default_factory=dict)
    canary: float = 0.05
    waves: tuple[float, ...] = (0.25, 0.5, 1.0)
    wave_timeout_s: float = 600.0
    probation_s: float = 300.0
    max_failure_rate: float = 0.1
    min_devices: int = 3
    max_p99_regression: float | None = None
    max_error_rate: float | None = None
    max_drift: float | None = None
    max_output_shift: float | None = _DEFAULT_OUTPUT_SHIFT
    device_thresholds: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._check_targets()
        for name, value, low, high, open_low in (
                ("--canary", self.canary, 0.0, 1.0, True),
                ("--max-failure-rate", self.max_failure_rate, 0.0, 1.0, False),
                ("--max-error-rate", self.max_error_rate, 0.0, 1.0, False),
                ("--max-drift", self.max_drift, 0.0, 1.0, False),
                ("--max-output-shift", self.max_output_shift, 0.0, 1.0, False)):
            if value is not None and not (low < value <= high if open_low else low <= value <= high):
                shown = f"{value:.4g}" if isinstance(value, float) else repr(value)
                raise RolloutError(f"{name} must be {'above' if open_low else 'at least'} {low:g} and at most "
                                   f"{high:g} (percentages: {'above ' if open_low else ''}{low:.0%} to {high:.0%}), "
                                   f"got {shown}")
        self._check_waves()
        if not self.wave_timeout_s > 0 or not self.probation_s >= 0:
            raise RolloutError(f"--wave-timeout must be > 0 and --probation >= 0, got {self.wave_timeout_s:g} s "
                               f"and {self.probation_s:g} s")
        if isinstance(self.min_devices, bool) or not isinstance(self.min_devices, int) or self.min_devices < 1:
            raise RolloutError(f"--min-devices must be an integer >= 1, got {self.min_devices!r}")
        if self.max_p99_regression is not None and not self.max_p99_regression > 1.0:
            raise RolloutError(f"--max-p99-regression is a factor on the previous p99 and must be above 1, got "
                               f"{self.max_p99_regression:g}")
        try:
            Thresholds.from_dict(self.thresholds())
        except ConfigError as exc:
            raise RolloutError(f"bad device threshold: {exc.message}") from exc

    def _check_targets(self) -> None:
        if not self.targets:
            raise RolloutError("--targets must name at least one compile target", hint="e.g. --targets onnx-int8")
        bad = [t for t in self.targets if not _NAME.fullmatch(t)]
        if bad or len(set(self.targets)) != len(self.targets):
            raise RolloutError(f"--targets must be distinct target names, got {list(self.targets)}")

    def _check_waves(self) -> None:
        waves = list(self.waves)
        if not waves or any(not 0.0 < w <= 1.0 for w in waves) or waves != sorted(set(waves)) or waves[-1] != 1.0:
            raise RolloutError(f"--waves must be increasing percentages above 0% ending at 100%, got "
                               f"{', '.join(f'{w:.0%}' for w in waves) or 'none'}", hint="e.g. --waves 25%,50%,100%")

    def thresholds(self) -> dict[str, float]:
        """The health thresholds sent to each agent with its update command."""
        out: dict[str, float] = {"probation_s": self.probation_s}
        if self.max_error_rate is not None:
            out["max_error_rate"] = self.max_error_rate
        if self.max_p99_regression is not None:
            out["p99_factor"] = self.max_p99_regression
        if self.max_drift is not None:
            out["max_drift"] = self.max_drift
        if self.max_output_shift is not None and self.max_output_shift != _DEFAULT_OUTPUT_SHIFT:
            out["max_output_shift"] = self.max_output_shift
        return {**out, **dict(self.device_thresholds)}

    def to_dict(self) -> dict[str, Any]:
        """The JSON form stored with the rollout."""
        doc = asdict(self)
        doc.update(targets=list(self.targets), waves=list(self.waves), select=dict(self.select),
                   device_thresholds=dict(self.device_thresholds))
        return doc

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> RolloutOptions:
        """The options of :meth:`to_dict` (validated again).

        Raises:
            RolloutError: They are invalid.
        """
        try:
            return convert(cls, doc, where="rollout options")
        except RolloutError:
            raise
        except ConfigError as exc:
            raise RolloutError(exc.message, hint=exc.hint) from None
