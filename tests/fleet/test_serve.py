"""``edgeml fleet serve`` as users run it, and the HTTP server it runs.

The command is started as a real process against a real TLS Mosquitto (the layout ``broker-config``
writes, with the fleet and a device user): a device fetches and verifies a bundle over MQTT through it, a
stock python-tuf ``ngclient.Updater`` does the same over its HTTP listener, and SIGTERM or Ctrl-C stops it
with exit code 0. The repository's HTTP serving is also tested in-process: HEAD, headers, and refused paths
(the listener itself: tests/fleet/test_http_server.py).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from tuf.ngclient import Updater

from edgeml.edge_agent.mqtt_fetcher import METADATA_URL, TARGETS_URL, MqttFetcher
from edgeml.edge_agent.tuf_client import TufClient
from edgeml.errors import ConfigError, RegistryError
from edgeml.fleet.devices.broker import write_broker_config
from edgeml.fleet.registry.repository import Registry
from edgeml.fleet.web.routes import static_route
from edgeml.fleet.web.server import HttpServer, build_app, repository_server
from tests.conftest import RunCli, require_service
from tests.fleet.conftest import MakeBundle
from tests.fleet.mosquitto import MOSQUITTO, free_port, run_mosquitto

DEVICE = "cam-1"
TARGET = "digits/1.0.0/onnx-fp32.edgeml"


def ngclient_download(base_url: str, registry: Registry, work: Path) -> Path:
    """Download TARGET with a stock ngclient Updater from ``base_url``; returns the verified file."""
    (work / "metadata").mkdir(parents=True)
    (work / "downloads").mkdir()
    root = (registry.metadata_dir / "1.root.json").read_bytes()
    updater = Updater(str(work / "metadata"), f"{base_url}/metadata/", str(work / "downloads"),
                      f"{base_url}/targets/", bootstrap=root)
    updater.refresh()
    info = updater.get_targetinfo(TARGET)
    assert info is not None
    return Path(updater.download_target(info))


# --- the command, as a process -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_broker() -> Iterator[tuple[int, Path, dict[str, str]]]:
    """A TLS-only Mosquitto with users ``fleet`` and DEVICE: yields (port, broker dir, credentials)."""
    if not MOSQUITTO.exists():
        require_service("mosquitto", False, f"{MOSQUITTO} not installed (apt-get install mosquitto)")
    root = Path(tempfile.mkdtemp(prefix="edgeml-serve-"))
    root.chmod(0o755)
    try:
        creds = write_broker_config(root / "broker", [DEVICE], hostname="localhost")
        with run_mosquitto(root / "broker") as port:
            yield port, root / "broker", creds
    finally:
        shutil.rmtree(root, ignore_errors=True)


class ServeProcess:
    """``edgeml fleet serve`` in a subprocess; its stdout lines arrive on a queue."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path) -> None:
        environ = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200", **env}
        self.proc = subprocess.Popen([sys.executable, "-m", "edgeml.cli", "fleet", "serve", *args], cwd=cwd,
                                     env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stdout: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def next_line(self, timeout: float = 30.0) -> str:
        line = self.lines.get(timeout=timeout)
        if line is None:
            self.proc.wait(timeout=10)
            pytest.fail(f"serve exited with {self.proc.returncode} before printing its listeners:\n{self._stderr()}")
        self.stdout.append(line)
        return line

    def stop(self, sig: signal.Signals) -> tuple[int, str, str]:
        self.proc.send_signal(sig)
        self.proc.wait(timeout=30)
        rest = []
        while (line := self.lines.get(timeout=10)) is not None:
            rest.append(line)
        return self.proc.returncode, "\n".join(self.stdout + rest), self._stderr()

    def _stderr(self) -> str:  # stdout belongs to the reader thread; stderr is small and read once at the end
        assert self.proc.stderr is not None
        return self.proc.stderr.read()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def mqtt_device(port: int, broker_dir: Path, password: str) -> mqtt.Client:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=DEVICE, protocol=mqtt.MQTTv311)
    client.username_pw_set(DEVICE, password)
    client.tls_set(ca_certs=str(broker_dir / "tls" / "ca.crt"))
    client.connect("localhost", port)
    client.loop_start()
    return client


