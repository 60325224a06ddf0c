"""One short function per state: ``step(ctx) -> Event``. :data:`STEPS` maps each state to its step.

Every step is idempotent (it may run again after a crash) and reports failure by returning
``ctx.fail(reason)``; the reason is what the device reports. The world outside (the registry, the
clock, the model host, the drift monitor) comes in through :class:`UpdateContext`, so unit tests pass
in-memory fakes and the agent passes the real things.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import numpy as np

from edgeml import fsutil
from edgeml.bundle import Bundle, sha256_file
from edgeml.edge_agent.runtimes.base import latency_ms, open_runtime
from edgeml.edge_agent.serving import LoadedModel, ModelHost, RuntimeFactory, load_model
from edgeml.edge_agent.tuf_client import VerifiedBundle
from edgeml.errors import EdgeMLError, UpdateVerificationError
from edgeml.protocol import Cause

from .health import Baseline, Verdict, compare_golden, judge, mean_confidence
from .slots import SlotInfo, Slots
from .states import Event, State
from .store import RecordStore, UpdateRecord

__all__ = ["STEPS", "Clock", "Fetch", "FetchDelta", "SystemClock", "UpdateContext"]

#: ``fetch(name, version, target)``: a verified download (e.g. :meth:`TufClient.fetch`).
Fetch = Callable[[str, str, str], VerifiedBundle]
#: ``fetch_delta(name, version, target, base_version, base_slot_dir)``: the bundle rebuilt from a signed delta
#: and the slot that serves ``base_version``, checked against the bundle's signed hash
#: (e.g. :meth:`TufClient.fetch_delta`).
FetchDelta = Callable[[str, str, str, str, Path], VerifiedBundle]


class Clock(Protocol):
    """Wall-clock time (persisted, so it must survive a reboot) and sleeping."""

    def time(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The real clock."""

    def time(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


@dataclass
class UpdateContext:
    """What the steps work with.

    Attributes:
        record: The update record (steps change it; ``save`` persists it).
        store: Where the record lives.
        slots: The A/B slots.
        host: The model host that serves requests.
        fetch: The verified download.
        clock: Time and sleep.
        drift: ``drift(version)`` -> the drift monitor's score for live data, or None.
        output_shift: ``output_shift(version)`` -> the drift monitor's output-shift score for live data, or
            None (no output sketches, or no window yet).
        threads: Runtime threads for loaded models.
        poll_s: How often probation looks at the health numbers.
        candidate: The new model once loaded (by the smoke test), until it serves or is dropped.
        interrupt: Returns a reason to end probation with a rollback now (e.g. the fleet aborted the
            rollout), or None.
        fetched: The download this run fetched (in memory only: after a restart it is None, and VERIFY
            checks the file on disk in full).
        staged: The slot this run staged (in memory only, like ``fetched``): the smoke test loads it
            without hashing it again; after a restart it checks the slot against the record first.
        fetch_delta: Rebuilds the bundle from a signed delta and the active slot (None: full bundles only).
        runtimes: Makes the runtime of every model it loads (the fleet simulator passes its own).
    """

    record: UpdateRecord
    store: RecordStore
    slots: Slots
    host: ModelHost
    fetch: Fetch
    clock: Clock
    drift: Callable[[str], float | None] | None = None
    threads: int = 1
    poll_s: float = 0.05
    candidate: LoadedModel | None = None
    interrupt: Callable[[], str | None] | None = None  # a reason to stop probation now (the fleet said so)
    fetched: VerifiedBundle | None = None
    staged: SlotInfo | None = None
    output_shift: Callable[[str], float | None] | None = None
    fetch_delta: FetchDelta | None = None
    runtimes: RuntimeFactory = open_runtime

    def save(self) -> None:
        self.store.save(self.record)

    def load(self, slot: str) -> LoadedModel:
        """Load the model of ``slot`` (threads and runtime factory as configured)."""
        return load_model(self.slots.path(slot), slot, threads=self.threads, runtimes=self.runtimes)

    def fail(self, reason: str, cause: Cause) -> Event:
        self.record.reason, self.record.cause = reason, cause.value
        return Event.FAIL

    def candidate_info(self) -> SlotInfo:
        r = self.record
        assert r.candidate_slot is not None and r.manifest_sha256 is not None, "staged before use"
        return SlotInfo(r.candidate_slot, r.version, r.manifest_sha256)

    def previous_info(self) -> SlotInfo | None:
        r = self.record
        if r.active_slot is None or r.previous_version is None or r.previous_manifest_sha256 is None:
            return None
        return SlotInfo(r.active_slot, r.previous_version, r.previous_manifest_sha256)

    def drop_candidate(self) -> None:
        model, self.candidate = self.candidate, None
        if model is not None and model is not self.host.active and model is not self.host.previous:
            self.host.release(model)

    def drop_download(self) -> None:
        if self.record.bundle_path:
            Path(self.record.bundle_path).unlink(missing_ok=True)


def notified(ctx: UpdateContext) -> Event:
    """Note what serves now (the rollback target); refuse the version that already serves."""
    r = ctx.record
    active = ctx.slots.active()
    if active is not None and active.version == r.version:
        return ctx.fail(f"version {r.version} is already serving", Cause.ALREADY_SERVING)
    r.active_slot = active.slot if active else None
    r.previous_version = active.version if active else None
    r.previous_manifest_sha256 = active.manifest_sha256 if active else None
    if r.delta_from is not None:
        why = _no_delta(ctx, r.delta_from)
        if why is None:
            return Event.DELTA
        r.transfer = {"kind": "full", "fallback": why}
    return Event.OK  # persisted with the next state, before its step runs (this step is cheap to redo)


def _no_delta(ctx: UpdateContext, base: str) -> str | None:
    """Why the delta from ``base`` cannot be used here, or None when it can be tried."""
    if ctx.fetch_delta is None:
        return "this device cannot apply deltas (pip install 'edgeml[delta]')"
    if ctx.record.previous_version != base:
        return f"the delta's base is {base}, but this device serves {ctx.record.previous_version or 'nothing'}"
    return None


def patch(ctx: UpdateContext) -> Event:
    """Rebuild the bundle from the active slot and the signed delta, checked against the bundle's signed hash.

    Any failure (the delta missing or refused, the slot modified, a damaged patch, a result that is not the
    signed bundle) returns FAIL without a reason: the update goes on with the full bundle (DOWNLOAD), and the
    fallback's reason travels in ``transfer``.
    """
    r = ctx.record
    if r.bundle_path and r.bundle_sha256 and Path(r.bundle_path).is_file() \
            and sha256_file(r.bundle_path) == r.bundle_sha256:
        return Event.OK  # rebuilt and durable before a crash
    assert ctx.fetch_delta is not None and r.delta_from is not None and r.active_slot is not None, "checked"
    try:
        got = ctx.fetch_delta(r.model, r.version, r.target, r.delta_from, ctx.slots.path(r.active_slot))
    except EdgeMLError as exc:
        r.transfer = {"kind": "full", "fallback": f"delta from {r.delta_from}: {exc.message}"[:1000]}
        r.bundle_path = r.bundle_sha256 = None
        return Event.FAIL
    _make_durable(got.path)
    r.bundle_path, r.bundle_sha256 = str(got.path), got.sha256
    r.transfer = {"kind": "delta", "bytes": got.fetched_bytes, "full_bytes": got.length}
    ctx.fetched = got
    return Event.OK


def download(ctx: UpdateContext) -> Event:
    """Fetch the verified bundle (the fetcher resumes partial downloads) and make it durable."""
    r = ctx.record
    if r.bundle_path and r.bundle_sha256 and Path(r.bundle_path).is_file() \
            and sha256_file(r.bundle_path) == r.bundle_sha256:
        return Event.OK  # downloaded and verified before a crash, and durable
    try:
        got = ctx.fetch(r.model, r.version, r.target)
    except UpdateVerificationError as exc:
        return ctx.fail(f"verification failed ({exc.kind}): {exc.message}", Cause.VERIFICATION)
    except EdgeMLError as exc:
        return ctx.fail(f"download failed: {exc.message}", Cause.DOWNLOAD)
    _make_durable(got.path)  # before the record (persisted on entering VERIFY) says it is downloaded
    r.bundle_path, r.bundle_sha256 = str(got.path), got.sha256
    fallback = (r.transfer or {}).get("fallback")
    r.transfer = {"kind": "full", "bytes": got.fetched_bytes, "full_bytes": got.length,
                  **({"fallback": fallback} if fallback else {})}
    ctx.fetched = got
    return Event.OK


def verify(ctx: UpdateContext) -> Event:
    """Re-check the download against its signed hash, every member's hash, and the request.

    A bundle this run's fetch has just checked against its signed hash (``VerifiedBundle.checked``) is not
    hashed again: only its manifest is read, and staging hashes every member as it extracts it. After a restart
    (and for a fetch that does not check) everything is re-checked here.
    """
    r = ctx.record
    assert r.bundle_path is not None and r.bundle_sha256 is not None, "downloaded before verify"
    got = ctx.fetched
    checked = got is not None and got.checked and (str(got.path), got.sha256) == (r.bundle_path, r.bundle_sha256)
    if not checked and sha256_file(r.bundle_path) != r.bundle_sha256:
        return ctx.fail("verification failed: the downloaded bundle differs from its signed sha256",
                        Cause.VERIFICATION)
    try:
        with Bundle(r.bundle_path) as bundle:
            if not checked:
                bundle.verify()
            m = bundle.manifest
    except EdgeMLError as exc:
        return ctx.fail(f"verification failed: {exc.message}", Cause.VERIFICATION)
    if (m.name, m.version, m.target) != (r.model, r.version, r.target):
        return ctx.fail(f"verification failed: the bundle is {m.name} {m.version} {m.target}, "
                        f"not the {r.model} {r.version} {r.target} requested", Cause.VERIFICATION)
    return Event.OK


def stage(ctx: UpdateContext) -> Event:
    """Extract into the inactive slot (temporary directory, fsync, rename)."""
    r = ctx.record
    assert r.bundle_path is not None
    slot = r.candidate_slot or ctx.slots.inactive()
    try:
        info = ctx.slots.stage(r.bundle_path, slot)
    except EdgeMLError as exc:
        return ctx.fail(f"staging failed: {exc.message}", Cause.STAGING)
    r.candidate_slot, r.manifest_sha256 = slot, info.manifest_sha256
    ctx.staged = info  # extracted with every hash checked; persisted on entering SMOKE_TEST
    return Event.OK


def smoke_test(ctx: UpdateContext) -> Event:
    """Load the staged model, check its golden vectors, and measure the baseline the probation judges by."""
    info = ctx.candidate_info()
    try:
        if ctx.staged != info:  # staged before a restart: check the slot against the record first
            ctx.slots.verify(info)
        ctx.drop_candidate()
        ctx.candidate = ctx.load(info.slot)
        inputs, expected = _golden(ctx.slots.path(info.slot), ctx.candidate)
        actual = ctx.candidate.infer(inputs)
    except EdgeMLError as exc:
        ctx.drop_candidate()
        return ctx.fail(f"smoke test: the model does not load or run: {exc.message}", Cause.LOAD)
    golden = ctx.candidate.manifest.golden or {}
    reason = compare_golden(actual, expected, golden, str(ctx.candidate.manifest.runtime.get("precision", "fp32")))
    if reason is not None:
        ctx.drop_candidate()
        return ctx.fail(f"smoke test: golden vectors: {reason}", Cause.GOLDEN)
    ctx.record.baseline = _baseline(ctx, ctx.candidate, inputs, next(iter(actual.values())))
    return Event.OK  # the baseline is persisted on entering SWITCH


def _make_durable(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    fsutil.fsync_dir(path.parent)


def _golden(slot_dir: Path, model: LoadedModel) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    golden = model.manifest.golden
    if not golden:
        raise EdgeMLError("the bundle has no golden vectors, so this device cannot check it")
    with np.load(slot_dir / golden["file"]) as data:
        inputs = {k[3:]: data[k] for k in data.files if k.startswith("in:")}
        expected = {k[4:]: data[k] for k in data.files if k.startswith("out:")}
    if not inputs or not expected:
        raise EdgeMLError(f"{golden['file']} holds no in:/out: arrays")
    return inputs, expected


def _baseline(ctx: UpdateContext, model: LoadedModel, golden_inputs: dict[str, np.ndarray],
              candidate_outputs: np.ndarray) -> dict[str, float | None]:
    """p99 and confidence to judge the new model against: the outgoing model's on this device.

    From its live traffic when it has served enough requests; otherwise measured here on the golden inputs
    (the outgoing model's latency and confidence on them; for a first model, its own).
    """
    limits = ctx.record.limits
    old = ctx.host.active
    live = ctx.host.stats(old.version).snapshot() if old is not None else None
    enough = live is not None and live.requests >= max(limits.min_requests, 1)
    sample = {k: v[:1] for k, v in golden_inputs.items()}
    if enough and live is not None and live.p99_ms is not None:
        p99 = live.p99_ms
    else:
        measured = (old or model).runtime
        p99 = latency_ms(measured, sample, warmup=3, min_runs=20, budget_s=limits.smoke_latency_budget_s)["p99_ms"]
    if enough and live is not None and live.confidence is not None:
        confidence: float | None = live.confidence
    elif old is not None:  # the outgoing model on the same inputs, not the candidate judging itself
        try:
            confidence = mean_confidence(next(iter(old.infer(golden_inputs).values())))
        except EdgeMLError:
            confidence = mean_confidence(candidate_outputs)
    else:
        confidence = mean_confidence(candidate_outputs)
    return {"p99_ms": p99, "confidence": confidence}


def switch(ctx: UpdateContext) -> Event:
    """Point at the candidate slot, swap it in, and keep the previous model loaded for a rollback."""
    r, info = ctx.record, ctx.candidate_info()
    active = ctx.host.active
    if active is None or (active.slot, active.version) != (info.slot, info.version):
        model = ctx.candidate
        if model is None:  # restarted since the smoke test
            try:
                ctx.slots.verify(info)
                model = ctx.load(info.slot)
            except EdgeMLError as exc:
                return ctx.fail(f"switch: the staged model no longer loads: {exc.message}", Cause.LOAD)
        ctx.slots.set_active(info)
        ctx.host.reset_stats(r.version)
        ctx.host.swap(model, keep_previous=True)
    ctx.candidate = None
    previous = ctx.previous_info()
    held = ctx.host.previous
    if previous is not None and (held is None or held.slot != previous.slot):
        try:  # keep the old model loaded so that a rollback is a pointer swap
            ctx.slots.verify(previous)
            ctx.host.set_previous(ctx.load(previous.slot))
        except EdgeMLError:
            pass  # a rollback will try again (and say why it cannot)
    return Event.OK


def probation(ctx: UpdateContext) -> Event:
    """Watch the new model's health until the window ends (OK) or a check fails (FAIL)."""
    r = ctx.record
    limits = r.limits
    if r.probation_started is None:
        r.probation_started = ctx.clock.time()
        ctx.save()
    baseline = Baseline(**(r.baseline or {"p99_ms": 0.0}))  # type: ignore[arg-type]
    while True:
        drift = ctx.drift(r.version) if ctx.drift is not None else None
        shift = ctx.output_shift(r.version) if ctx.output_shift is not None else None
        snap = replace(ctx.host.stats(r.version).snapshot(), crashes=r.crashes, drift=drift, output_shift=shift)
        verdict = judge(snap, baseline, limits)
        if verdict is None and ctx.interrupt is not None:
            asked = ctx.interrupt()
            verdict = Verdict(Cause.FLEET, asked) if asked is not None else None
        if verdict is not None:
            return ctx.fail(f"probation: {verdict.reason}", verdict.cause)
        elapsed = ctx.clock.time() - r.probation_started
        if elapsed >= limits.probation_s and (snap.requests >= limits.min_requests
                                              or elapsed >= limits.max_probation_s):
            return Event.OK
        ctx.clock.sleep(ctx.poll_s)


def commit(ctx: UpdateContext) -> Event:
    """Keep the new model: release the previous runtime and the download."""
    ctx.host.release_previous()
    ctx.drop_download()
    ctx.record.reason = ctx.record.cause = None
    return Event.OK


def rollback(ctx: UpdateContext) -> Event:
    """Point back at the previous slot and swap its (still loaded) runtime in; drop the candidate."""
    previous, host = ctx.previous_info(), ctx.host
    if previous is None:  # a first model failed: serve nothing rather than an unhealthy model
        ctx.slots.clear_active()
        host.swap(None, keep_previous=False)
    else:
        model = next((m for m in (host.previous, host.active) if m is not None and m.slot == previous.slot), None)
        if model is None:
            ctx.slots.verify(previous)
            model = ctx.load(previous.slot)
        ctx.slots.set_active(previous)
        host.swap(model, keep_previous=False)
    ctx.drop_candidate()
    if ctx.record.candidate_slot is not None:
        ctx.slots.remove(ctx.record.candidate_slot)
    ctx.drop_download()
    return Event.OK


def abort(ctx: UpdateContext) -> Event:
    """Discard the candidate before it ever served; nothing served changes."""
    ctx.drop_candidate()
    if ctx.record.candidate_slot is not None:
        ctx.slots.remove(ctx.record.candidate_slot)
    ctx.drop_download()
    return Event.OK


#: state -> its step (terminal states have none).
STEPS: dict[State, Callable[[UpdateContext], Event]] = {
    State.NOTIFIED: notified,
    State.PATCH: patch,
    State.DOWNLOAD: download,
    State.VERIFY: verify,
    State.STAGE: stage,
    State.SMOKE_TEST: smoke_test,
    State.SWITCH: switch,
    State.PROBATION: probation,
    State.COMMIT: commit,
    State.ROLLBACK: rollback,
    State.ABORT: abort,
}
