"""The rules of a staged rollout: options, planning and the per-tick decision. Pure: no I/O, no clock.

A rollout moves one model version onto the devices a tag selection names, in waves:

Options (:class:`RolloutOptions`, the ``parse_*`` helpers and :class:`RolloutError`) live in
:mod:`~edgeml.fleet.rollouts.options` and are re-exported here.

* :func:`plan` orders the selected devices by a hash of (rollout id, device id), so the canary differs between
  rollouts but is reproducible, picks each device's target (the first of ``targets`` that the version has and
  whose runtime requirement the device's reported capabilities satisfy) and cuts the order into the canary
  (wave 0: ``max(ceil(canary x n), min_devices)`` devices) and the waves (cumulative fractions of ``n``, the
  devices that can run a target).
* :func:`decide` looks at the rollout and its device rows at one moment and returns the :class:`Action`\\ s to
  take. The controller (:mod:`~edgeml.fleet.rollouts.controller`) writes them to the database, then sends the commands.

Device row states, rollout phases and the undo states, with their transitions: :mod:`~edgeml.fleet.rollouts.states`.

Failure rate: ``(rolled_back + failed + timed_out) / (committed + rolled_back + failed + timed_out)`` over the
devices of the waves so far; incompatible devices do not count; a timeout counts as a failure (a device that
cannot finish an update in time is not a success). It aborts the rollout when it exceeds
``max_failure_rate`` once at least ``min(min_devices, size of the current wave)`` devices have finished.

Model signals, each judged on the devices of the waves so far once as many of them have a value: the median
of the per-device values must not exceed the limit.

* p99 regression: a device's new-version p99 over its previous-version p99 (:class:`DeviceSignals`, from
  telemetry when the controller has it); a device that rolled back with cause ``latency`` counts as an
  infinite regression (the agent's own judge found it too slow; its limit is ``max_p99_regression``).
* error rate: the device's error rate; a rollback with cause ``error_rate`` counts as infinite.
* drift: the device's drift score (its ``drift`` events); a rollback with cause ``drift`` counts as infinite.
* output shift: the device's output-shift score (how far its outputs moved from the bundle's reference statistics,
  from telemetry; any model type); a rollback with cause ``output_shift`` counts as infinite.

The cause is the agent's :class:`~edgeml.protocol.Cause`, stored with the device's row; the reason text is
for people and is never read by a rule.

Rollout states: ``pending`` (created, files not broadcast yet), ``canary``, ``wave-N``, ``paused``,
``completed``, ``aborted``. After an abort, devices still updating are told to roll back and devices that
committed are sent an update back to the version they had (``revert`` states, :class:`TellRollback`); a device
that never answers ends as ``timed_out``, and devices that were still waiting are never told anything.
"""

from __future__ import annotations

import hashlib
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from typing import Any

from edgeml.capabilities import Capabilities
from edgeml.fleet.rollouts.options import (
    RolloutError,
    RolloutOptions,
    parse_duration,
    parse_fraction,
    parse_selection,
)
from edgeml.fleet.rollouts.states import (
    FAILURES,
    FINISHED,
    IN_FLIGHT,
    TERMINAL,
    Phase,
    RevertState,
    RowState,
    phase_of,
    stored_state,
)
from edgeml.protocol import Cause

__all__ = [
    "FAILURES",
    "FINISHED",
    "IN_FLIGHT",
    "TERMINAL",
    "AbortRollout",
    "Action",
    "AdvanceWave",
    "Assignment",
    "CompleteRollout",
    "DeviceFacts",
    "DeviceRow",
    "DeviceSignals",
    "NotifyDevices",
    "RolloutError",
    "RolloutOptions",
    "RolloutView",
    "TellRollback",
    "TimeOut",
    "choose_target",
    "decide",
    "order",
    "parse_duration",
    "parse_fraction",
    "parse_selection",
    "plan",
    "wave_state",
]

# --- planning -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceFacts:
    """What the fleet knows about one enrolled device when a rollout is planned.

    Attributes:
        device_id: The device.
        tags: Its tags.
        capabilities: Its last reported capabilities (``Capabilities.to_dict``); None: never reported.
        installed: model -> version it runs.
        revoked: Whether it was revoked (revoked devices are never selected).
    """

    device_id: str
    tags: Mapping[str, str] = field(default_factory=dict)
    capabilities: Mapping[str, Any] | None = None
    installed: Mapping[str, str] = field(default_factory=dict)
    revoked: bool = False


