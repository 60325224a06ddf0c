"""The health limits a device judges a new model by during probation: one contract for the fleet, which sends
them with each rollout's update command, and the device, which applies them. Standard library only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from edgeml.errors import ConfigError

__all__ = ["Thresholds"]


@dataclass(frozen=True)
class Thresholds:
    """Health limits during probation. A rollout may override any of them.

    Attributes:
        max_error_rate: Fraction of failed requests (0..1) above which the model rolls back.
        p99_factor: The new model's p99 latency may be at most this times the baseline p99 ...
        p99_slack_ms: ... plus this many milliseconds (scheduler jitter on a shared device).
        max_crashes: Roll back once the agent process has died this many times during probation.
        max_confidence_drop: Roll back when the mean top-1 confidence falls this much (0..1) below the
            baseline.
        max_drift: Roll back when the drift score (from the drift monitor, if any) exceeds this.
        max_output_shift: Roll back when the output-shift score exceeds this: the largest KS distance (0..1)
            between the model's live output features and the reference sketches (its bundle's, and those of
            the model it replaced), counted only when significant. Works for any model type.
        probation_s: Seconds of probation before a commit.
        min_requests: Requests needed before the latency, error and confidence checks count (and before a
            commit, unless ``max_probation_s`` passes without them).
        max_probation_s: Commit after this long even with fewer than ``min_requests`` (no traffic, no
            evidence of harm).
        smoke_latency_budget_s: Seconds spent measuring latency in the smoke test.
    """

    max_error_rate: float = 0.05
    p99_factor: float = 3.0
    p99_slack_ms: float = 5.0
    max_crashes: int = 2
    max_confidence_drop: float = 0.25
    max_drift: float = 0.5
    max_output_shift: float = 0.5
    probation_s: float = 300.0
    min_requests: int = 50
    max_probation_s: float = 3600.0
    smoke_latency_budget_s: float = 0.3

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Thresholds:
        """Defaults overridden by ``data`` (e.g. the rollout's ``thresholds``).

        Raises:
            ConfigError: An unknown key, or a value that is not a non-negative number.
        """
        known = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, value in (data or {}).items():
            if key not in known:
                raise ConfigError(f"unknown health threshold {key!r}; known: {', '.join(sorted(known))}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"health threshold {key} must be a non-negative number, got {value!r}")
            values[key] = int(value) if known[key].type in (int, "int") else float(value)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
