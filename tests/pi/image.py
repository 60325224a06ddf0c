"""The Raspberry Pi image built without Docker: the Pi Dockerfile carried out on an emulated arm64 Debian.

* The builder stage runs on the host: its COPY lines make the build context (a temporary copy of those paths,
  ``__pycache__`` left out as its ``.dockerignore`` says) and its RUN (``pip wheel ... --wheel-dir /wheels .``)
  runs there, with ``/wheels`` a temporary folder: the wheel is the same pure-Python wheel on any machine.
* The final stage runs in an :class:`~tests.pi.arm64.Arm64Root`: ``FROM debian:12.N-slim`` is debootstrap's
  ``minbase`` of Debian 12 (bookworm) for arm64, what Debian's own images are made of; ARG and ENV make the
  environment of every RUN (after the image's default PATH); RUN runs inside as root through SHELL;
  ``COPY --from=builder /wheels /tmp/wheels`` copies the wheel in; VOLUME creates its folder; USER, WORKDIR,
  HEALTHCHECK and ENTRYPOINT are kept to run the agent as ``docker run`` would. Any other instruction is
  refused, so the Dockerfile cannot grow a step that this test would skip.
* The README's instructions for a Pi without Docker (``python3 -m venv ... && .../pip install
  'edgeml[agent,ort]'``) run in the same root, into ``/opt/edgeml-ort`` (``/opt/edgeml`` is the image's) and
  with the wheel for the package name.
* What of ``Dockerfile.jetson`` can run here runs in the same root, into ``/opt/edgeml-jetson``: its venv and
  pip RUN with its pins (numpy, cuda-python) and ``edgeml[agent,tensorrt]``, with PyPI's CPU onnxruntime of the
  same minor version for NVIDIA's onnxruntime-gpu (NVIDIA's index is not reachable here, and its build needs
  CUDA). Not here: JetPack's Ubuntu 22.04 and its Python 3.10 (this root is Debian 12, Python 3.11), the L4T
  apt repository's TensorRT (python3-libnvinfer), CUDA and a GPU. :func:`jetson_command` makes the
  substitutions, each checked to apply.

Roots are cached under :data:`CACHE` (``.build/pi-rootfs``, or ``$EDGEML_PI_CACHE``), keyed by what they
install: the Debian base by its suite, variant and packages; the image on top by the final stage's
instructions, the README's command and the wheel's dependencies. Only edgeml itself is reinstalled on each
run, by the same RUN instruction, once the cached copy has been uninstalled (pip then downloads nothing).
"""

from __future__ import annotations

import contextlib
import email.parser
import fcntl
import hashlib
import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import REPO_ROOT
from tests.deploy.dockerfile import Stage, stages
from tests.pi import arm64

__all__ = ["CACHE", "Image", "PiImage", "build_wheel", "pi_image", "readme_venv_command"]

CACHE = Path(__import__("os").environ.get("EDGEML_PI_CACHE") or REPO_ROOT / ".build" / "pi-rootfs")
#: Bump when the steps below change in a way the keys do not see.
RECIPE = 1
ORT_VENV = "/opt/edgeml-ort"
JETSON_VENV = "/opt/edgeml-jetson"
_README_VENV = re.compile(r"^python3 -m venv (/\S+) && (/\S+)/bin/pip install '(edgeml\[[\w,]+\])'", re.M)


@dataclass
class Image:
    """What the final stage left for running the container: its environment, user, folder and commands."""

    env: dict[str, str] = field(default_factory=dict)
    user: str | None = None
    workdir: str = "/"
    entrypoint: list[str] = field(default_factory=list)
    healthcheck: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)
    shell: list[str] = field(default_factory=lambda: ["/bin/sh", "-c"])
    pip_runs: list[str] = field(default_factory=list)  # the RUN instructions that install edgeml


@dataclass(frozen=True)
class PiImage:
    """The built image: its root, how to run the container's commands, and what it was built from."""

    machine: arm64.Arm64Root
    image: Image
    wheel: Path
    facts: dict[str, str]

    def uid(self) -> str:
        """``UID:GID`` of the image's USER."""
        user = self.image.user or "0:0"
        return user if ":" in user else f"{user}:{user}"


# --- the builder stage ------------------------------------------------------------------------------------

