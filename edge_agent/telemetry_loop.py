"""The agent's accounting of live traffic: per-request numbers, drift per model version, periodic reports.

Every request is counted in the :class:`~edgeml.edge_agent.telemetry.Aggregator` (the model host hands its
latencies on in batches, as its ``sink``), and :meth:`TelemetryLoop.sample`, the host's sampler, gives the
inputs and outputs of every request while they come slowly (a regular sample when they do not) to the drift
monitor of the version that served it (built from that bundle's reference statistics), so a model on
probation is judged on its own traffic. The monitor of a model that replaced another one also compares
its live outputs with the replaced model's output sketches (the output shift); telemetry reports the input
drift as ``drift`` and the output shift as ``output_drift``. Low-confidence inputs are offered to the
capture store off the request path. :meth:`TelemetryLoop.report`, once per interval, appends the window's
metrics to the durable outbox and lets the :class:`~edgeml.edge_agent.telemetry.TelemetrySender` deliver them.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeml.edge_agent.capture import CaptureStore
from edgeml.edge_agent.device_messages import device_event
from edgeml.edge_agent.drift import DriftMonitor, DriftWindow
from edgeml.edge_agent.outbox import Outbox
from edgeml.edge_agent.telemetry import Aggregator, SystemProbe, TelemetrySender
from edgeml.errors import EdgeMLError
from edgeml.protocol import DriftEvent
from edgeml.refstats import ReferenceStats

if TYPE_CHECKING:
    from edgeml.edge_agent.agent import Agent
    from edgeml.edge_agent.serving import LoadedModel

__all__ = ["TelemetryLoop"]

_log = logging.getLogger(__name__)
_CAPTURE_QUEUE = 64  # batches waiting for the capture store (dropped beyond)
_CAPTURE_EVERY = 2  # offer one drift-observed request in this many to the capture store (which samples again)
#: Requests per second the drift monitors see at most: below it every request is observed, above it a regular
#: sample (one in ceil(rate / budget)), so that drift accounting costs a bounded share of the CPU.
DRIFT_REQUESTS_PER_S = 500
#: Input rows (samples) per second the drift monitors see at most: the same bound for batched requests, whose
#: cost grows with their rows (about 10 us for one row, 75 us for 32 on a 2-core x86 host).
DRIFT_ROWS_PER_S = 4000


class TelemetryLoop:
    """Telemetry, drift and capture of one agent.

    Args:
        agent: The agent (its client, device id, model host and events).
        state_dir: Where the outbox (``telemetry.sqlite``) and the capture store live.
    """

    def __init__(self, agent: Agent, state_dir: Path) -> None:
        self.agent = agent
        self.aggregator = Aggregator(probe=SystemProbe())
        agent.host.sink = self.aggregator  # every request's latency and rows, handed on in batches
        agent.host.sampler = self.sample  # drift: one request in N
        self.outbox = Outbox(state_dir / "telemetry.sqlite", agent.device_id)
        self.sender = TelemetrySender(agent.client, agent.device_id, self.outbox)
        self.capture = CaptureStore(state_dir / "capture")
        self._monitors: dict[str, DriftMonitor | None] = {}
        self._windows: dict[str, DriftWindow] = {}
        self._lock = threading.Lock()
        self._captures: deque[tuple[np.ndarray, np.ndarray, str]] = deque(maxlen=_CAPTURE_QUEUE)
        self._seen = 0  # requests observed for drift
        self._drift_every = 1  # observe one request in this many for drift (see DRIFT_REQUESTS_PER_S)
        self._since = 0  # requests since the rate was last measured
        self._rate_mark = time.monotonic()

    def start(self) -> None:
        """Nothing runs on its own: the agent's tick thread calls :meth:`report`."""

    def stop(self) -> None:
        """Close the outbox (what is in it stays for the next start)."""
        self.outbox.close()

    # --- the request path (keep it cheap) ----------------------------------------------------------------

    def sample(self, version: str, inputs: Mapping[str, np.ndarray], outputs: dict[str, np.ndarray],
               latency_s: float) -> int:
        """Observe one request for drift; return how many requests until the next (the model host's sampler).

        Every request at first; from then on the rate is measured every 256 requests and, above
        DRIFT_REQUESTS_PER_S requests or DRIFT_ROWS_PER_S rows a second, one request in ceil(rate / budget) is
        observed. (The request's latency reaches the aggregator through the host's ``sink``, from the numbers
        the health judge keeps anyway.)
        """
        self._seen += 1
        self._since += self._drift_every
        first = next(iter(inputs.values()))
        self._drift(version, first, outputs)
        if self._since >= 256:
            now = time.monotonic()
            elapsed, self._rate_mark = now - self._rate_mark, now
            rate, self._since = (self._since / elapsed if elapsed > 0 else 0.0), 0
            rows = len(first) if first.ndim else 1
            self._drift_every = max(1, math.ceil(rate / DRIFT_REQUESTS_PER_S),
                                    math.ceil(rate * rows / DRIFT_ROWS_PER_S))
        return self._drift_every

    def _drift(self, version: str, first: np.ndarray, outputs: dict[str, np.ndarray]) -> None:
        monitor = self._monitors[version] if version in self._monitors else self._monitor_for(version)
        if monitor is None:
            return
        probs = next(iter(outputs.values()))
        scores = probs if probs.ndim == 2 and probs.shape[1] >= 2 else None  # class scores, or not a classifier
        try:
            windows = monitor.observe(first, scores, outputs if monitor.output_feature_names else None)
        except EdgeMLError:  # inputs the reference does not describe: drift cannot judge them
            return
        for window in windows:
            self._windows[version] = window
            if window.alert:
                self.agent.send_event(device_event(DriftEvent, self.agent.device_id, version=version,
                                               window=window.to_metrics()))
        if probs.ndim == 2 and len(self._captures) < _CAPTURE_QUEUE and not self._seen % _CAPTURE_EVERY:
            self._captures.append((first, probs, version))  # the store keeps the low-confidence ones, sampled

    def _monitor_for(self, version: str) -> DriftMonitor | None:
        with self._lock:
            if version in self._monitors:
                return self._monitors[version]
            monitor = None
            host = self.agent.host
            model = next((m for m in (host.active, host.previous) if m is not None and m.version == version), None)
            ref = self._refstats(model) if model is not None else None
            if ref is not None:
                replaced = host.previous if model is host.active and host.previous is not None \
                    and host.previous.version != version else None
                baseline = self._refstats(replaced) if replaced is not None else None
                try:
                    monitor = DriftMonitor.from_refstats(ref, baseline=baseline)
                except EdgeMLError as exc:
                    _log.warning("no drift monitoring for %s: %s", version, exc)
            self._monitors[version] = monitor
            return monitor

    def _refstats(self, model: LoadedModel) -> ReferenceStats | None:
        """The reference statistics in ``model``'s slot, or None (none in the bundle, or unreadable)."""
        ref = model.manifest.refstats
        if not ref:
            return None
        path = self.agent.machine.slots.path(model.slot) / ref["file"]
        try:
            return ReferenceStats.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            _log.warning("no reference statistics for %s: %s", model.version, exc)
            return None

    # --- what the update machine asks ---------------------------------------------------------------------

    def drift_score(self, version: str) -> float | None:
        """The live drift score of ``version`` for the health judge: the effect size of its latest window when
        that window is flagged, 0 when it is not, None before the first window."""
        window = self._windows.get(version)
        if window is None:
            return None
        return window.score if window.flagged else 0.0

    def output_shift_score(self, version: str) -> float | None:
        """The live output-shift score of ``version`` for the health judge: the largest KS distance of its
        output features in its latest window when an output test is significant, 0 when none is, None before
        the first window or when its reference statistics do not sketch the outputs."""
        window = self._windows.get(version)
        if window is None or window.output_score is None:
            return None
        return window.output_score if window.output_flagged else 0.0

    # --- MQTT hooks -------------------------------------------------------------------------------------

    def on_connect(self) -> None:
        self.sender.on_connect()

    def on_ack(self, seq: int) -> None:
        self.sender.on_ack(seq)

    # --- periodic work ----------------------------------------------------------------------------------

    def report(self) -> None:
        """Append this window's metrics to the outbox and send what may be sent; file the captured samples."""
        self._file_captures()
        active = self.agent.host.active
        version = active.version if active else None
        window = self._windows.get(version) if version else None
        extra: dict[str, Any] = {
            "model": active.manifest.name if active else None, "version": version,
            "slot": active.slot if active else None, "status": self.agent._status_word(),
            "drift": window.to_metrics() if window else None,
            "output_drift": window.output_metrics() if window else None,
            "dropped": self.outbox.dropped, "captured": len(self.capture),
        }
        self.agent.host.flush()  # the latencies the host has not handed on yet belong to this window
        self.sender.submit(self.aggregator.snapshot_and_reset(extra=extra))

    def _file_captures(self) -> None:
        while self._captures:
            inputs, probs, version = self._captures.popleft()
            host = self.agent.host
            model = next((m for m in (host.active, host.previous) if m is not None and m.version == version), None)
            extra = {"version": version} if model is None else {
                "model": model.manifest.name, "version": version, "target": model.manifest.target}
            try:
                self.capture.offer(inputs, probs, extra=extra)
            except EdgeMLError as exc:
                _log.warning("capture failed: %s", exc)
                return

    def capture_summary(self) -> dict[str, Any]:
        """How many low-confidence samples are kept, for the fleet's ``capture`` command."""
        return {"entries": len(self.capture), "bytes": self.capture.total_bytes}
