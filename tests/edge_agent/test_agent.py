"""The agent end to end on a real broker: updates over MQTT that commit or roll back by themselves, the
local inference API, telemetry, drift, incompatible targets, an unsynchronised clock and hostile commands.

Real Mosquitto, real signed registry and distribution service, real onnxruntime and LiteRT; the fleet's
rollout logic is replaced by the test sending ``update`` commands (tests/edge_agent/harness.py).
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeml.edge_agent.agent import Agent
from edgeml.edge_agent.config import load_config
from edgeml.fleet.registry.repository import Registry, init_registry
from tests.edge_agent.conftest import BROKEN, GOOD, SLOW, SOFT, DigitsBundles
from tests.edge_agent.harness import Operator, distribution, plain_broker, write_agent_config

#: Probation short enough for tests; the latency slack keeps a shared 2-core CI machine from failing good models.
FAST = {"probation_s": 1.0, "min_requests": 20, "max_probation_s": 10.0, "p99_factor": 3.0, "p99_slack_ms": 8.0}


class Fleet:
    def __init__(self, port: int, registry: Registry, operator: Operator) -> None:
        self.port, self.registry, self.operator = port, registry, operator


@pytest.fixture(scope="module")
def fleet(digits_bundles: DigitsBundles, compiled: dict[str, Path],
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    registry = init_registry(tmp_path_factory.mktemp("fleet") / "reg")
    for path in [*digits_bundles.paths.values(), *compiled.values()]:
        registry.publish(path)
    with plain_broker() as (port, _), distribution(registry, port):
        operator = Operator(port)
        try:
            yield Fleet(port, registry, operator)
        finally:
            operator.close()


AgentFactory = Callable[..., Agent]


@pytest.fixture
def make_agent(fleet: Fleet, tmp_path: Path) -> Iterator[AgentFactory]:
    agents: list[Agent] = []

    def make(device_id: str, clock_check: Callable[[], bool] | None = None, **settings: Any) -> Agent:
        root = (fleet.registry.metadata_dir / "1.root.json").read_bytes()
        config = load_config(write_agent_config(tmp_path / device_id, device_id, fleet.port, root, **settings))
        agent = Agent(config, clock_check=clock_check)
        agent.start()
        agents.append(agent)
        fleet.operator.wait_for(lambda s: s.states.get(device_id, {}).get("status") in ("idle", "serving"), 20)
        return agent

    yield make
    for agent in agents:
        agent.stop()


class Traffic:
    """Requests on the agent's Python API from a background thread, as an application would send them."""

    def __init__(self, agent: Agent, inputs: np.ndarray) -> None:
        self.agent, self.inputs = agent, inputs
        self.stop = threading.Event()
        self.served: dict[str, int] = {}
        self.failures = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        i = 0
        while not self.stop.is_set():
            try:
                result = self.agent.predict("digits", self.inputs[i % len(self.inputs)][None], preprocessed=True)
                self.served[result.version] = self.served.get(result.version, 0) + 1
            except Exception:
                self.failures += 1
            i += 1
            time.sleep(0.002)

    def __enter__(self) -> Traffic:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def _update(fleet: Fleet, agent: Agent, version: str, target: str = "onnx", **args: Any) -> dict[str, Any]:
    cid = fleet.operator.send(agent.device_id, "update", model="digits", version=version, target=target,
                              thresholds=args.pop("thresholds", FAST), **args)
    return fleet.operator.update_end(agent.device_id, cid)


def _serving(fleet: Fleet, agent: Agent, version: str) -> None:
    fleet.operator.wait_for(lambda s: s.states.get(agent.device_id, {}).get("version") == version
                            and s.states[agent.device_id]["status"] == "serving", 20)