def build_wheel(dest: Path) -> Path:
    """Carry out the builder stage on the host; returns the wheel it wrote into ``dest``.

    Raises:
        RuntimeError: The stage has instructions this cannot carry out, or pip failed.
    """
    builder = stages("raspberrypi")[0]
    with tempfile.TemporaryDirectory(prefix="edgeml-pi-context-") as tmp:
        context = Path(tmp)
        workdir = context
        for keyword, args in builder.instructions:
            if keyword == "WORKDIR":
                workdir = context / args.lstrip("/")
                workdir.mkdir(parents=True, exist_ok=True)
            elif keyword == "COPY":
                *sources, target = shlex.split(args)
                for src in sources:
                    _copy(REPO_ROOT / src, workdir / target / (Path(src).name if target.endswith("/") and
                                                               not src.endswith("/") else ""))
            elif keyword == "RUN":
                command = args.replace(" /wheels", f" {shlex.quote(str(dest))}")
                env = {**__import__("os").environ, "PATH": f"{Path(sys.executable).parent}:{arm64.DEFAULT_PATH}"}
                proc = subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=workdir, env=env,
                                      capture_output=True, text=True, timeout=600, check=False)
                if proc.returncode != 0:
                    raise RuntimeError(f"builder stage: {command} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
            else:
                raise RuntimeError(f"the builder stage has {keyword}, which tests/pi/image.py does not carry out")
    (wheel,) = dest.glob("edgeml-*.whl")
    return wheel


def _copy(src: Path, dest: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"), dirs_exist_ok=True)
    else:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)


def wheel_requirements(wheel: Path) -> list[str]:
    """The wheel's Requires-Dist lines (what pip installs beside it, per extra)."""
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        return sorted(email.parser.Parser().parsestr(zf.read(meta).decode()).get_all("Requires-Dist") or [])


def readme_venv_command() -> tuple[str, str, str]:
    """The README's Pi install without Docker: (venv folder, pip's folder, requirement)."""
    match = _README_VENV.search((REPO_ROOT / "README.md").read_text())
    if match is None:
        raise RuntimeError("README.md no longer says `python3 -m venv DIR && DIR/bin/pip install 'edgeml[...]'`")
    return match.group(1), match.group(2), match.group(3)


def jetson_command() -> str:
    """Dockerfile.jetson's venv and pip RUN, made to run in the emulated Debian (see the module docstring)."""
    final = stages("jetson")[-1]
    args = {k: v for k, _, v in (a.partition("=") for a in final.all("ARG"))}
    run = next(r for r in final.all("RUN") if "pip install" in r)
    minor = ".".join(args["ORT_VERSION"].split(".")[:2])
    for old, new in ((' --extra-index-url "${ORT_INDEX_URL}"', ""),
                     ('"onnxruntime-gpu==${ORT_VERSION}"', f'"onnxruntime=={minor}.*"'),
                     ("/tmp/wheels", "/tmp/jetson-wheels"), ("/opt/edgeml", JETSON_VENV),
                     ("&& edgeml --help", f"&& {JETSON_VENV}/bin/edgeml --help")):
        if old not in run:
            raise RuntimeError(f"Dockerfile.jetson's pip RUN no longer has {old!r}: update tests/pi/image.py")
        run = run.replace(old, new)
    return _expand(run, args)


def _jetson_install(machine: arm64.Arm64Root, wheels: Path, log: Path) -> None:
    _copy(wheels, machine.path("/tmp/jetson-wheels"))
    try:
        _run(machine, ["/bin/bash", "-o", "pipefail", "-c", jetson_command()], {"PIP_DISABLE_PIP_VERSION_CHECK": "1"},
             log)
    finally:
        shutil.rmtree(machine.path("/tmp/jetson-wheels"), ignore_errors=True)


# --- the final stage --------------------------------------------------------------------------------------

def _final() -> Stage:
    final = stages("raspberrypi")[-1]
    if not re.fullmatch(r"debian:12(\.\d+)?-slim", final.image):
        raise RuntimeError(f"the Pi image is based on {final.image}; tests/pi builds Debian 12 (bookworm) roots")
    return final


def _expand(text: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m.group(1) or m.group(2), ""), text)


def _env_pairs(args: str, env: dict[str, str]) -> dict[str, str]:
    return {k: _expand(v, env) for k, _, v in (item.partition("=") for item in shlex.split(args))}


