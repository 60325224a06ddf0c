"""The agent's local facts: configuration, capabilities, preprocessing, clock and systemd notifications."""

from __future__ import annotations

import base64
import json
import socket
from pathlib import Path

import numpy as np
import pytest

from edgeml.edge_agent.capabilities import Capabilities, detect, version_at_least
from edgeml.edge_agent.config import load_config
from edgeml.edge_agent.host import SystemdNotifier, clock_synced
from edgeml.edge_agent.preprocess import PreprocessError, preprocess
from edgeml.errors import ConfigError


def _bootstrap(tmp_path: Path, **change: object) -> Path:
    doc = {"device_id": "cam-1", "username": "cam-1", "password": "pw", "host": "broker.local", "port": 8883,
           "ca_pem": "-----BEGIN CERTIFICATE-----", "tuf_root_b64": base64.b64encode(b'{"signed": {}}').decode()}
    doc.update(change)
    path = tmp_path / "cam-1.bootstrap.json"
    path.write_text(json.dumps(doc))
    return path


def test_config_reads_the_bootstrap_and_resolves_paths(tmp_path: Path) -> None:
    _bootstrap(tmp_path)
    (tmp_path / "agent.toml").write_text('[agent]\nbootstrap = "cam-1.bootstrap.json"\nstate_dir = "state"\n'
                                         'api_port = 0\napi_socket = "run/agent.sock"\n')
    config = load_config(tmp_path / "agent.toml")
    assert config.bootstrap.device_id == "cam-1" and config.bootstrap.port == 8883
    assert config.bootstrap.tuf_root == b'{"signed": {}}'
    assert config.state_dir == (tmp_path / "state").resolve() and config.api_socket == (tmp_path / "run/agent.sock")
    assert (config.api_host, config.clock, config.tls, config.runtimes) == ("127.0.0.1", "auto", True, None)


def test_the_config_can_offer_only_some_runtimes(tmp_path: Path) -> None:
    from edgeml.edge_agent.agent import Agent
    from edgeml.edge_agent.capabilities import detect

    _bootstrap(tmp_path)
    (tmp_path / "agent.toml").write_text('[agent]\nbootstrap = "cam-1.bootstrap.json"\nstate_dir = "state"\n'
                                         'runtimes = ["litert"]\ntls = false\n')
    config = load_config(tmp_path / "agent.toml")
    assert config.runtimes == ("litert",)
    installed = detect().runtimes
    assert {"litert", "onnxruntime"} <= set(installed)  # the test venv has both
    assert Agent(config).capabilities.runtimes == {"litert": installed["litert"]}


@pytest.mark.parametrize(("toml", "match"), [
    ("", "no \\[agent\\] table"),
    ('[agent]\nstate_dir = "s"\n', "'bootstrap'"),
    ('[agent]\nbootstrap = "cam-1.bootstrap.json"\nstate_dir = "s"\nspeed = 3\n', "unknown key 'speed' in"),
    ('[agent]\nbootstrap = "cam-1.bootstrap.json"\nstate_dir = "s"\nclock = "trust-me"\n', "clock must be"),
    ('[agent]\nbootstrap = "cam-1.bootstrap.json"\nstate_dir = "s"\napi_port = 70000\n', "api_port"),
    ('[agent]\nbootstrap = "cam-1.bootstrap.json"\nstate_dir = "s"\nruntimes = ["tflite"]\n', "runtimes must name"),
    ('[agent]\nbootstrap = "cam-1.bootstrap.json"\nstate_dir = "s"\nruntimes = "litert"\n', "must be a list"),
    ('[agent]\nbootstrap = "missing.json"\nstate_dir = "s"\n', "cannot read the bootstrap"),
    ("[agent\n", "not valid TOML"),
])
def test_bad_config_is_a_clear_error(tmp_path: Path, toml: str, match: str) -> None:
    _bootstrap(tmp_path)
    (tmp_path / "agent.toml").write_text(toml)
    with pytest.raises(ConfigError, match=match):
        load_config(tmp_path / "agent.toml")


@pytest.mark.parametrize("change", [{"device_id": "Not Valid"}, {"tuf_root_b64": "!!"}, {"port": "x"}])
def test_a_malformed_bootstrap_is_refused(tmp_path: Path, change: dict[str, object]) -> None:
    _bootstrap(tmp_path, **change)
    (tmp_path / "agent.toml").write_text('[agent]\nbootstrap = "cam-1.bootstrap.json"\nstate_dir = "s"\n')
    with pytest.raises(ConfigError, match="malformed"):
        load_config(tmp_path / "agent.toml")