def test_a_good_update_commits_and_the_next_one_too(fleet: Fleet, make_agent: AgentFactory,
                                                     digits_bundles: DigitsBundles) -> None:
    agent = make_agent("cam-good")
    end = _update(fleet, agent, "1.0.0")  # a first model: its own smoke test is the latency baseline
    assert end["state"] == "committed", end
    with Traffic(agent, digits_bundles.traffic) as traffic:
        end = _update(fleet, agent, GOOD)
        assert end["state"] == "committed", end
    chain = fleet.operator.states_of(agent.device_id, end["id"])
    assert chain == ["notified", "download", "verify", "stage", "smoke_test", "switch", "probation", "commit",
                     "committed"]
    assert traffic.failures == 0 and set(traffic.served) <= {"1.0.0", GOOD}
    _serving(fleet, agent, GOOD)
    assert agent.status()["version"] == GOOD


@pytest.mark.parametrize(("version", "final", "reason"), [
    (BROKEN, "failed", "golden"),
    (SLOW, "rolled_back", "p99"),
    (SOFT, "rolled_back", "confidence"),
], ids=["smoke-test-fails", "too-slow", "confidence-collapses"])
def test_a_bad_update_undoes_itself_and_says_why(fleet: Fleet, make_agent: AgentFactory,
                                                 digits_bundles: DigitsBundles, version: str, final: str,
                                                 reason: str) -> None:
    agent = make_agent(f"cam-{version.replace('.', '-')}")
    assert _update(fleet, agent, "1.0.0")["state"] == "committed"
    with Traffic(agent, digits_bundles.traffic) as traffic:
        end = _update(fleet, agent, version)
    assert end["state"] == final and reason in (end["reason"] or ""), end
    assert traffic.failures == 0
    _serving(fleet, agent, "1.0.0")
    assert agent.predict("digits", digits_bundles.traffic[:4], preprocessed=True).version == "1.0.0"


def test_litert_bundle_serves_through_the_local_http_api(fleet: Fleet, make_agent: AgentFactory,
                                                          digits_bundles: DigitsBundles, tmp_path: Path) -> None:
    agent = make_agent("pi-1", api_socket=str(tmp_path / "pi-1.sock"))
    assert _update(fleet, agent, "3.0.0", target="tflite")["state"] == "committed"
    assert agent.host.active is not None and agent.host.active.runtime.name == "litert"
    assert agent.api is not None
    x = digits_bundles.traffic[:3]
    body = json.dumps({"inputs": x.tolist(), "preprocessed": True}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{agent.api.port}/v1/models/digits:predict", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        doc = json.loads(response.read())
    direct = agent.predict("digits", x, preprocessed=True)
    assert doc["version"] == "3.0.0" and doc["top1"] == direct.top1 and len(doc["confidence"]) == 3
    raw = urllib.request.Request(f"http://127.0.0.1:{agent.api.port}/v1/models/digits:predict",
                                 data=x.astype(np.float32).tobytes(),
                                 headers={"Content-Type": "application/octet-stream", "X-Edgeml-Shape": "3,1,8,8",
                                          "X-Edgeml-Dtype": "float32", "X-Edgeml-Preprocessed": "true",
                                          "Accept": "application/octet-stream"})
    with urllib.request.urlopen(raw, timeout=10) as response:
        logits = np.frombuffer(response.read(), np.float32).reshape(3, 10)
    assert list(logits.argmax(axis=1)) == direct.top1
    assert _http_over_unix(tmp_path / "pi-1.sock", "GET /v1/health") .startswith("HTTP/1.1 200")


def _http_over_unix(path: Path, line: str) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(path))
        sock.sendall(f"{line} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n".encode())
        return sock.recv(65536).decode()


