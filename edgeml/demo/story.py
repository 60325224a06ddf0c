"""The demo's story, told against a running :class:`~edgeml.demo.fleet.DemoFleet`, and its summary.

Every number in the summary is read back from where it lives: the agents' own status API, the rollout
records and the audit log in the fleet's database, and the telemetry rows the ingest worker stored.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from edgeml.demo.fleet import SITE, DemoFleet, Traffic

__all__ = ["print_summary", "tell_the_story"]

#: Device health thresholds of the demo's rollouts: enough live requests to judge, a short probation, and
#: latency slack for a laptop that is busy with three agents, a broker and a fleet server at once (the story
#: is about confidence, not latency).
THRESHOLDS = {"min_requests": 20.0, "max_probation_s": 60.0, "p99_slack_ms": 50.0}


def _recorded(fleet: DemoFleet) -> bool:
    """Every agent's state (status and capabilities) is in the devices table."""
    db = fleet.server.db
    t = db.tables["devices"]
    names = [a.name for a in fleet.agents]
    with db.transaction() as conn:
        rows = conn.execute(db.sa.select(t.c.device_id, t.c.status, t.c.capabilities)
                            .where(t.c.device_id.in_(names))).all()
    return len(rows) == len(names) and all(r.capabilities and r.status in ("idle", "serving") for r in rows)


def _rollout(fleet: DemoFleet, version: str, targets: tuple[str, ...], **options: Any) -> str:
    from edgeml.fleet.audit.log import local_actor
    from edgeml.fleet.rollouts.rules import RolloutOptions
    from edgeml.fleet.rollouts.store import start_rollout

    opts = RolloutOptions(targets=targets, select={"site": SITE}, wave_timeout_s=120.0, max_failure_rate=0.1,
                          device_thresholds=THRESHOLDS, **options)
    rid = start_rollout(fleet.server.db, fleet.server.audit, "digits", version, opts, actor=local_actor())
    sizes = [sum(n for s, n in wave.items() if s != "incompatible") for wave in _status(fleet, rid).counts()]
    print(f"rollout {rid}: digits {version} to {sum(sizes)} devices, canary {sizes[0]}, then waves of "
          f"{', '.join(map(str, sizes[1:])) or 'none'}")
    return rid


def _status(fleet: DemoFleet, rid: str) -> Any:
    from edgeml.fleet.rollouts.store import rollout_status

    return rollout_status(fleet.server.db, rid)[0]


def _settled(fleet: DemoFleet, rid: str) -> Any:
    status = _status(fleet, rid)
    busy = any(d["state"] in ("pending", "notifying", "notified") and status.state != "aborted"
               or d["revert_state"] in ("rollback", "revert", "revert-sent") for d in status.devices)
    return status if status.state in ("completed", "aborted") and not busy else None


def _versions(fleet: DemoFleet) -> dict[str, str | None]:
    return {a.name: (a.status() or {}).get("version") for a in fleet.agents}


def _drift_rows(fleet: DemoFleet, device: str, since: float) -> list[dict[str, Any]]:
    """The device's stored telemetry windows since ``since`` (Unix seconds) that flagged drift."""
    db = fleet.server.db
    t = db.tables["telemetry"]
    with db.transaction() as conn:
        rows = conn.execute(db.sa.select(t.c.seq, t.c.metrics).where((t.c.device_id == device)
                                                                     & (t.c.sent_at >= since))).all()
    return [{"seq": r.seq, **r.metrics["drift"]} for r in rows
            if isinstance(r.metrics.get("drift"), dict) and r.metrics["drift"].get("flagged")]