@pytest.mark.parametrize(("sig", "http", "password_file"), [
    (signal.SIGTERM, True, False), (signal.SIGINT, True, False), (signal.SIGTERM, False, True)],
    ids=["sigterm", "ctrl-c", "sigterm-no-http-password-file"])
def test_serve_answers_over_mqtt_and_http_and_stops_cleanly(
        tls_broker: tuple[int, Path, dict[str, str]], registry: Registry, make_bundle: MakeBundle,
        tmp_path: Path, sig: signal.Signals, http: bool, password_file: bool) -> None:
    port, broker_dir, creds = tls_broker
    published = registry.publish(make_bundle("1.0.0", payload=os.urandom(200_000)))
    db = registry.database()  # the device is in the broker's config; the fleet serves it once it is enrolled
    with db.transaction() as conn:
        if conn.execute(db.sa.select(db.tables["devices"].c.id).where(
                db.tables["devices"].c.device_id == DEVICE)).first() is None:
            conn.execute(db.tables["devices"].insert().values(device_id=DEVICE, revoked=False))
    db.close()
    args = [str(registry.dir), "--broker-host", "localhost", "--broker-port", str(port), "--username", "fleet",
            "--ca", str(broker_dir / "tls" / "ca.crt"), *(["--http-port", "0"] if http else ["--no-http"])]
    env = {"EDGEML_BROKER_PASSWORD": creds["fleet"]}
    if password_file:  # the password from a file only its owner reads; the environment has none
        (tmp_path / "fleet.password").write_text(creds["fleet"] + "\n")
        (tmp_path / "fleet.password").chmod(0o600)
        args += ["--password-file", str(tmp_path / "fleet.password")]
        env = {"EDGEML_BROKER_PASSWORD": ""}
    serve = ServeProcess(args, env, tmp_path)
    try:
        assert serve.next_line() == f"mqtt: serving {registry.dir / 'repository'} on mqtts://localhost:{port}"
        assert serve.next_line() == f"ingest: telemetry from mqtts://localhost:{port} into the database"
        assert serve.next_line() == f"controller: rollouts over mqtts://localhost:{port}"
        assert serve.next_line() == f"capture: uploads from mqtts://localhost:{port} into {registry.dir / 'captures'}"
        if http:
            assert re.fullmatch(r"http: dashboard http://127\.0\.0\.1:\d+/ , API \S+/api/ , metrics \S+/metrics",
                                serve.next_line())
            line = serve.next_line()
            match = re.fullmatch(r"http: serving (\S+) on (http://127\.0\.0\.1:(\d+))/metadata/ and \2/targets/", line)
            assert match is not None, line
            assert int(match.group(3)) > 0
            verified = ngclient_download(match.group(2), registry, tmp_path / "http-client")
            assert hashlib.sha256(verified.read_bytes()).hexdigest() == published.sha256
            with urllib.request.urlopen(match.group(2) + "/metrics", timeout=30) as response:
                scrape = response.read().decode()
            # one process with every role: its ingest worker's and capture receiver's counters too
            assert "\nedgeml_ingest_received_total 0.0\n" in scrape
            assert '\nedgeml_capture_rejected_total{reason="malformed"} 0.0\n' in scrape

        device = mqtt_device(port, broker_dir, creds[DEVICE])
        try:
            fetcher = MqttFetcher(device, DEVICE, timeout=10)
            client = TufClient((registry.metadata_dir / "1.root.json").read_bytes(), tmp_path / "dev" / "meta",
                               tmp_path / "dev" / "bundles", METADATA_URL, TARGETS_URL, fetcher=fetcher)
            got = client.fetch("digits", "1.0.0", "onnx-fp32")
            fetcher.close()
        finally:
            device.disconnect()
            device.loop_stop()
        assert hashlib.sha256(got.path.read_bytes()).hexdigest() == published.sha256

        code, out, err = serve.stop(sig)
    finally:
        serve.kill()
    assert code == 0, err
    served = int(re.search(r"^stopped \((\d+) bytes served over MQTT\)$", out, re.M).group(1))  # type: ignore[union-attr]
    assert served >= published.length
    assert "Traceback" not in err


