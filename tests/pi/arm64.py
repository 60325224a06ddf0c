"""An arm64 Debian machine on this one, without Docker: user-mode emulation in a chroot.

What it takes (checked on 2026-12-02, issue 15): ``qemu-user-static`` and ``debootstrap`` from apt, root
(65536 ids are mapped into the namespace, as a Debian system needs), user namespaces and a kernel that gives
each user namespace its own binfmt_misc (Linux >= 6.7). :func:`unavailable` says which of these is missing.

How a command runs (:meth:`Arm64Root.popen`): ``unshare --user --mount --fork`` starts a shell in new user
and mount namespaces; this process writes the identity map ``0 0 65536`` to the namespace's uid_map and
gid_map; the shell mounts a private binfmt_misc and registers ``qemu-aarch64-static`` with flags ``OPF``
(F opens the interpreter now, so it runs inside the chroot without a copy there), binds /dev, /proc and /sys
into the root, a Cortex-A76 ``/proc/cpuinfo`` over the host's (onnxruntime reads it to choose its kernels and
crashes on an x86 one seen through qemu), and ``exec chroot ROOT env -i ... COMMAND`` with
``QEMU_CPU=cortex-a76`` (qemu's default CPU model makes onnxruntime 20x slower). Nothing leaks out of the
namespaces; the processes are the caller's to stop (one process group each).

Building a root (:func:`debootstrap`): ``debootstrap --foreign --arch=arm64 --variant=minbase`` unpacks it on
the host; the second stage (``container=lxc`` skips its mknod check) configures it under emulation; then the
machine's network set-up is copied in (resolv.conf, and its CA bundle for pip, since HTTPS may go through a
proxy only this machine trusts) and apt gets the sources of Debian's own images. A cold build takes a few
minutes, mostly dpkg configuring packages under emulation, which runs code 10-200x slower than native: an
emulated device proves function, never speed.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DEFAULT_PATH", "Arm64Root", "Base", "debootstrap", "host_mirrors", "unavailable"]

QEMU = Path("/usr/bin/qemu-aarch64-static")
DEBOOTSTRAP = "debootstrap"
#: The PATH of Debian's images (and so of a Dockerfile's RUN before any ENV changes it).
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: qemu-aarch64 in binfmt_misc's register syntax (magic and mask of an aarch64 ELF, as Debian's binfmts file).
_REGISTER = (r":qemu-aarch64:M::\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00"
             r":\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff"
             f":{QEMU}:OPF")
_IDS = "0 0 65536\n"
# A Raspberry Pi 5's cores (BCM2712, Cortex-A76), one entry per host CPU.
_CPU = """processor\t: {n}
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x4
CPU part\t: 0xd0b
CPU revision\t: 1