@dataclass(frozen=True)
class Assignment:
    """One device's part in a planned rollout."""

    device_id: str
    wave: int
    target: str | None
    state: RowState  # pending, incompatible, or committed (already runs the version)
    reason: str | None = None
    previous: str | None = None  # the version it ran before (to go back to on abort)


def choose_target(capabilities: Mapping[str, Any] | None, preferred: Sequence[str],
                  available: Mapping[str, Mapping[str, Any]]) -> tuple[str | None, str]:
    """The first of ``preferred`` that ``available`` has and the device can run; else None and why not.

    Args:
        capabilities: The device's reported capabilities (None: never reported).
        preferred: Target names in order of preference.
        available: target -> its runtime requirement, for the version being rolled out.
    """
    if capabilities is None:
        return None, "the device never reported its capabilities"
    caps = Capabilities.from_dict(capabilities)
    why = []
    for target in preferred:
        if target not in available:
            why.append(f"{target}: not published for this version")
            continue
        problem = caps.incompatibility(dict(available[target]))
        if problem is None:
            return target, ""
        why.append(f"{target}: {problem}")
    return None, "; ".join(why)


def order(rollout_id: str, device_ids: Iterable[str]) -> list[str]:
    """The devices in the rollout's order (a hash of rollout id and device id; stable for a rollout)."""
    return sorted(device_ids, key=lambda d: (hashlib.sha256(f"{rollout_id}/{d}".encode()).hexdigest(), d))


def _wave_ends(n: int, options: RolloutOptions) -> list[int]:
    """Cumulative device counts at the end of the canary and of each wave."""
    ends = [min(n, max(math.ceil(options.canary * n - 1e-9), options.min_devices))]
    for fraction in options.waves:
        ends.append(max(ends[-1], min(n, math.ceil(fraction * n - 1e-9))))
    ends[-1] = n
    return ends


def plan(rollout_id: str, model: str, version: str, devices: Sequence[DeviceFacts], options: RolloutOptions,
         available: Mapping[str, Mapping[str, Any]]) -> list[Assignment]:
    """Assign each selected device its wave and target.

    Args:
        rollout_id: The rollout (seeds the order).
        model: The model's name.
        version: The version rolled out.
        devices: Every enrolled device.
        options: The rollout's options (``select`` and ``targets`` are used here).
        available: target -> runtime requirement, for every target published for ``model`` ``version``.

    Returns:
        One assignment per selected device, canary first, in rollout order.

    Raises:
        RolloutError: No device matches the selection, the version has none of the targets, or no selected
            device can run any of them.
    """
    if not set(options.targets) & set(available):
        raise RolloutError(f"{model} {version} has none of the targets {', '.join(options.targets)}",
                           hint=f"published targets: {', '.join(sorted(available)) or 'none'}")
    selected = {d.device_id: d for d in devices
                if not d.revoked and all(d.tags.get(k) == v for k, v in options.select.items())}
    if not selected:
        shown = ",".join(f"{k}={v}" for k, v in options.select.items()) or "(all)"
        raise RolloutError(f"no enrolled device matches --select {shown}", hint="check the tags with "
                           "`edgeml fleet devices ls`")
    chosen = {d: choose_target(selected[d].capabilities, options.targets, available) for d in selected}
    fit = [d for d in order(rollout_id, selected) if chosen[d][0] is not None]
    if not fit:
        first = next(iter(chosen.values()))[1]
        raise RolloutError(f"none of the {len(selected)} selected devices can run any of the targets "
                           f"{', '.join(options.targets)} (e.g. {first})")
    ends = _wave_ends(len(fit), options)
    out = []
    for i, device_id in enumerate(fit):
        wave = next(k for k, end in enumerate(ends) if i < end)
        previous = selected[device_id].installed.get(model)
        if previous == version:
            out.append(Assignment(device_id, wave, chosen[device_id][0], RowState.COMMITTED, f"already runs {version}"))
        else:
            out.append(Assignment(device_id, wave, chosen[device_id][0], RowState.PENDING, None, previous))
    last = len(ends) - 1
    for device_id in order(rollout_id, set(selected) - set(fit)):
        out.append(Assignment(device_id, last, None, RowState.INCOMPATIBLE, chosen[device_id][1][:1000]))
    return out