def tell_the_story(fleet: DemoFleet, traffic: Traffic, clock: Any, url: str,
                   targets: tuple[str, ...]) -> dict[str, Any]:
    """v1 in waves, broken v2 aborted and rolled back, drift injected; returns the summary."""
    from edgeml.demo import V1, V2, DemoFailed
    from edgeml.fleet.audit.log import local_actor
    from edgeml.fleet.web.auth import create_token

    token = create_token(fleet.server.db, f"demo-viewer-{int(time.time())}", "viewer", audit=fleet.server.audit,
                         actor=local_actor())
    dashboard = f"{url}/#token={token}"
    print(f"\ndashboard: {dashboard}\n")
    clock.wait_for("every agent to report its state", lambda: _recorded(fleet), 60)

    print(f"== v1: rolling digits {V1} out in waves ==")
    v1 = _rollout(fleet, V1, targets, canary=0.3, waves=(0.66, 1.0), min_devices=1, probation_s=3.0)
    v1_status = clock.wait_for(f"rollout {v1} to finish", lambda: _settled(fleet, v1), 240)
    if v1_status.state != "completed":
        raise DemoFailed(f"rollout {v1} of {V1} ended {v1_status.state}: {v1_status.abort_reason}")
    clock.wait_for(f"every agent to serve {V1}", lambda: set(_versions(fleet).values()) == {V1}, 60)
    time.sleep(3.0)  # the old version's telemetry: the baseline the fleet compares v2 with

    print(f"\n== v2: rolling out digits {V2}, which is broken (its confidence collapses on live data) ==")
    v2 = _rollout(fleet, V2, targets, canary=0.6, waves=(1.0,), min_devices=2, probation_s=20.0)
    v2_status = clock.wait_for(f"rollout {v2} to end", lambda: _settled(fleet, v2), 240)
    if v2_status.state != "aborted":
        raise DemoFailed(f"the broken {V2} was not stopped: rollout {v2} ended {v2_status.state}")
    clock.wait_for(f"every agent to serve {V1} again", lambda: set(_versions(fleet).values()) == {V1}, 90)

    drifting = fleet.agents[1].name
    print(f"\n== drift: {drifting}'s inputs shift (a camera whose exposure changed) ==")
    since = time.time()
    traffic.shift[drifting] = 1.5
    flagged = clock.wait_for(f"drift to be flagged on {drifting}", lambda: _drift_rows(fleet, drifting, since), 120)
    traffic.shift.pop(drifting)
    return _summary(fleet, dashboard, v1_status, v2_status, drifting, flagged)


def _summary(fleet: DemoFleet, dashboard: str, v1: Any, v2: Any, drifting: str,
             flagged: list[dict[str, Any]]) -> dict[str, Any]:
    agents = {a.name: {"runtime": a.runtime, **{k: (a.status() or {}).get(k) for k in ("model", "version")}}
              for a in fleet.agents}
    audit = Counter(e.action for e in fleet.server.audit.entries())
    return {
        "dashboard": dashboard, "broker": fleet.broker_kind, "agents": agents,
        "v1": {"rollout": v1.id, "version": v1.version, "state": v1.state,
               "devices": {d["device_id"]: {"wave": d["wave"], "target": d["target"], "state": d["state"]}
                           for d in v1.devices}},
        "v2": {"rollout": v2.id, "version": v2.version, "state": v2.state, "abort_reason": v2.abort_reason,
               "devices": {d["device_id"]: {"wave": d["wave"], "target": d["target"], "state": d["state"],
                                            "reason": d["reason"], "notified": d["notified_at"] is not None}
                           for d in v2.devices}},
        "drift": {"device": drifting, "flagged_windows": len(flagged),
                  "score": max(float(f.get("score") or 0.0) for f in flagged)},
        "audit": dict(sorted(audit.items())),
    }


def print_summary(summary: dict[str, Any]) -> None:
    """The closing summary, in a few lines."""
    print("\n" + "=" * 78 + "\nedgeml demo: summary\n" + "=" * 78)
    v1, v2 = summary["v1"], summary["v2"]
    print(f"v1 {v1['version']}: rollout {v1['rollout']} {v1['state']}: " + ", ".join(
        f"{name} {d['state']} ({d['target']}, wave {d['wave']})" for name, d in sorted(v1["devices"].items())))
    print(f"v2 {v2['version']}: rollout {v2['rollout']} {v2['state']}: {v2['abort_reason']}")
    for name, d in sorted(v2["devices"].items()):
        told = f"{d['state']}: {d['reason']}" if d["notified"] else "never notified (outside the canary)"
        print(f"    {name}: {told}")
    print("now serving: " + ", ".join(f"{name} {a['version']} ({a['runtime']})"
                                      for name, a in sorted(summary["agents"].items())))
    drift = summary["drift"]
    print(f"drift: flagged on {drift['device']} in {drift['flagged_windows']} telemetry window(s), "
          f"score up to {drift['score']:.2f}")
    traffic = summary.get("traffic") or {}
    if traffic:
        print(f"traffic: {traffic['ok']} requests answered, {traffic['errors']} errors")
    print("audit log: " + ", ".join(f"{n} {action}" for action, n in summary["audit"].items()))
    print(f"broker: {summary['broker']}")
    print(f"dashboard: {summary['dashboard']}")