@pytest.mark.parametrize(("version", "minimum", "ok"), [
    ("1.32.0", "1.17", True), ("1.17", "1.17", True), ("1.9.1", "1.17", False), ("10.3.0.26", "8.6", True),
    ("2.14.0+nv24", "2.14", True),
])
def test_version_comparison(version: str, minimum: str, ok: bool) -> None:
    assert version_at_least(version, minimum) is ok


@pytest.mark.parametrize(("runtime", "reason"), [
    ({"name": "onnxruntime", "min_version": "1.17"}, None),
    ({"name": "onnxruntime", "min_version": "9.0"}, "older than the required 9.0"),
    ({"name": "litert", "min_version": "2.14"}, None),  # ai-edge-litert succeeds tflite-runtime
    ({"name": "tensorrt", "min_version": "8.6"}, "tensorrt is not installed"),
    ({"name": "openvino"}, "unknown runtime"),
])
def test_incompatible_targets_are_named(runtime: dict[str, str], reason: str | None) -> None:
    caps = Capabilities(runtimes={"onnxruntime": "1.32.0", "litert": "ai-edge-litert 2.3.0"}, arch="aarch64")
    got = caps.incompatibility(runtime)
    assert got == reason if reason is None else reason in (got or "")


def test_tensorrt_needs_a_gpu() -> None:
    caps = Capabilities(runtimes={"tensorrt": "10.3.0"}, arch="aarch64")
    assert "GPU" in (caps.incompatibility({"name": "tensorrt", "min_version": "8.6"}) or "")
    jetson = Capabilities(runtimes={"tensorrt": "10.3.0"}, arch="aarch64", compute_capability="8.7", l4t="36.3.0")
    assert jetson.incompatibility({"name": "tensorrt", "min_version": "8.6"}) is None


def test_detect_finds_the_installed_runtimes() -> None:
    pytest.importorskip("onnxruntime")  # its providers are reported once it is loaded (detect does not load it)
    caps = detect()
    assert "onnxruntime" in caps.runtimes and "CPUExecutionProvider" in caps.providers
    assert json.loads(json.dumps(caps.to_dict()))["arch"] == caps.arch


def test_image_preprocessing_matches_the_compiler() -> None:
    pil = pytest.importorskip("PIL.Image")
    from edgeml.compile.data import ImagePreprocessing

    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    for spec in (ImagePreprocessing(size=(20, 30), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), channels=3),
                 ImagePreprocessing(size=None, channels=1, layout="NHWC")):
        expected = spec.apply(pil.fromarray(raw))
        got = preprocess(raw, spec.to_dict())
        assert got.shape == (1, *expected.shape)
        np.testing.assert_allclose(got[0], expected, atol=0.02)


def test_resizing_keeps_a_constant_image_constant_and_batches() -> None:
    spec = {"kind": "image", "size": [8, 8], "scale": 1.0, "mean": [0.0], "std": [1.0], "layout": "NCHW",
            "channels": 1}
    got = preprocess(np.full((3, 32, 24), 7, np.uint8), spec)  # a batch of three grayscale images
    assert got.shape == (3, 1, 8, 8) and np.allclose(got, 7.0)


@pytest.mark.parametrize(("raw", "spec", "match"), [
    (np.zeros((2, 2, 2, 2, 2)), {"kind": "image", "channels": 1}, "must be HxW"),
    (np.zeros((1, 4, 4, 2)), {"kind": "image", "channels": 3}, "wants 3 channel"),
    (np.zeros((4, 4)), {"kind": "audio"}, "unknown preprocessing kind"),
])
def test_preprocessing_refuses_what_does_not_fit(raw: np.ndarray, spec: dict[str, object], match: str) -> None:
    with pytest.raises(PreprocessError, match=match):
        preprocess(raw, spec)


def test_clock_modes() -> None:
    assert clock_synced("assume-synced") is True
    assert isinstance(clock_synced("auto"), bool)


def test_systemd_notifications_reach_the_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        monkeypatch.setenv("WATCHDOG_USEC", "4000000")
        notifier = SystemdNotifier()
        assert notifier.enabled and notifier.watchdog_interval_s == 2.0
        assert notifier.notify("READY=1") and notifier.notify("WATCHDOG=1")
        assert [server.recv(64), server.recv(64)] == [b"READY=1", b"WATCHDOG=1"]
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert SystemdNotifier().notify("READY=1") is False