# --- the decision -------------------------------------------------------------------------------------------


def wave_state(wave: int) -> str:
    """The rollout state while ``wave`` runs: ``canary`` for wave 0, else ``wave-N``."""
    return stored_state(Phase.WAVE, wave)


@dataclass(frozen=True)
class RolloutView:
    """A rollout as :func:`decide` sees it."""

    id: str
    state: str  # pending, canary, wave-N, paused, completed, aborted
    current_wave: int
    wave_started_at: float | None
    options: RolloutOptions

    @property
    def last_wave(self) -> int:
        """The index of the last wave (the canary is wave 0)."""
        return len(self.options.waves)


@dataclass(frozen=True)
class DeviceRow:
    """One device's row of a rollout as :func:`decide` sees it (states as stored are accepted and converted)."""

    device_id: str
    wave: int
    state: RowState
    reason: str | None = None
    notified_at: float | None = None
    previous: str | None = None
    revert_state: RevertState = RevertState.NONE
    cause: str | None = None  # the agent's Cause of a failure or rollback (edgeml.protocol.Cause values)

    def __post_init__(self) -> None:
        object.__setattr__(self, "state", RowState(self.state))
        object.__setattr__(self, "revert_state", RevertState(self.revert_state or RevertState.NONE))


@dataclass(frozen=True)
class DeviceSignals:
    """Model signals of one device on the new version (None: not measured)."""

    p99_ratio: float | None = None
    error_rate: float | None = None
    drift: float | None = None
    output_shift: float | None = None


@dataclass(frozen=True)
class NotifyDevices:
    """Send these devices their update command (they are all in the current wave or an earlier one)."""

    device_ids: tuple[str, ...]


@dataclass(frozen=True)
class TimeOut:
    """These devices gave no result in time: they count as failed."""

    device_ids: tuple[str, ...]


@dataclass(frozen=True)
class AbortRollout:
    """Stop the rollout: no further device is updated."""

    reason: str


@dataclass(frozen=True)
class TellRollback:
    """Undo the update on these devices: ``rollback`` (still updating) or ``revert`` (committed: update back)."""

    how: RevertState
    device_ids: tuple[str, ...]


@dataclass(frozen=True)
class AdvanceWave:
    """Start ``wave`` (0: start the rollout with its canary)."""

    wave: int


@dataclass(frozen=True)
class CompleteRollout:
    """Every wave is done."""


Action = NotifyDevices | TimeOut | AbortRollout | TellRollback | AdvanceWave | CompleteRollout


def decide(rollout: RolloutView, devices: Sequence[DeviceRow], now: float, online: Set[str],
           signals: Mapping[str, DeviceSignals] | None = None) -> list[Action]:
    """What to do next.

    Args:
        rollout: The rollout.
        devices: All its device rows.
        now: The current time (Unix seconds).
        online: The devices connected now.
        signals: Model signals per device, where measured.

    Returns:
        The actions, in the order to apply them.
    """
    phase = phase_of(rollout.state)
    if phase is Phase.PENDING:
        return [AdvanceWave(0)]
    if phase is Phase.ABORTED:  # undo; devices that never answer end as timed out, the waiting ones stay
        rows, timed_out = _with_timeouts(rollout, devices, rollout.last_wave, now, offline=False)
        return ([TimeOut(timed_out)] if timed_out else []) + _undo(rows)
    if phase is Phase.PAUSED:
        return []
    wave = rollout.last_wave if phase is Phase.COMPLETED else rollout.current_wave
    rows, timed_out = _with_timeouts(rollout, devices, wave, now)
    actions: list[Action] = [TimeOut(timed_out)] if timed_out else []
    if phase is Phase.COMPLETED:  # late devices catch up; nothing else changes
        late = _to_notify(rows, wave, online)
        return actions + ([NotifyDevices(late)] if late else [])
    reason = _abort_reason(rows, wave, rollout.options, signals or {})
    if reason is not None:
        return actions + [AbortRollout(reason)] + _undo(rows)
    notify = _to_notify(rows, wave, online)
    if notify:
        actions.append(NotifyDevices(notify))
    elif all(d.state in TERMINAL for d in rows if d.wave <= wave):
        actions.append(CompleteRollout() if wave >= rollout.last_wave else AdvanceWave(wave + 1))
    return actions