@pytest.mark.parametrize(("body", "headers", "status"), [
    (b"{not json", {"Content-Type": "application/json"}, 400),
    (json.dumps({"inputs": [[1, 2, 3]], "preprocessed": True}).encode(), {}, 400),
    (b"\0" * 10, {"Content-Type": "application/octet-stream", "X-Edgeml-Shape": "1,1,8,8",
                  "X-Edgeml-Dtype": "float32"}, 400),
])
def test_bad_requests_are_refused_without_counting_as_model_errors(fleet: Fleet, make_agent: AgentFactory,
                                                                   body: bytes, headers: dict[str, str],
                                                                   status: int) -> None:
    agent = make_agent("cam-bad-input")
    assert _update(fleet, agent, "1.0.0")["state"] == "committed"
    assert agent.api is not None
    request = urllib.request.Request(f"http://127.0.0.1:{agent.api.port}/v1/models/digits:predict", data=body,
                                     headers=headers)
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=10)
    assert info.value.code == status and "error" in json.loads(info.value.read())
    assert agent.host.stats("1.0.0").snapshot().errors == 0


def test_an_unknown_model_and_no_model_yet_get_404_and_503(fleet: Fleet, make_agent: AgentFactory) -> None:
    agent = make_agent("cam-empty")
    assert agent.api is not None
    base = f"http://127.0.0.1:{agent.api.port}"
    for path, data, code in (("/v1/health", None, 503), ("/v1/models/digits:predict", b'{"inputs": [1]}', 503)):
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(urllib.request.Request(base + path, data=data), timeout=10)
        assert info.value.code == code
    assert _update(fleet, agent, "1.0.0")["state"] == "committed"
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(urllib.request.Request(base + "/v1/models/cats:predict", data=b'{"inputs": [1]}'),
                               timeout=10)
    assert info.value.code == 404


def test_an_incompatible_target_is_reported_not_attempted(fleet: Fleet, make_agent: AgentFactory) -> None:
    agent = make_agent("cam-no-gpu")
    end = _update(fleet, agent, GOOD, runtime={"name": "tensorrt", "min_version": "8.6"})
    assert end["state"] == "incompatible" and "tensorrt" in end["reason"]
    assert agent.machine.store.load() is None  # nothing was started


def test_an_unsynchronised_clock_defers_updates_until_it_syncs(fleet: Fleet, make_agent: AgentFactory) -> None:
    synced = threading.Event()
    agent = make_agent("pi-no-rtc", clock_check=synced.is_set)
    cid = fleet.operator.send(agent.device_id, "update", model="digits", version="1.0.0", target="onnx",
                              thresholds=FAST)
    fleet.operator.wait_for(lambda s: "deferred" in fleet.operator.states_of(agent.device_id, cid), 20)
    assert fleet.operator.seen.states[agent.device_id]["clock_synced"] is False
    assert agent.machine.store.load() is None
    synced.set()
    assert fleet.operator.update_end(agent.device_id, cid)["state"] == "committed"


def test_telemetry_reaches_the_fleet_in_order_and_is_acknowledged(fleet: Fleet, make_agent: AgentFactory,
                                                                   digits_bundles: DigitsBundles) -> None:
    agent = make_agent("cam-telemetry")
    assert _update(fleet, agent, "1.0.0")["state"] == "committed"
    with Traffic(agent, digits_bundles.traffic):
        got = fleet.operator.wait_for(lambda s: [t for t in s.telemetry.get(agent.device_id, {}).values()
                                                 if t.metrics.get("requests", 0) > 0], 20)
    sample = got[0].metrics
    assert sample["version"] == "1.0.0" and sample["latency_p99_ms"] > 0 and sample["error_rate"] == 0.0
    seqs = sorted(fleet.operator.seen.telemetry[agent.device_id])
    assert seqs == list(range(len(seqs)))
    # a duplicate can only be a resend of an entry whose ack was still on its way: never a second copy stored
    assert fleet.operator.seen.duplicates.get(agent.device_id, 0) <= 1
    fleet.operator.wait_for(lambda s: len(agent.telemetry.outbox) <= 1, 20)  # acknowledged entries are gone