def carry_out(machine: arm64.Arm64Root, stage: Stage, wheels: Path, log: Path,
              beside_pip: Callable[[], None] | None = None) -> Image:
    """Run the final stage's instructions in ``machine`` (see the module docstring); returns what they set.

    Args:
        beside_pip: Run in a thread of its own while the first RUN that installs with pip runs (the README's
            install: both are mostly pip under emulation, one core each).
    """
    image = Image(env={"PATH": arm64.DEFAULT_PATH})
    args: dict[str, str] = {}
    beside: threading.Thread | None = None
    failed: list[BaseException] = []

    def run_beside() -> None:
        try:
            beside_pip()  # type: ignore[misc]
        except BaseException as exc:
            failed.append(exc)
    for keyword, text in stage.instructions:
        scope = {**image.env, **args}
        if keyword == "ARG":
            name, _, default = text.partition("=")
            args[name] = _expand(default, scope)
        elif keyword == "ENV":
            image.env.update(_env_pairs(text, scope))
        elif keyword == "SHELL":
            image.shell = json.loads(text)
        elif keyword == "COPY":
            if text.split() != ["--from=builder", "/wheels", "/tmp/wheels"]:
                raise RuntimeError(f"COPY {text}: tests/pi/image.py copies only the builder's wheels")
            _copy(wheels, machine.path("/tmp/wheels"))
        elif keyword == "RUN":
            if "pip install" in text:
                image.pip_runs.append(text)
                if beside_pip is not None and beside is None:
                    beside = threading.Thread(target=run_beside, name="pi-readme-install")
                    beside.start()
            _run(machine, [*image.shell, text], {**image.env, **args}, log)
        elif keyword == "VOLUME":
            image.volumes = json.loads(text)
            for volume in image.volumes:
                machine.path(volume).mkdir(parents=True, exist_ok=True)
        elif keyword == "USER":
            image.user = text
        elif keyword == "WORKDIR":
            image.workdir = text
        elif keyword == "HEALTHCHECK":
            image.healthcheck = json.loads(text.split(" CMD ", 1)[1])
        elif keyword == "ENTRYPOINT":
            image.entrypoint = json.loads(text)
        elif keyword not in ("LABEL", "EXPOSE"):
            raise RuntimeError(f"the Pi Dockerfile has {keyword}, which tests/pi/image.py does not carry out")
    if beside is not None:
        beside.join()
    if failed:
        raise failed[0]
    return image


_LOG_LOCK = threading.Lock()


def _run(machine: arm64.Arm64Root, argv: list[str], env: dict[str, str], log: Path) -> str:
    start = time.monotonic()
    result = machine.run(argv, env=env, check=False)
    with _LOG_LOCK, log.open("a") as out:
        out.write(f"\n$ {shlex.join(argv)}  # {time.monotonic() - start:.0f} s, exit {result.returncode}\n")
        out.write(result.stdout)
    if result.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} failed in the emulated Pi:\n{result.stdout[-4000:]}")
    return result.stdout


def _readme_install(machine: arm64.Arm64Root, wheels: Path, log: Path) -> None:
    """The README's command in a plain shell on the Pi, with the wheel (in a folder of its own) for the name."""
    venv, pip_dir, requirement = readme_venv_command()
    assert venv == pip_dir, "the README installs into the venv it creates"
    inside = "/tmp/readme-wheels"
    _copy(wheels, machine.path(inside))
    wheel, extras = next(wheels.glob("edgeml-*.whl")).name, requirement.removeprefix("edgeml")
    command = f"python3 -m venv {ORT_VENV} && {ORT_VENV}/bin/pip install '{inside}/{wheel}{extras}'"
    try:
        _run(machine, ["/bin/sh", "-c", command], {}, log)
    finally:
        shutil.rmtree(machine.path(inside), ignore_errors=True)


def _beside(machine: arm64.Arm64Root, wheels: Path, log: Path) -> None:
    """The README's and the Jetson's installs, each in a thread (pip under emulation uses one core)."""
    _together(machine, wheels, log)


