"""The fleet dashboard: its JSON API on SQLite and on a real PostgreSQL, and the page in a real headless Chromium.

The store is filled the way the fleet fills it: devices through the real enrollment (and one revocation),
their state and telemetry through :class:`TelemetryStore` with protocol messages, rollouts through
``start_rollout`` (one then progressed on its device rows, one aborted with a reason), tokens and audit
entries through the real audit log. The server is built as ``edgeml fleet serve`` builds it: ``fleet_app``
on an ``HttpServer``.

Fleet (NOW = when the store was filled; telemetry times are minutes before NOW):

    cam-1  site=lab   running  digits 1.0.0  telemetry at 50 40 30 20 10   online
    cam-2  site=lab   running  digits 1.0.0  telemetry at 50 40 30, 2 (no requests: p99 None)   online
    cam-3  site=lab   running  digits 2.0.0  telemetry at 35 25 15 5 (drift flagged last)   online
    cam-4  site=lab   offline  digits 2.0.0  (its last will)   offline
    cam-5  site=lab   running  digits 1.0.0  telemetry at 45 12, silent since   offline (stale)
    cam-6  site=lab   running  no onnxruntime: incompatible   online
    cam-7  revoked
"""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import Any

import pytest

from edgeml.bundle_writer import write_bundle
from edgeml.fleet.audit.log import AuditLog, open_audit
from edgeml.fleet.devices.broker import write_broker_config
from edgeml.fleet.devices.enrollment import enroll, revoke
from edgeml.fleet.registry.repository import init_registry
from edgeml.fleet.rollouts.rules import RolloutOptions
from edgeml.fleet.rollouts.store import rollout_status, set_rollout_state, start_rollout
from edgeml.fleet.telemetry.store import TelemetryStore
from edgeml.fleet.web.auth import Role, create_token, revoke_token
from edgeml.fleet.web.server import HttpServer, fleet_app
from edgeml.fleet.web.views import audit_entries, device_list, fleet_overview, telemetry_series
from edgeml.protocol import State, Telemetry
from tests.conftest import REPO_ROOT, require_service
from tests.fleet.conftest import database_url, manifest

CAPS = {"runtimes": {"onnxruntime": "1.20.0"}, "arch": "x86_64", "compute_capability": None, "l4t": None,
        "providers": ["CPUExecutionProvider"]}
NO_ORT = {**CAPS, "runtimes": {}}
ABORT = "p99 <b>doubled</b> on the canary & 'cam-3'"
ACTOR = "token:alice"
#: (device, version, [(minutes before NOW, p50, p99, error rate, drift score or None, drift flagged)])
ROWS: list[tuple[str, str, list[tuple[int, float, float | None, float, float | None, bool]]]] = [
    ("cam-1", "1.0.0", [(50, 5.0, 10.0, 0.01, 0.1, False), (40, 5.5, 11.0, 0.01, 0.1, False),
                        (30, 6.0, 12.0, 0.01, 0.1, False), (20, 6.5, 13.0, 0.01, 0.1, False),
                        (10, 7.0, 14.0, 0.01, 0.1, False)]),
    ("cam-2", "1.0.0", [(50, 8.0, 20.0, 0.0, None, False), (40, 8.0, 22.0, 0.0, None, False),
                        (30, 8.0, 24.0, 0.5, None, False), (2, 0.0, None, 0.0, None, False)]),
    ("cam-3", "2.0.0", [(35, 9.0, 30.0, 0.02, 0.2, False), (25, 9.0, 31.0, 0.02, 0.3, False),
                        (15, 9.0, 32.0, 0.02, 0.4, False), (5, 9.0, 33.0, 0.02, 0.5, True)]),
    ("cam-5", "1.0.0", [(45, 4.0, 40.0, 0.1, None, False), (12, 4.0, 41.0, 0.1, None, False)]),
]


@dataclass
class Fleet:
    """A populated registry and its database, audit log and tokens."""

    root: Path
    db: Any
    audit: AuditLog
    store: TelemetryStore
    now: dt.datetime
    viewer: str
    revoked: str