def test_drift_on_live_inputs_raises_an_event(fleet: Fleet, make_agent: AgentFactory,
                                              digits_bundles: DigitsBundles) -> None:
    agent = make_agent("cam-drift")
    assert _update(fleet, agent, "3.0.0")["state"] == "committed"  # compiled: it has reference statistics
    x = digits_bundles.traffic
    for i in range(0, 1000, 50):  # the same distribution as the reference: no alert
        agent.predict("digits", x[i % (len(x) - 50):][:50], preprocessed=True)
    assert not [e for e in fleet.operator.seen.events.get(agent.device_id, []) if e["type"] == "drift"]
    for i in range(0, 1000, 50):  # a camera that went dark and noisy
        agent.predict("digits", x[i % (len(x) - 50):][:50] * 0.3 + 0.5, preprocessed=True)
    event = fleet.operator.wait_for(lambda s: next((e for e in s.events.get(agent.device_id, [])
                                                    if e["type"] == "drift"), None), 10)
    assert event["version"] == "3.0.0" and event["window"]["flagged"] and event["window"]["score"] > 0.2


_COMMAND_FIELDS = st.dictionaries(st.sampled_from(["id", "type", "args", "issued_at", "schema", "x"]),
                                  st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=20),
                                            st.sampled_from(["update", "rollback", "ping", "telemetry-ack",
                                                             "edgeml.command/1"]),
                                            st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=8),
                                                            max_size=4)))


class _Message:
    def __init__(self, payload: bytes) -> None:
        self.payload, self.topic = payload, "edgeml/v1/devices/cam-fuzz/commands"


def test_fuzzed_commands_never_crash_the_agent(fleet: Fleet, make_agent: AgentFactory,
                                               digits_bundles: DigitsBundles) -> None:
    agent = make_agent("cam-fuzz")
    assert _update(fleet, agent, "1.0.0")["state"] == "committed"
    count = {"n": 0}

    @settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.one_of(st.binary(max_size=300), _COMMAND_FIELDS.map(lambda d: json.dumps(d).encode())))
    def fuzz(payload: bytes) -> None:
        count["n"] += 1
        agent.session.on_command(agent.client, None, _Message(payload))  # type: ignore[arg-type]

    fuzz()
    for payload in (b"x" * 100_000, b"\xff\xfe", b"[]", b'{"schema": "edgeml.command/9"}'):  # through the broker
        fleet.operator.client.publish("edgeml/v1/devices/cam-fuzz/commands", payload, qos=1)
    ping = fleet.operator.send(agent.device_id, "ping")
    fleet.operator.wait_for(lambda s: any(e.get("id") == ping for e in s.events.get(agent.device_id, [])), 20)
    assert count["n"] >= 2000
    assert agent.predict("digits", digits_bundles.traffic[:2], preprocessed=True).version == "1.0.0"
    rejected = [e for e in fleet.operator.seen.events[agent.device_id] if e["type"] == "rejected"]
    assert rejected and sum(1 + e["suppressed"] for e in rejected) >= 1000  # reported, rate-limited


def test_the_fleet_can_stop_a_probation(fleet: Fleet, make_agent: AgentFactory,
                                        digits_bundles: DigitsBundles) -> None:
    agent = make_agent("cam-told")
    assert _update(fleet, agent, "1.0.0")["state"] == "committed"
    with Traffic(agent, digits_bundles.traffic):
        cid = fleet.operator.send(agent.device_id, "update", model="digits", version=GOOD, target="onnx",
                                  thresholds={**FAST, "probation_s": 60.0})
        fleet.operator.wait_for(lambda s: "probation" in fleet.operator.states_of(agent.device_id, cid), 30)
        fleet.operator.send(agent.device_id, "rollback", reason="rollout r-1 aborted")
        end = fleet.operator.update_end(agent.device_id, cid)
    assert end["state"] == "rolled_back" and "rollout r-1 aborted" in end["reason"]
    _serving(fleet, agent, "1.0.0")
