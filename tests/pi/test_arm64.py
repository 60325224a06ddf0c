"""Where the emulated Pi cannot run, it says why (the tests then skip, or fail under EDGEML_REQUIRE_SERVICES=1);
and the pieces of the emulation that need no emulator: the Debian mirror read from apt's sources, the binfmt_misc
registration of aarch64 ELF files, and the substitutions that make Dockerfile.jetson's pip RUN runnable here."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.pi import arm64
from tests.pi.image import JETSON_VENV, jetson_command, readme_venv_command


@pytest.mark.parametrize(("patch", "reason"), [
    ({"system": "Darwin"}, "user-mode emulation needs Linux"),
    ({"euid": 1000}, "needs root: a Debian root needs 65536 ids"),
    ({"missing": "debootstrap"}, "debootstrap is not installed (apt-get install"),
    ({"missing": "unshare"}, "unshare is not installed"),
    ({"no_qemu": True}, "qemu-user-static"),
])
def test_unavailable_says_why(monkeypatch: pytest.MonkeyPatch, patch: dict[str, object], reason: str) -> None:
    monkeypatch.setattr(arm64.platform, "system", lambda: patch.get("system", "Linux"))
    monkeypatch.setattr(arm64.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(arm64.os, "geteuid", lambda: patch.get("euid", 0))
    real_which = arm64.shutil.which
    monkeypatch.setattr(arm64.shutil, "which", lambda name: None if name == patch.get("missing") else
                        real_which(name) or f"/usr/bin/{name}")
    if patch.get("no_qemu"):
        monkeypatch.setattr(arm64, "QEMU", Path("/nonexistent/qemu-aarch64-static"))
    found = arm64.unavailable()
    assert found is not None and reason in found, found


def test_a_namespace_that_cannot_be_made_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    if arm64.unavailable() is not None:
        pytest.skip("this machine cannot emulate arm64 at all")

    def refused(script: str, **popen: object) -> object:
        raise PermissionError("unshare: unshare failed: Operation not permitted")

    monkeypatch.setattr(arm64, "_unshare", refused)
    found = arm64.unavailable()
    assert found is not None and found.startswith("user namespaces are unavailable") and "not permitted" in found


@pytest.mark.parametrize(("sources", "expected"), [
    ("Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm\n\nTypes: deb\n"
     "URIs: http://mirror.example/debian-security\nSuites: bookworm-security\n",
     ("http://mirror.example/debian", "http://mirror.example/debian-security")),
    ("deb [arch=amd64] https://m.example/debian/ bookworm main\n",
     ("https://m.example/debian", "http://deb.debian.org/debian-security")),
    ("", ("http://deb.debian.org/debian", "http://deb.debian.org/debian-security")),
])
def test_the_debian_mirror_comes_from_apts_sources(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, sources: str,
                                                   expected: tuple[str, str]) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(sources)
    real = arm64.Path

    def path(p: str, *rest: str) -> Path:
        return real(str(p).replace("/etc/apt", str(tmp_path)), *rest)

    monkeypatch.setattr(arm64, "Path", path)
    assert arm64.host_mirrors() == expected


def test_the_aarch64_registration_matches_elf64_little_endian_aarch64_executables() -> None:
    _, name, kind, offset, magic, mask, interpreter, flags = arm64._REGISTER.split(":")
    assert (name, kind, offset, flags) == ("qemu-aarch64", "M", "", "OPF")
    raw = bytes.fromhex(magic.replace("\\x", ""))
    assert raw[:4] == b"\x7fELF" and raw[4] == 2 and raw[5] == 1 and raw[18:20] == (183).to_bytes(2, "little")
    assert len(bytes.fromhex(mask.replace("\\x", ""))) == len(raw) and interpreter == str(arm64.QEMU)


def test_the_jetson_and_readme_commands_are_read_from_their_files() -> None:
    command = jetson_command()
    assert "onnxruntime-gpu" not in command and '"onnxruntime==1.20.*"' in command  # same minor, from PyPI
    assert f"python3 -m venv --system-site-packages {JETSON_VENV}" in command and "/opt/edgeml/" not in command
    assert '"cuda-python==12.6.2.post1" "numpy==1.26.4"' in command and "[agent,tensorrt,delta]" in command
    assert readme_venv_command() == ("/opt/edgeml", "/opt/edgeml", "edgeml[agent,ort]")