def _metrics(version: str, p50: float, p99: float | None, error_rate: float, drift: float | None,
             flagged: bool) -> dict[str, Any]:
    return {"model": "digits", "version": version, "requests": 0 if p99 is None else 100,
            "errors": int(100 * error_rate), "latency_p50_ms": None if p99 is None else p50, "latency_p99_ms": p99,
            "error_rate": error_rate,
            "drift": None if drift is None else {"score": drift, "flagged": flagged, "window": 200}}


def populate(root: Path, url: str) -> Fleet:
    """Fill a new registry at ``root`` (database ``url``) with the fleet of the module docstring."""
    registry = init_registry(root / "reg", db_url=url)
    (root / "bundles").mkdir()
    for version in ("1.0.0", "2.0.0", "3.0.0"):
        src = root / "src" / version
        src.mkdir(parents=True)
        (src / "model.onnx").write_bytes(f"model {version}".encode())
        m = manifest(version=version)
        write_bundle(root / "bundles" / m.filename, m, {"model.onnx": src / "model.onnx"})
        registry.publish(root / "bundles" / m.filename, actor=ACTOR)
    broker = root / "broker"
    write_broker_config(broker, [], hostname="localhost")
    for i in range(1, 8):
        enroll(registry.dir, f"cam-{i}", broker, tags={"site": "lab"}, db_url=url, actor=ACTOR)
    revoke(registry.dir, "cam-7", broker, db_url=url, actor=ACTOR)
    db = registry.database()
    audit = open_audit(registry.dir, db=db)
    store = TelemetryStore(db)
    now = dt.datetime.now(dt.timezone.utc)
    for device_id, version, rows in ROWS:
        for seq, (minutes, *numbers) in enumerate(rows):
            message = Telemetry(device_id, seq, now.timestamp() - 60 * minutes, _metrics(version, *numbers))
            assert store.insert_batch([message], received_at=now - dt.timedelta(minutes=minutes)) == 1
    for device_id, status, version, caps in (("cam-1", "running", "1.0.0", CAPS), ("cam-2", "running", "1.0.0", CAPS),
                                             ("cam-3", "running", "2.0.0", CAPS), ("cam-4", "offline", "2.0.0", CAPS),
                                             ("cam-6", "running", None, NO_ORT)):
        state = State(device_id, status, model="digits" if version else None, version=version, capabilities=caps)
        assert store.update_state(device_id, state)
    # cam-5's state was reported before its telemetry: its last_seen is its last row, 12 minutes ago
    assert store.store_batch([], [(State("cam-5", "running", model="digits", version="1.0.0", capabilities=CAPS),
                                   False)]).states == 1
    viewer = create_token(db, "viewer-1", Role.VIEWER, audit=audit, actor=ACTOR)
    revoked = create_token(db, "gone", Role.ADMIN, audit=audit, actor=ACTOR)
    revoke_token(db, "gone", audit=audit, actor=ACTOR)
    options = RolloutOptions(targets=("onnx-fp32",), select={"site": "lab"}, canary=0.4, waves=(1.0,), min_devices=1)
    start_rollout(db, audit, "digits", "2.0.0", options, actor=ACTOR, rollout_id="ro-good")
    rd = db.tables["rollout_devices"]
    with db.transaction() as conn:  # the controller's writes, as it records device results
        for device_id, state in (("cam-1", "failed"), ("cam-2", "notified")):
            conn.execute(rd.update().where((rd.c.rollout_id == "ro-good") & (rd.c.device_id == device_id))
                         .values(state=state, reason="verification failed" if state == "failed" else None))
    start_rollout(db, audit, "digits", "3.0.0", options, actor=ACTOR, rollout_id="ro-bad")
    set_rollout_state(db, audit, "ro-bad", "abort", actor=ACTOR, reason=ABORT)
    return Fleet(root, db, audit, store, now, viewer, revoked)