def _with_timeouts(rollout: RolloutView, devices: Sequence[DeviceRow], wave: int, now: float,
                   offline: bool = True) -> tuple[list[DeviceRow], tuple[str, ...]]:
    """The rows with the devices past the wave timeout marked timed_out (notified ones; with ``offline``
    also waiting ones, from the wave's start), and their ids."""
    limit = rollout.options.wave_timeout_s
    started = rollout.wave_started_at if rollout.wave_started_at is not None else now
    rows, late = [], []
    for d in devices:
        since = d.notified_at if d.state in IN_FLIGHT else started if d.state is RowState.PENDING and offline else None
        if d.wave <= wave and since is not None and now - since > limit:
            d = DeviceRow(d.device_id, d.wave, RowState.TIMED_OUT, "no result within the wave timeout", d.notified_at,
                          d.previous, d.revert_state, None)
            late.append(d.device_id)
        rows.append(d)
    return rows, tuple(late)


def _to_notify(rows: Sequence[DeviceRow], wave: int, online: Set[str]) -> tuple[str, ...]:
    """Online devices of the waves so far that wait: pending, or timed out while offline (never notified)."""
    return tuple(d.device_id for d in rows if d.wave <= wave and d.device_id in online
                 and (d.state is RowState.PENDING or (d.state is RowState.TIMED_OUT and d.notified_at is None)))


def _abort_reason(rows: Sequence[DeviceRow], wave: int, options: RolloutOptions,
                  signals: Mapping[str, DeviceSignals]) -> str | None:
    sofar = [d for d in rows if d.wave <= wave]
    size = sum(1 for d in sofar if d.wave == wave and d.state is not RowState.INCOMPATIBLE)
    needed = max(1, min(options.min_devices, size))
    for name, limit, cause, attr in (("p99 regression", options.max_p99_regression, Cause.LATENCY, "p99_ratio"),
                                     ("error rate", options.max_error_rate, Cause.ERROR_RATE, "error_rate"),
                                     ("drift", options.max_drift, Cause.DRIFT, "drift"),
                                     ("output shift", options.max_output_shift, Cause.OUTPUT_SHIFT, "output_shift")):
        if limit is None:
            continue
        values = _signal_values(sofar, signals, cause, attr)
        if len(values) >= needed and statistics.median(values) > limit:
            shown = "every device rolled back for it" if math.isinf(statistics.median(values)) \
                else f"median {statistics.median(values):.3g}"
            return f"{name} past {limit:g} on {len(values)} devices ({shown})"
    finished = [d for d in sofar if d.state in FINISHED]
    failed = [d for d in finished if d.state in FAILURES]
    if len(finished) >= needed and len(failed) / len(finished) > options.max_failure_rate:
        return (f"failure rate {len(failed) / len(finished):.0%} ({len(failed)} of {len(finished)} finished "
                f"devices) exceeds {options.max_failure_rate:.0%}")
    return None


def _signal_values(rows: Sequence[DeviceRow], signals: Mapping[str, DeviceSignals], cause: Cause,
                   attr: str) -> list[float]:
    """One value per device that has one: measured, or infinite when it rolled back for this cause."""
    values = []
    for d in rows:
        measured = getattr(signals.get(d.device_id, DeviceSignals()), attr)
        if d.state is RowState.ROLLED_BACK and d.cause == cause.value:
            values.append(math.inf)
        elif measured is not None and d.state in (RowState.NOTIFIED, RowState.COMMITTED, RowState.ROLLED_BACK):
            values.append(float(measured))
    return values


def _undo(rows: Sequence[DeviceRow]) -> list[Action]:
    """After an abort: roll back the devices still updating, update back the ones that committed."""
    rollback = tuple(d.device_id for d in rows if d.state in IN_FLIGHT and d.revert_state is RevertState.NONE)
    revert = tuple(d.device_id for d in rows if d.state is RowState.COMMITTED and d.previous is not None
                   and d.revert_state in (RevertState.NONE, RevertState.ROLLBACK_SENT))
    actions: list[Action] = []
    if rollback:
        actions.append(TellRollback(RevertState.ROLLBACK, rollback))
    if revert:
        actions.append(TellRollback(RevertState.REVERT, revert))
    return actions