@pytest.mark.parametrize(("extra", "message"), [
    (["--broker-port", "1"], "distribution: cannot use the broker at mqtt://127.0.0.1:1"),
    (["--ca", "missing-ca.pem"], "cannot load the CA certificate missing-ca.pem"),
])
def test_serve_reports_bad_settings_in_one_line(registry: Registry, run_cli: RunCli, extra: list[str],
                                                message: str) -> None:
    result = run_cli("fleet", "serve", registry.dir, "--broker-host", "127.0.0.1", "--http-port", "0", *extra,
                     timeout=60)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["serve", "controller"])
def test_a_password_on_the_command_line_is_refused(registry: Registry, run_cli: RunCli, tmp_path: Path,
                                                   command: str) -> None:
    result = run_cli("fleet", command, registry.dir, "--password", "hunter2-secret", timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--password is no longer accepted" in result.stderr and "$EDGEML_BROKER_PASSWORD" in result.stderr
    assert "hunter2-secret" not in result.stderr + result.stdout
    loose = tmp_path / "loose.password"
    loose.write_text("hunter2-secret\n")
    loose.chmod(0o644)
    result = run_cli("fleet", command, registry.dir, "--password-file", loose, timeout=60)
    assert result.returncode == 2 and f"chmod 600 {loose}" in result.stderr
    assert "hunter2-secret" not in result.stderr + result.stdout


def test_serve_refuses_a_directory_that_is_not_a_registry(tmp_path: Path, run_cli: RunCli) -> None:
    result = run_cli("fleet", "serve", tmp_path, "--http-port", "0", timeout=60)
    assert result.returncode == 2 and "is not an edgeml fleet registry" in result.stderr


# --- the HTTP server, in-process -----------------------------------------------------------------------------


@pytest.fixture
def repo_http(registry: Registry) -> Iterator[HttpServer]:
    with repository_server(registry.dir, port=0) as server:
        yield server


def request(server: HttpServer, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
    """One raw request (the path is sent exactly as given)."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def test_a_stock_updater_downloads_and_verifies_over_http(repo_http: HttpServer, registry: Registry,
                                                           make_bundle: MakeBundle, tmp_path: Path) -> None:
    published = registry.publish(make_bundle("1.0.0", payload=os.urandom(100_000)))
    verified = ngclient_download(repo_http.url, registry, tmp_path / "client")
    assert hashlib.sha256(verified.read_bytes()).hexdigest() == published.sha256
    assert verified.stat().st_size == published.length


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_files_have_exact_length_and_type(repo_http: HttpServer, registry: Registry, make_bundle: MakeBundle,
                                          method: str) -> None:
    published = registry.publish(make_bundle("1.0.0"))
    stored = registry.targets_dir / published.path.rsplit("/", 1)[0]
    target = next(stored.glob("*.edgeml"))
    cases = [("/metadata/timestamp.json", registry.metadata_dir / "timestamp.json", "application/json", "no-cache"),
             (f"/targets/{target.relative_to(registry.targets_dir)}", target, "application/octet-stream", None)]
    for url, file, ctype, cache in cases:
        status, headers, body = request(repo_http, method, url)
        assert status == 200
        assert int(headers["content-length"]) == file.stat().st_size
        assert headers["content-type"] == ctype and headers.get("cache-control") == cache
        assert body == (file.read_bytes() if method == "GET" else b"")


@pytest.mark.parametrize(("path", "status"), [
    ("/metadata/nope.json", 404),
    ("/metadata/", 404),  # no directory listings
    ("/targets/", 404),
    ("/targets/digits/", 404),
    ("/", 404),
    ("/registry.db", 404),
    ("/metadata/../../keys/targets.pem", 400),
    ("/targets/%2e%2e/%2e%2e/keys/targets.pem", 400),
    ("/targets/%2E%2E%2F%2E%2E%2Fkeys%2Ftargets.pem", 400),
    ("/targets/..%5c..%5ckeys%5ctargets.pem", 400),
    ("/targets/%252e%252e/%252e%252e/keys/targets.pem", 404),  # double-encoded: a literal name, not found
    ("/metadata/root.json%00.png", 400),
    ("/metadata/%ff.json", 400),
    ("/targets/escape/targets.pem", 404),  # a symlink to DIR/keys
    ("//etc/passwd", 404),
    ("http://evil/../../keys/targets.pem", 400),
])
def test_paths_outside_the_repository_are_refused(repo_http: HttpServer, registry: Registry, path: str,
                                                  status: int) -> None:
    (registry.targets_dir / "digits").mkdir()
    (registry.targets_dir / "escape").symlink_to(registry.dir / "keys")
    got, _, body = request(repo_http, "GET", path)
    assert got == status
    assert b"BEGIN" not in body and b"PRIVATE" not in body


@pytest.mark.parametrize(("link_to", "status"), [("targets/a/file.bin", 200), ("metadata/timestamp.json", 404)])
def test_a_symlink_is_served_only_inside_its_directory(repo_http: HttpServer, registry: Registry, link_to: str,
                                                       status: int) -> None:
    (registry.targets_dir / "a").mkdir()
    (registry.targets_dir / "a" / "file.bin").write_bytes(b"\x00\x01")
    (registry.targets_dir / "alias").symlink_to(registry.dir / "repository" / link_to)
    got, _, body = request(repo_http, "GET", "/targets/alias")
    assert got == status
    assert body == (b"\x00\x01" if status == 200 else b'{"error":"not found","hint":null,"status":404}')


def test_writes_to_the_repository_are_not_allowed(repo_http: HttpServer, registry: Registry) -> None:
    before = (registry.metadata_dir / "root.json").read_bytes()
    for method in ("PUT", "POST", "DELETE"):
        status, headers, body = request(repo_http, method, "/metadata/root.json")
        assert (status, headers["allow"], json.loads(body)["status"]) == (405, "GET, HEAD", 405)
    assert (registry.metadata_dir / "root.json").read_bytes() == before


def test_a_file_replaced_while_served_is_sent_whole(repo_http: HttpServer, registry: Registry) -> None:
    """The file is opened before its headers go out: a rename into place (how timestamp.json changes) never
    gives a Content-Length of one version and the bytes of the other."""
    timestamp = registry.metadata_dir / "timestamp.json"
    versions = [timestamp.read_bytes(), b'{"signed": "a newer, longer timestamp"}' * 3]
    stop = threading.Event()

    def swap() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            (registry.metadata_dir / "next.tmp").write_bytes(versions[i % 2])
            (registry.metadata_dir / "next.tmp").rename(timestamp)

    swapper = threading.Thread(target=swap)
    swapper.start()
    try:
        bodies = [request(repo_http, "GET", "/metadata/timestamp.json")[2] for _ in range(100)]
    finally:
        stop.set()
        swapper.join()
    assert set(bodies) <= set(versions)


@pytest.mark.parametrize("prefix", ["metadata/", "/metadata"])
def test_a_static_prefix_must_be_a_folder(tmp_path: Path, prefix: str) -> None:
    with pytest.raises(ConfigError, match="must start and end with '/'"):
        static_route(prefix, tmp_path)


def test_a_taken_port_and_a_missing_registry_are_reported(repo_http: HttpServer, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"cannot listen for HTTP on 127.0.0.1:{repo_http.port}"):
        HttpServer(build_app([]), port=repo_http.port).start()
    with pytest.raises(RegistryError, match="is not a registry"):
        repository_server(tmp_path)
    assert free_port() > 0


def test_serve_refuses_to_sign_the_audit_log_with_a_new_key(registry: Registry, make_bundle: MakeBundle,
                                                            run_cli: RunCli) -> None:
    registry.publish(make_bundle("1.0.0"))  # an audit entry, signed with DIR/keys/audit.pem
    (registry.dir / "keys" / "audit.pem").unlink()  # a second host without the first host's key
    result = run_cli("fleet", "serve", registry.dir, "--http-port", "0", timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "keys/audit.pem is missing, but the audit log already has 1 entries" in result.stderr
    assert not (registry.dir / "keys" / "audit.pem").exists()