def _together(machine: arm64.Arm64Root, wheels: Path, log: Path, *more: Callable[[], None]) -> None:
    """The README's and the Jetson's installs and ``more``, each in a thread; the first failure is raised."""
    failed: list[BaseException] = []

    def run(step: Callable[[], None]) -> None:
        try:
            step()
        except BaseException as exc:
            failed.append(exc)

    steps = [lambda: _readme_install(machine, wheels, log), lambda: _jetson_install(machine, wheels, log), *more]
    threads = [threading.Thread(target=run, args=(step,)) for step in steps]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failed:
        raise failed[0]


# --- the cache --------------------------------------------------------------------------------------------

def _digest(*parts: object) -> str:
    return hashlib.sha256(arm64.json_key(RECIPE, *parts).encode()).hexdigest()[:16]


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run builds or uses the same roots: wait for it
        yield


def _prune(keep: set[str]) -> None:
    for path in CACHE.iterdir():
        if path.is_dir() and path.name not in keep and re.match(r"(base|image)-[0-9a-f]{16}", path.name):
            arm64.remove(path)


def pi_image(log_dir: Path) -> PiImage:
    """The Pi image with this checkout's edgeml installed (built, or taken from the cache and refreshed).

    Raises:
        RuntimeError: A step failed (its output in ``log_dir``).
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    wheels = Path(tempfile.mkdtemp(prefix="edgeml-pi-wheels-"))
    try:
        return _pi_image(log_dir, wheels)
    finally:
        shutil.rmtree(wheels, ignore_errors=True)


def _pi_image(log_dir: Path, wheels: Path) -> PiImage:
    with _locked():
        wheel = build_wheel(wheels)
        stage = _final()
        base = arm64.Base(suite="bookworm", variant="minbase")
        base_dir = CACHE / f"base-{_digest(base.key())}"
        image_key = _digest(base.key(), stage.image, stage.instructions, readme_venv_command(), jetson_command(),
                            wheel_requirements(wheel))
        image_dir = CACHE / f"image-{image_key}"
        _prune({base_dir.name, image_dir.name})
        machine = arm64.Arm64Root(image_dir, image_dir.with_name(image_dir.name + ".cpuinfo"))
        if not (image_dir / ".edgeml-image.json").is_file():
            if not base_dir.is_dir():
                arm64.debootstrap(base_dir, base, log_dir / "debootstrap.log")
            _build_image(base_dir, image_dir, stage, wheels, log_dir / "image.log")  # with this wheel
            image = Image(**json.loads((image_dir / ".edgeml-image.json").read_text()))
        else:
            image = Image(**json.loads((image_dir / ".edgeml-image.json").read_text()))
            _refresh(machine, image, wheels, log_dir / "refresh.log")
        facts = arm64.describe(machine)
    return PiImage(machine, image, wheel, facts)


def _build_image(base_dir: Path, image_dir: Path, stage: Stage, wheels: Path, log: Path) -> None:
    work = image_dir.with_name(image_dir.name + ".tmp")
    arm64.remove(work)
    subprocess.run(["cp", "-a", "--reflink=auto", str(base_dir), str(work)], check=True, timeout=900)
    shutil.copyfile(base_dir.with_name(base_dir.name + ".cpuinfo"), work.with_name(work.name + ".cpuinfo"))
    machine = arm64.Arm64Root(work, work.with_name(work.name + ".cpuinfo"))
    log.write_text("")
    image = carry_out(machine, stage, wheels, log, beside_pip=lambda: _beside(machine, wheels, log))
    (work / ".edgeml-image.json").write_text(json.dumps(image.__dict__, indent=1))
    work.rename(image_dir)
    work.with_name(work.name + ".cpuinfo").rename(image_dir.with_name(image_dir.name + ".cpuinfo"))


def _refresh(machine: arm64.Arm64Root, image: Image, wheels: Path, log: Path) -> None:
    """Reinstall this checkout's edgeml the way the image, the README and the Jetson's Dockerfile install it
    (their dependencies are installed already, so pip downloads nothing)."""
    log.write_text("")
    for venv in ("/opt/edgeml", ORT_VENV, JETSON_VENV):
        _run(machine, [f"{venv}/bin/pip", "uninstall", "--yes", "--quiet", "edgeml"], image.env, log)

    def the_image() -> None:
        _copy(wheels, machine.path("/tmp/wheels"))
        for text in image.pip_runs:
            _run(machine, [*image.shell, text], image.env, log)

    _together(machine, wheels, log, the_image)