"""
_PI_MODEL = "Revision\t: d04170\nSerial\t\t: 0000000000000000\nModel\t\t: Raspberry Pi 5 Model B Rev 1.0\n"


def _native() -> bool:
    return platform.machine() in ("aarch64", "arm64")


def unavailable() -> str | None:
    """Why arm64 commands cannot run here, or None when they can (asks the kernel with a throwaway namespace)."""
    if platform.system() != "Linux":
        return "user-mode emulation needs Linux"
    if os.geteuid() != 0:
        return "needs root: a Debian root needs 65536 ids mapped into its user namespace"
    for tool in ("unshare", "chroot", DEBOOTSTRAP):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install util-linux coreutils debootstrap)"
    if not _native() and not QEMU.exists():
        return f"{QEMU} is not installed (apt-get install qemu-user-static)"
    script = "set -e; " + _wait_for_ids() + ("" if _native() else _binfmt())
    try:
        proc = _unshare(script, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out, _ = proc.communicate(timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"user namespaces are unavailable: {exc}"
    if proc.returncode != 0:
        text = out.decode(errors="replace").strip()[-300:]
        return f"user namespaces or a private binfmt_misc (Linux >= 6.7) are unavailable: {text}"
    return None


def _wait_for_ids() -> str:
    # The parent maps the ids once unshare(2) has made the namespace; until then we are nobody.
    return 'n=0; while [ "$(id -u)" != 0 ]; do n=$((n+1)); [ $n -lt 2000 ] || exit 97; sleep 0.005; done; '


def _binfmt() -> str:
    return ("mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc; "
            f"printf '%s' {shlex.quote(_REGISTER)} > /proc/sys/fs/binfmt_misc/register; ")


def _unshare(script: str, **popen: object) -> subprocess.Popen[bytes]:
    """Start ``sh -c script`` in new user and mount namespaces, with the identity map written for it."""
    proc: subprocess.Popen[bytes] = subprocess.Popen(  # type: ignore[call-overload]
        ["unshare", "--user", "--mount", "--fork", "--kill-child", "sh", "-c", script],
        start_new_session=True, **popen)
    own = os.readlink("/proc/self/ns/user")
    deadline = time.monotonic() + 10
    while True:
        try:
            if os.readlink(f"/proc/{proc.pid}/ns/user") != own:
                break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            return proc  # it failed on its own; the caller reads why
        time.sleep(0.002)
    for name in ("uid_map", "gid_map"):
        Path(f"/proc/{proc.pid}/{name}").write_text(_IDS)
    return proc


@dataclass(frozen=True)
class Arm64Root:
    """An arm64 Debian root folder, and how to run commands in it.

    Args:
        root: The root folder.
        cpuinfo: The file bound over ``/proc/cpuinfo`` inside (written by :func:`debootstrap`).
    """

    root: Path
    cpuinfo: Path

    def popen(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, user: str | None = None,
              cwd: str = "/", **popen: object) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside, with exactly ``env`` (plus ``QEMU_CPU``) as its environment.

        Args:
            argv: The command (paths inside the root).
            env: Its environment (default: PATH only).
            user: ``UID:GID`` to run as (default: root).
            cwd: Its working directory inside.
            popen: More arguments for :class:`subprocess.Popen` (stdout, stderr, ...).

        Returns the process: ``unshare``, whose process group holds the command (stop it with :func:`stop`).
        """
        r = shlex.quote(str(self.root))
        environ = {"PATH": DEFAULT_PATH, **(env or {})}
        if not _native():
            environ["QEMU_CPU"] = "cortex-a76"
        mounts = "".join(f"mount --rbind /{d} {r}/{d}; " for d in ("dev", "proc", "sys"))
        mounts += f"mount --bind {shlex.quote(str(self.cpuinfo))} {r}/proc/cpuinfo; "
        chroot = ["chroot", *([f"--userspec={user}"] if user else []), str(self.root), "/usr/bin/env", "-i",
                  f"--chdir={cwd}", *(f"{k}={v}" for k, v in environ.items()), *argv]
        script = ("set -e; " + _wait_for_ids() + ("" if _native() else _binfmt()) + mounts
                  + "exec " + shlex.join(chroot))
        return _unshare(script, **popen)

    def run(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, user: str | None = None,
            cwd: str = "/", timeout: float = 1800, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside and wait; stdout and stderr together in ``stdout``.

        Raises:
            RuntimeError: With ``check``, the command failed (its output's tail in the message).
        """
        proc = self.popen(argv, env=env, user=user, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop(proc, grace_s=0)
            out, _ = proc.communicate()
        text = out.decode(errors="replace")
        if check and proc.returncode != 0:
            raise RuntimeError(f"{shlex.join(argv)} failed with {proc.returncode} in {self.root}:\n{text[-4000:]}")
        return subprocess.CompletedProcess(list(argv), proc.returncode, text, "")

    def path(self, inside: str) -> Path:
        """The host path of ``inside`` (an absolute path inside the root)."""
        return self.root / inside.lstrip("/")


def stop(proc: subprocess.Popen[bytes], grace_s: float = 30.0) -> int:
    """Stop a process started by :meth:`Arm64Root.popen`: SIGTERM to its group, SIGKILL after ``grace_s``."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM if grace_s > 0 else signal.SIGKILL)
            proc.wait(timeout=grace_s if grace_s > 0 else 10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        except ProcessLookupError:
            pass
    return proc.wait()


# --- building a root --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Base:
    """What :func:`debootstrap` installs: Debian ``suite`` for arm64, ``variant``, plus ``packages``."""

    suite: str = "bookworm"
    variant: str = "minbase"
    packages: tuple[str, ...] = ()

    def key(self) -> dict[str, object]:
        return {"suite": self.suite, "arch": "arm64", "variant": self.variant, "packages": sorted(self.packages)}


def host_mirrors() -> tuple[str, str]:
    """This machine's Debian mirror and security mirror (from its apt sources; Debian's CDN otherwise)."""
    text = ""
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        if path.suffix in (".list", ".sources") or path.name == "sources.list":
            try:
                text += path.read_text() + "\n"
            except OSError:
                continue
    urls = re.findall(r"(?:^URIs:\s*|^deb\s+(?:\[[^]]*\]\s+)?)(https?://\S+)", text, flags=re.M)
    main = next((u for u in urls if re.search(r"/debian/?$", u)), "http://deb.debian.org/debian")
    security = next((u for u in urls if re.search(r"/debian-security/?$", u)), "http://deb.debian.org/debian-security")
    return main.rstrip("/"), security.rstrip("/")


def debootstrap(dest: Path, base: Base, log: Path) -> Arm64Root:
    """Build ``dest`` (which must not exist) as an arm64 Debian ``base``; returns it ready to run commands.

    Built in ``dest`` + ``.tmp`` and renamed into place, so an interrupted build leaves no half root behind.

    Raises:
        RuntimeError: A step failed (its output's tail in the message; the whole log in ``log``).
    """
    work = dest.with_name(dest.name + ".tmp")
    if work.exists():
        _remove_tree(work)
    mirror, security = host_mirrors()
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = ["debootstrap", "--foreign", "--arch=arm64", f"--variant={base.variant}",
           *([f"--include={','.join(base.packages)}"] if base.packages else []), base.suite, str(work), mirror]
    with log.open("w") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=1800, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed:\n{log.read_text(errors='replace')[-4000:]}")
    if (work / "proc").is_symlink():  # debootstrap links it inside a container
        (work / "proc").unlink()
    for d in ("proc", "sys", "dev"):
        (work / d).mkdir(exist_ok=True)
    cpuinfo = dest.with_name(dest.name + ".cpuinfo")
    cpuinfo.write_text("".join(_CPU.format(n=n) for n in range(os.cpu_count() or 1)) + _PI_MODEL)
    machine = Arm64Root(work, cpuinfo)
    second = machine.run(["/bin/sh", "-c", "container=lxc /debootstrap/debootstrap --second-stage"], check=False)
    with log.open("a") as out:
        out.write(second.stdout)
    if second.returncode != 0:
        raise RuntimeError(f"debootstrap's second stage failed:\n{second.stdout[-4000:]}")
    _network(work, base.suite, mirror, security)
    work.rename(dest)
    return Arm64Root(dest, cpuinfo)


def _network(root: Path, suite: str, mirror: str, security: str) -> None:
    """This machine's resolver and CA bundle (for pip), and apt sources like Debian's images."""
    etc = root / "etc"
    shutil.copyfile("/etc/resolv.conf", etc / "resolv.conf")
    (etc / "hosts").write_text("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n")
    bundle = next((p for p in (Path("/etc/ssl/certs/ca-certificates.crt"), Path("/etc/pki/tls/certs/ca-bundle.crt"))
                   if p.is_file()), None)
    if bundle is not None:
        (etc / "ssl").mkdir(exist_ok=True)
        shutil.copyfile(bundle, etc / "ssl" / "host-ca.crt")
        (etc / "pip.conf").write_text("[global]\ncert = /etc/ssl/host-ca.crt\n")
    (etc / "apt" / "sources.list").write_text(
        f"deb {mirror} {suite} main\ndeb {mirror} {suite}-updates main\ndeb {security} {suite}-security main\n")


def _remove_tree(path: Path) -> None:
    """Remove a root folder (no mounts stay behind: they lived in namespaces that are gone)."""
    shutil.rmtree(path, ignore_errors=True)
    if path.exists():
        subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False, timeout=600)


def remove(path: Path) -> None:
    """Remove a root built here (and its cpuinfo file)."""
    _remove_tree(path)
    path.with_name(path.name + ".cpuinfo").unlink(missing_ok=True)


def describe(machine: Arm64Root) -> dict[str, str]:
    """What the root is: Debian version and the kernel architecture seen inside."""
    out = machine.run(["/bin/sh", "-c", "cat /etc/debian_version; uname -m"]).stdout.split()
    return {"debian": out[0], "machine": out[1]}


def json_key(*parts: object) -> str:
    """A stable text form of ``parts`` for cache keys."""
    return json.dumps(parts, sort_keys=True, default=str)