def serve(fleet: Fleet, **dashboard: Any) -> HttpServer:
    """The HTTP server as ``edgeml fleet serve`` builds it (on a free port), started."""
    http = HttpServer(fleet_app(fleet.root / "reg", fleet.db, fleet.audit, **dashboard), "127.0.0.1", 0)
    http.start()
    return http


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def fleet(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp(f"dashboard-{request.param}")
    with database_url(request.param, root) as url:
        f = populate(root, url)
        try:
            yield f
        finally:
            f.db.close()


@pytest.fixture(scope="module")
def server(fleet: Fleet) -> Iterator[str]:
    http = serve(fleet, clock=lambda: fleet.now)
    try:
        yield http.url
    finally:
        http.stop()


def get(url: str, token: str | None = None) -> tuple[int, Message, Any]:
    """``(status, headers, body)`` of a GET (header names in any case); a JSON body is decoded."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, headers, raw = response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        status, headers, raw = exc.code, exc.headers, exc.read()
    body = json.loads(raw) if headers.get("Content-Type") == "application/json" else raw.decode()
    return status, headers, body


# --- the queries ---------------------------------------------------------------------------------------------

P99_BY_VERSION = {  # minutes before NOW -> mean p99 of the rows in that minute's bucket
    "digits:1.0.0": {50: 15.0, 45: 40.0, 40: 16.5, 30: 18.0, 20: 13.0, 12: 41.0, 10: 14.0},
    "digits:2.0.0": {35: 30.0, 25: 31.0, 15: 32.0, 5: 33.0},
}


def test_overview_counts(fleet: Fleet) -> None:
    overview = fleet_overview(fleet.db, now=fleet.now)
    assert overview["devices"] == {"total": 6, "online": 4, "offline": 2, "revoked": 1}
    assert overview["versions"] == {"digits": {"1.0.0": 3, "2.0.0": 2}}
    assert overview["incompatible"] == {"devices": 1, "device_ids": ["cam-6"], "by_rollout": {"ro-bad": 1}}
    assert overview["rollouts"] == {"aborted": 1, "pending": 1}
    # silence past the limit turns the online devices offline; cam-4 said so itself
    later = fleet_overview(fleet.db, now=fleet.now + dt.timedelta(hours=1), stale_after_s=120)
    assert later["devices"] == {"total": 6, "online": 0, "offline": 6, "revoked": 1}


def test_device_list(fleet: Fleet) -> None:
    devices = {d["device_id"]: d for d in device_list(fleet.db, now=fleet.now)}
    assert sorted(devices) == [f"cam-{i}" for i in range(1, 8)]
    assert {d: v["online"] for d, v in devices.items()} == {
        "cam-1": True, "cam-2": True, "cam-3": True, "cam-4": False, "cam-5": False, "cam-6": True, "cam-7": False}
    assert devices["cam-7"]["revoked"] and devices["cam-4"]["status"] == "offline"
    assert devices["cam-1"]["tags"] == {"site": "lab"}
    assert (devices["cam-3"]["model"], devices["cam-3"]["version"]) == ("digits", "2.0.0")
    assert devices["cam-1"]["telemetry"] == {
        "seq": 4, "received_at": devices["cam-1"]["telemetry"]["received_at"], "latency_p50_ms": 7.0,
        "latency_p99_ms": 14.0, "error_rate": 0.01, "drift_score": 0.1, "drift_flagged": False, "output_shift": None,
        "output_shift_flagged": None}
    assert devices["cam-2"]["telemetry"]["latency_p99_ms"] is None and devices["cam-2"]["telemetry"]["seq"] == 3
    assert devices["cam-3"]["telemetry"]["drift_score"] == 0.5 and devices["cam-3"]["telemetry"]["drift_flagged"]
    assert devices["cam-4"]["telemetry"] is None and devices["cam-6"]["model"] is None
    last = dt.datetime.fromisoformat(devices["cam-5"]["last_seen"])
    assert abs((fleet.now - last).total_seconds() - 12 * 60) < 1


def _by_minute(series: dict[str, Any], now: dt.datetime) -> dict[str, dict[int, float]]:
    """Each series' points keyed by the whole minutes before ``now`` of their bucket (60 s buckets)."""
    out = {}
    for s in series["series"]:
        out[s["key"]] = {int((now.timestamp() - t) // 60): v for t, v in s["points"]}
    return out


def test_telemetry_series(fleet: Fleet) -> None:
    p99 = telemetry_series(fleet.db, "latency_p99_ms", by="version", since_s=3600, now=fleet.now)
    assert (p99["buckets"], p99["bucket_s"], p99["end"] - p99["start"]) == (60, 60.0, 3600.0)
    assert [s["key"] for s in p99["series"]] == ["digits:1.0.0", "digits:2.0.0"]
    assert [s["rows"] for s in p99["series"]] == [10, 4]  # cam-2's row without requests has no p99
    assert _by_minute(p99, fleet.now) == {k: {m - 1: v for m, v in pts.items()} for k, pts in P99_BY_VERSION.items()}
    by_device = telemetry_series(fleet.db, "latency_p99_ms", by="device", since_s=3600, now=fleet.now)
    assert {s["key"]: len(s["points"]) for s in by_device["series"]} == {"cam-1": 5, "cam-2": 3, "cam-3": 4, "cam-5": 2}
    drift = telemetry_series(fleet.db, "drift.score", since_s=3600, now=fleet.now)
    assert {s["key"]: [v for _, v in s["points"]] for s in drift["series"]} == {
        "digits:1.0.0": [0.1] * 5, "digits:2.0.0": [0.2, 0.3, 0.4, 0.5]}
    errors = telemetry_series(fleet.db, "error_rate", since_s=3600, now=fleet.now)
    assert [len(s["points"]) for s in errors["series"]] == [8, 4]
    # a 20-minute window: only the rows of the last 20 minutes, in 10 two-minute buckets
    recent = telemetry_series(fleet.db, "latency_p99_ms", since_s=1200, buckets=10, now=fleet.now)
    assert {s["key"]: [v for _, v in s["points"]] for s in recent["series"]} == {
        "digits:1.0.0": [13.0, 41.0, 14.0], "digits:2.0.0": [32.0, 33.0]}
    assert telemetry_series(fleet.db, "latency_p99_ms", model="other", now=fleet.now)["series"] == []


def test_audit_entries(fleet: Fleet) -> None:
    everything = fleet.audit.entries()
    newest = audit_entries(fleet.audit, limit=5)
    assert [e["seq"] for e in newest] == [e.seq for e in reversed(everything[-5:])]
    assert [e["action"] for e in newest[:3]] == ["rollout.abort", "rollout.start", "rollout.start"]
    assert newest[0]["details"]["reason"] == ABORT and newest[0]["actor"] == ACTOR
    counts = {a: sum(e.action == a for e in everything) for a in ("publish", "device.enroll", "device.revoke")}
    assert counts == {"publish": 3, "device.enroll": 7, "device.revoke": 1}


# --- the HTTP API --------------------------------------------------------------------------------------------


def test_api_answers_the_store(fleet: Fleet, server: str) -> None:
    status, _, overview = get(f"{server}/api/overview", fleet.viewer)
    assert status == 200 and overview == fleet_overview(fleet.db, now=fleet.now)
    status, _, devices = get(f"{server}/api/devices", fleet.viewer)
    assert status == 200 and devices == device_list(fleet.db, now=fleet.now)
    status, _, p99 = get(f"{server}/api/telemetry?metric=latency_p99_ms&by=version&since=3600", fleet.viewer)
    assert status == 200
    assert _by_minute(p99, fleet.now) == {k: {m - 1: v for m, v in pts.items()} for k, pts in P99_BY_VERSION.items()}
    status, _, drift = get(f"{server}/api/telemetry?metric=drift.score&by=device&since=600&buckets=5&model=digits",
                           fleet.viewer)
    assert status == 200
    assert [(s["key"], [v for _, v in s["points"]]) for s in drift["series"]] == [("cam-1", [0.1]), ("cam-3", [0.5])]
    status, _, audit = get(f"{server}/api/audit?limit=3", fleet.viewer)
    assert status == 200 and [e["action"] for e in audit] == ["rollout.abort", "rollout.start", "rollout.start"]
    status, _, rollouts = get(f"{server}/api/rollouts", fleet.viewer)
    assert status == 200 and {r["id"]: r["abort_reason"] for r in rollouts} == {
        "ro-bad": f"aborted by {ACTOR}: {ABORT}", "ro-good": None}
    status, _, waves = get(f"{server}/api/rollout-waves", fleet.viewer)  # the rollout cards: counts, not devices
    assert status == 200 and [r["id"] for r in waves] == [r["id"] for r in rollouts]
    for counted, full in zip(waves, rollout_status(fleet.db), strict=True):
        assert counted["waves"] == full.counts() and "devices" not in counted
        assert {k: counted[k] for k in ("state", "abort_reason", "current_wave", "options")} == {
            "state": full.state, "abort_reason": full.abort_reason, "current_wave": full.current_wave,
            "options": full.options}


@pytest.mark.parametrize("path", ["/api/overview", "/api/devices", "/api/telemetry?metric=error_rate",
                                  "/api/audit", "/api/rollout-waves"])
def test_api_needs_a_viewer_token(fleet: Fleet, server: str, path: str) -> None:
    for token in (None, "edgeml_not-a-token", fleet.revoked):
        status, headers, body = get(server + path, token)
        assert status == 401 and body["status"] == 401 and body["error"] and "hint" in body
        assert headers["WWW-Authenticate"].startswith("Bearer")
    assert get(server + path, fleet.viewer)[0] == 200


@pytest.mark.parametrize(("query", "words"), [
    ("/api/telemetry", "'metric' is required"),
    ("/api/telemetry?metric=fps", "unknown metric 'fps'"),
    ("/api/telemetry?metric=error_rate&by=model", "'by' must be one of version, device"),
    ("/api/telemetry?metric=error_rate&since=abc", "bad value 'abc'"),
    ("/api/telemetry?metric=error_rate&since=10", "'since' must be seconds from 60"),
    ("/api/telemetry?metric=error_rate&since=nan", "bad value 'nan'"),
    ("/api/telemetry?metric=error_rate&since=99999999", "'since' must be seconds from 60"),
    ("/api/telemetry?metric=error_rate&buckets=0", "'buckets' must be an integer from 1 to 500"),
    ("/api/telemetry?metric=error_rate&buckets=2.5", "bad value '2.5'"),
    ("/api/telemetry?metric=error_rate&model=a%20b", "bad model name 'a b'"),
    ("/api/telemetry?metric=error_rate&metric=error_rate", "given 2 times"),
    ("/api/telemetry?metric=error_rate&color=red", "unknown query parameter 'color'"),
    ("/api/audit?limit=0", "'limit' must be an integer from 1 to 1000"),
    ("/api/audit?limit=many", "bad value 'many'"),
    ("/api/overview?x=1", "unknown query parameter 'x'"),
])
def test_api_refuses_bad_queries(fleet: Fleet, server: str, query: str, words: str) -> None:
    status, _, body = get(server + query, fleet.viewer)
    assert status == 400 and body["status"] == 400 and set(body) == {"error", "hint", "status"}
    assert words in body["error"] + (body["hint"] or "")


def test_page_is_served_without_a_token(fleet: Fleet, server: str) -> None:
    status, headers, html = get(f"{server}/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert '<script src="/dashboard/app.js" defer></script>' in html and "<script>" not in html
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert get(f"{server}/dashboard/")[2] == html
    status, headers, js = get(f"{server}/dashboard/app.js")
    assert status == 200 and headers["Content-Type"].startswith("text/javascript") and "innerHTML" not in js
    assert get(f"{server}/dashboard/style.css")[1]["Content-Type"].startswith("text/css")
    assert get(f"{server}/dashboard/missing.js")[0] == 404
    assert get(f"{server}/metadata/root.json")[0] == 200  # the registry's routes are still there


# --- the page in a real Chromium -------------------------------------------------------------------------------

CHROMIUM = Path("/usr/bin/chromium")


def _launch(playwright: Any) -> Any:
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])


def _wait_refreshed(page: Any, after: int = 0) -> int:
    """Wait until the page has refreshed more than ``after`` times; returns how many times it has.

    Locator assertions, not ``wait_for_function``: the page's Content-Security-Policy forbids eval, and the
    test keeps it on (a violation by the page's own code would be a console error).
    """
    from playwright.sync_api import expect

    body = page.locator("body")
    expect(body).to_have_attribute("data-refreshes", re.compile(rf"^(?!{after}$)\d+$"), timeout=30_000)
    return int(body.get_attribute("data-refreshes"))


def _read(page: Any, selector: str) -> str:
    return str(page.locator(selector).inner_text()).strip()


def test_dashboard_in_chromium(tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    require_service("chromium", CHROMIUM.exists(), f"{CHROMIUM} not installed (apt-get install chromium)")
    fleet = populate(tmp_path, f"sqlite:///{tmp_path / 'fleet.db'}")
    http = serve(fleet)
    problems: list[str] = []
    try:
        with sync_api.sync_playwright() as p:
            browser = _launch(p)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: problems.append(f"console: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(f"pageerror: {e}"))
            page.goto(f"{http.url}/#token={fleet.viewer}")
            refreshes = _wait_refreshed(page)
            _check_page(page, fleet)
            assert "token=" not in page.url  # the token left the address bar for sessionStorage
            assert page.locator('[data-testid="token-form"]').is_hidden()
            assert page.locator('[data-testid="error"]').is_hidden()

            # the selector: one line per device
            page.select_option('[data-testid="chart-by"]', "device")
            paths = page.locator('[data-testid="chart-latency_p99_ms"] svg path.series')
            sync_api.expect(paths).to_have_count(4, timeout=30_000)
            assert {paths.nth(i).get_attribute("data-series"): paths.nth(i).get_attribute("data-points")
                    for i in range(4)} == {"cam-1": "5", "cam-2": "3", "cam-3": "4", "cam-5": "2"}
            refreshes = int(page.locator("body").get_attribute("data-refreshes"))

            # one more device goes offline (its last will); the page shows it after its next refresh
            assert fleet.store.update_state("cam-1", State("cam-1", "offline", model="digits", version="1.0.0",
                                                           capabilities=CAPS))
            sync_api.expect(page.locator('[data-testid="tile-offline"]')).to_have_text("3", timeout=30_000)
            assert _wait_refreshed(page, refreshes) > refreshes
            assert _read(page, '[data-testid="tile-online"]') == "3"
            assert page.locator('[data-device-id="cam-1"]').get_attribute("data-online") == "false"
            shots = [tmp_path / "dashboard.png", REPO_ROOT / "tests-artifacts" / "dashboard.png"]
            shots[1].parent.mkdir(exist_ok=True)
            page.screenshot(path=str(shots[0]), full_page=True)
            shutil.copyfile(shots[0], shots[1])
            print(f"dashboard screenshot: {shots[1]} (and {shots[0]})")
            browser.close()
    finally:
        http.stop()
        fleet.db.close()
    assert problems == []


def _check_page(page: Any, fleet: Fleet) -> None:
    """Every section shows the store's numbers."""
    overview = fleet_overview(fleet.db)
    for name, value in (("online", 4), ("offline", 2), ("incompatible", 1), ("total", 6), ("revoked", 1)):
        assert _read(page, f'[data-testid="tile-{name}"]') == str(value)
    rows = page.locator('[data-testid="version-row"]')
    shown = {(rows.nth(i).get_attribute("data-version"), rows.nth(i).locator("td").nth(2).inner_text())
             for i in range(rows.count())}
    assert shown == {(v, str(n)) for v, n in overview["versions"]["digits"].items()}

    # the abort reason, as text (its markup escaped, not rendered)
    reason = page.locator('[data-rollout-id="ro-bad"] [data-testid="abort-reason"]')
    assert reason.is_visible() and reason.inner_text() == f"Aborted: aborted by {ACTOR}: {ABORT}"
    assert reason.locator("b").count() == 0
    for status in rollout_status(fleet.db):
        waves = status.counts()
        card = page.locator(f'[data-rollout-id="{status.id}"]')
        assert card.locator('[data-testid="wave"]').count() == len(waves) == 2
        for w, counts in enumerate(waves):
            shown_counts = {s: int(card.locator(f'[data-wave="{w}"] [data-state="{s}"]').get_attribute("data-value"))
                            for s in ("committed", "failed", "incompatible", "pending", "updating", "rolled_back")}
            expected = {s: counts.get(s, 0) for s in shown_counts if s != "updating"}
            expected["updating"] = counts.get("notifying", 0) + counts.get("notified", 0)
            assert shown_counts == expected
    totals = _wave_totals(page, "ro-good")
    assert totals == {"committed": 2, "failed": 1, "updating": 1, "pending": 1, "incompatible": 1}

    # charts: one path per version, one point per bucket with rows
    for metric, points in (("latency_p99_ms", {"digits:1.0.0": 7, "digits:2.0.0": 4}),
                           ("drift.score", {"digits:1.0.0": 5, "digits:2.0.0": 4}),
                           ("error_rate", {"digits:1.0.0": 8, "digits:2.0.0": 4})):
        paths = page.locator(f'[data-testid="chart-{metric}"] svg path.series')
        found = {paths.nth(i).get_attribute("data-series"): paths.nth(i).get_attribute("d")
                 for i in range(paths.count())}
        assert {k: len(re.findall(r"[ML]", d or "")) for k, d in found.items()} == points
    legend = page.locator('[data-testid="chart-latency_p99_ms"] [data-testid="legend-item"]').all_inner_texts()
    assert [t.strip() for t in legend] == ["digits:1.0.0", "digits:2.0.0"]
    assert page.locator('[data-testid="chart-latency_p50_ms"] svg path.series').count() == 2

    # devices and audit
    assert page.locator('[data-testid="device-row"]').count() == 7
    cam1 = page.locator('[data-device-id="cam-1"] td')
    assert [cam1.nth(i).inner_text() for i in (6, 7, 8, 9)] == ["7", "14", "0.01", "0.1"]
    assert page.locator('[data-device-id="cam-2"] td').nth(7).inner_text() == "-"  # no requests: no p99
    first = page.locator('[data-testid="audit-row"]').first
    newest = fleet.audit.entries()[-1]
    assert first.get_attribute("data-seq") == str(newest.seq)
    assert _read(page, '[data-testid="audit-row"] >> nth=0 >> [data-testid="audit-action"]') == "rollout.abort"


def _wave_totals(page: Any, rollout_id: str) -> dict[str, int]:
    counts = page.locator(f'[data-rollout-id="{rollout_id}"] [data-testid="wave-count"]')
    totals: dict[str, int] = {}
    for i in range(counts.count()):
        state, value = counts.nth(i).get_attribute("data-state"), int(counts.nth(i).get_attribute("data-value"))
        if value:
            totals[state] = totals.get(state, 0) + value
    return totals


def test_dashboard_asks_for_a_token(tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    require_service("chromium", CHROMIUM.exists(), f"{CHROMIUM} not installed (apt-get install chromium)")
    fleet = populate(tmp_path, f"sqlite:///{tmp_path / 'fleet.db'}")
    http = serve(fleet)
    try:
        with sync_api.sync_playwright() as p:
            browser = _launch(p)
            page = browser.new_page()
            page.goto(f"{http.url}/")
            page.locator('[data-testid="token-form"]').wait_for(state="visible", timeout=30_000)
            assert page.locator("#main").is_hidden()
            page.fill("#token-input", "edgeml_wrong")
            page.click('[data-testid="token-form"] button')
            error = page.locator('[data-testid="error"]')
            error.wait_for(state="visible", timeout=30_000)
            assert "refused the token (401)" in error.inner_text() and "unknown operator token" in error.inner_text()
            page.fill("#token-input", fleet.viewer)
            page.click('[data-testid="token-form"] button')
            _wait_refreshed(page)
            assert error.is_hidden() and _read(page, '[data-testid="tile-online"]') == "4"
            browser.close()
    finally:
        http.stop()
        fleet.db.close()
