"""What a device installs and imports: the agent's extras pull no heavy stacks, the CLI root imports none,
a missing extra names its fix, and the device-side code never imports the build/server packages."""

from __future__ import annotations

import ast
import importlib.metadata as md
import json
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from edgeml._deps import require
from edgeml.errors import MissingExtraError
from tests.conftest import REPO_ROOT, RunCli

HEAVY_DISTRIBUTIONS = {"torch", "tensorflow", "tensorflow-cpu", "tf-keras", "sqlalchemy"}
HEAVY_MODULES = ("torch", "tensorflow", "onnx", "onnxruntime", "sqlalchemy")
#: What devices install: the agent, and each of its runtime extras.
DEVICE_EXTRAS = ("agent", "ort", "litert")


def _resolve(dist: str, extras: frozenset[str], seen: dict[str, set[str]]) -> None:
    """Walk the requirements of ``dist[extras]`` through the installed distributions' metadata."""
    key = canonicalize_name(dist)
    if extras <= seen.get(key, set()) and key in seen:
        return
    seen.setdefault(key, set()).update(extras)
    try:
        requirements = md.requires(dist) or []
    except md.PackageNotFoundError:
        return  # not installed here: its name is still checked, its own requirements cannot be
    for line in requirements:
        req = Requirement(line)  # markers are evaluated for this machine, with each requested extra
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in (extras or {""})):
            continue
        _resolve(req.name, frozenset(req.extras), seen)


@pytest.mark.parametrize("extra", DEVICE_EXTRAS)
def test_device_extras_resolve_without_heavy_stacks(extra: str) -> None:
    seen: dict[str, set[str]] = {}
    _resolve("edgeml", frozenset({extra}), seen)
    assert len(seen) > 2, f"edgeml[{extra}] resolved to nothing: is edgeml installed? {sorted(seen)}"
    assert not HEAVY_DISTRIBUTIONS & set(seen), f"edgeml[{extra}] pulls {sorted(HEAVY_DISTRIBUTIONS & set(seen))}"


def test_resolver_sees_the_heavy_stacks_of_build_extras() -> None:
    """The check above would notice: the build extras do resolve to the heavy stacks."""
    train: dict[str, set[str]] = {}
    _resolve("edgeml", frozenset({"train"}), train)
    tflite: dict[str, set[str]] = {}
    _resolve("edgeml", frozenset({"tflite"}), tflite)
    assert "torch" in train
    assert {"tensorflow", "onnx", "onnxruntime"} <= set(tflite)  # through edgeml[compile] too


def test_help_runs_in_a_subprocess(run_cli: RunCli) -> None:
    code, out, err = run_cli("--help")
    assert code == 0, err
    for command in ("compile", "inspect", "verify"):
        assert command in out


def test_importing_the_cli_imports_no_heavy_library() -> None:
    script = (
        "import json, sys\n"
        "import edgeml.cli\n"
        f"print(json.dumps(sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []


def test_importing_the_tensorrt_package_imports_neither_tensorrt_nor_cuda() -> None:
    """``edgeml.tensorrt`` is a package of small modules; each imports TensorRT and cuda-python only inside
    the functions that need them, so the agent (and ``edgeml compile`` without a GPU) can import all of it."""
    script = (
        "import importlib, json, pkgutil, sys\n"
        "import edgeml.tensorrt as package\n"
        "names = sorted(m.name for m in pkgutil.iter_modules(package.__path__, 'edgeml.tensorrt.'))\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps([names, sorted(m for m in ('tensorrt', 'cuda') if m in sys.modules)]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    names, heavy = json.loads(proc.stdout)
    assert {"edgeml.tensorrt.build", "edgeml.tensorrt.cache", "edgeml.tensorrt.config"} <= set(names)
    assert heavy == []


@pytest.mark.parametrize("also", [None, "pip install --no-deps onnx2tf==1.29.24"])
def test_missing_extra_names_the_pip_extra(also: str | None) -> None:
    with pytest.raises(MissingExtraError) as info:
        require("edgeml_test_no_such_module", "agent", also=also)
    fix = "pip install 'edgeml[agent]'" + (f" && {also}" if also else "")
    assert str(info.value) == f"edgeml_test_no_such_module is not installed; run: {fix}"
    assert (info.value.module, info.value.extra) == ("edgeml_test_no_such_module", "agent")
    assert isinstance(info.value.__cause__, ImportError)


# --- static check: device-side code never imports the build or server packages --------------------------

FORBIDDEN = ("edgeml.compile", "edgeml.train", "edgeml.fleet")
#: The CLI root mounts every package's thin ``cli`` module, and the demo drives the whole loop (train,
#: compile, serve); both are entry points, not device-side libraries, so they alone are exempt here.
EXEMPT = {Path("edgeml/cli.py"), Path("edgeml/demo/__init__.py"), Path("edgeml/demo/fleet.py"),
          Path("edgeml/demo/story.py")}


def _package_of(path: Path) -> str:
    """Dotted package of a file under the repository root (``edge_agent/`` installs as edgeml.edge_agent)."""
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    if parts[0] != "edgeml":
        parts.insert(0, "edgeml")
    return ".".join(parts[:-1])  # for __init__.py too: its package is the folder


def _is_forbidden(module: str) -> bool:
    return any(module == f or module.startswith(f + ".") or module.startswith(f + ":") for f in FORBIDDEN)


def forbidden_imports(source: str, package: str) -> list[str]:
    """Modules of :data:`FORBIDDEN` that ``source`` imports, anywhere (lazy imports count: a device lacks
    them all the same), including ``importlib.import_module("...")`` with a literal name."""
    found = []
    for node in ast.walk(ast.parse(source)):
        modules: list[str] = []
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            modules = [base] if _is_forbidden(base) else [f"{base}.{alias.name}" for alias in node.names]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"):
            modules = [node.args[0].value]
        found += [m for m in modules if _is_forbidden(m)]
    return found


@pytest.mark.parametrize(
    ("source", "package", "expected"),
    [
        ("import edgeml.compile", "edgeml", ["edgeml.compile"]),
        ("from edgeml.train.digits import fit", "edgeml", ["edgeml.train.digits"]),
        ("from edgeml import fleet", "edgeml", ["edgeml.fleet"]),
        ("def f():\n    from edgeml.compile import gate", "edgeml.edge_agent", ["edgeml.compile"]),
        ("from ...compile import gate", "edgeml.edge_agent.runtimes", ["edgeml.compile"]),
        ("from .. import fleet", "edgeml.edge_agent", ["edgeml.fleet"]),
        ("importlib.import_module('edgeml.fleet.registry.repository')", "edgeml", ["edgeml.fleet.registry.repository"]),
        ("from edgeml.errors import EdgeMLError\nimport edgeml.edge_agent", "edgeml", []),
        ("from . import base\nfrom .base import Runtime", "edgeml.edge_agent.runtimes", []),
        ('"""Nothing here imports edgeml.compile."""', "edgeml", []),
    ],
)
def test_forbidden_import_finder(source: str, package: str, expected: list[str]) -> None:
    assert sorted(set(forbidden_imports(source, package))) == expected


def _device_side_files() -> list[Path]:
    files = sorted((REPO_ROOT / "edgeml").rglob("*.py")) + sorted((REPO_ROOT / "edge_agent").rglob("*.py"))
    return [f for f in files if f.relative_to(REPO_ROOT) not in EXEMPT]


def test_device_side_code_never_imports_build_or_server_packages() -> None:
    files = _device_side_files()
    assert Path("edgeml/bundle.py") in {f.relative_to(REPO_ROOT) for f in files}
    assert any(f.relative_to(REPO_ROOT).parts[0] == "edge_agent" for f in files)
    offenders = {
        str(f.relative_to(REPO_ROOT)): found
        for f in files
        if (found := forbidden_imports(f.read_text(encoding="utf-8"), _package_of(f)))
    }
    assert offenders == {}


#: (package folder, modules it must not import): contracts both sides read live in the core (edgeml/), so the
#: fleet plans by the core's capabilities and thresholds, and the compiler reads runs by the core's rundir.
LAYERS = [
    ("fleet", ("edgeml.edge_agent",), {Path("fleet/sim")}),  # the simulator runs real device code on purpose
    ("compile", ("edgeml.train",), set()),
]


@pytest.mark.parametrize(("folder", "forbidden", "exempt"), LAYERS, ids=[layer[0] for layer in LAYERS])
def test_contracts_come_from_the_core_not_from_the_other_side(folder: str, forbidden: tuple[str, ...],
                                                              exempt: set[Path]) -> None:
    offenders = {}
    for f in sorted((REPO_ROOT / folder).rglob("*.py")):
        rel = f.relative_to(REPO_ROOT)
        if any(rel.is_relative_to(e) for e in exempt):
            continue
        tree = ast.parse(f.read_text(encoding="utf-8"))
        found = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
                 and any(n.module == m or n.module.startswith(m + ".") for m in forbidden)]
        found += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
                  if any(a.name == m or a.name.startswith(m + ".") for m in forbidden)]
        if found:
            offenders[str(rel)] = found
    assert offenders == {}


def test_the_core_runtime_names_are_the_agents_runtimes() -> None:
    from edgeml.capabilities import RUNTIME_NAMES
    from edgeml.edge_agent.runtimes.base import RUNTIMES

    assert set(RUNTIME_NAMES) == set(RUNTIMES)


def test_cli_root_imports_only_thin_cli_modules_at_top_level() -> None:
    """The exemption is narrow: at import time the CLI root only mounts each package's ``cli`` module."""
    tree = ast.parse((REPO_ROOT / "edgeml" / "cli.py").read_text(encoding="utf-8"))
    top = [n.module for n in tree.body if isinstance(n, ast.ImportFrom) and n.module and _is_forbidden(n.module)]
    top += [a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names if _is_forbidden(a.name)]
    assert top, "edgeml/cli.py mounts no package command"
    assert all(m.endswith(".cli") for m in top), top


_MUTATORS = {"setdefault", "update", "append", "extend", "insert", "pop", "popitem", "clear", "remove", "__setitem__"}


def patched_globals(source: str) -> list[str]:
    """What a module changes of the edgeml modules it imports: ``module.name = ...`` anywhere, and at import
    time ``name[...] = ...`` or ``name.setdefault(...)`` (and other mutators) on a name imported from one.
    (The standard library is left alone: onnx2tf's worker process cuts its own network off on purpose.)"""
    tree = ast.parse(source)
    modules, imported = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {a.asname or a.name for a in node.names if a.name.startswith("edgeml")}
        elif isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("edgeml")):
            imported |= {a.asname or a.name for a in node.names}
    found = []
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
        for t in targets:
            if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and \
                    (t.value.id in modules or t.value.id in imported and t.value.id[:1].islower()):
                found.append(f"{t.value.id}.{t.attr} = ...")
    for stmt in tree.body:  # import-time mutations of another module's containers
        for node in ast.walk(stmt):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in _MUTATORS \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id in imported:
                found.append(f"{node.func.value.id}.{node.func.attr}(...)")
            if isinstance(node, ast.Assign):
                found += [f"{t.value.id}[...] = ..." for t in node.targets
                          if isinstance(t, ast.Subscript) and isinstance(t.value, ast.Name) and t.value.id in imported]
    return found


@pytest.mark.parametrize(("source", "expected"), [
    ("from edgeml.edge_agent import serving\nserving.open_runtime = f", ["serving.open_runtime = ..."]),
    ("import edgeml.edge_agent.serving as s\ndef f():\n    s.x = 1", ["s.x = ..."]),
    ("import socket\nsocket.getaddrinfo = f", []),
    ("from edgeml.edge_agent.runtimes.base import RUNTIMES\nRUNTIMES.setdefault('sim', 'x')",
     ["RUNTIMES.setdefault(...)"]),
    ("from edgeml.edge_agent.runtimes.base import RUNTIMES\nRUNTIMES['sim'] = 'x'", ["RUNTIMES[...] = ..."]),
    ("from x import y\ndef f(self):\n    self.a = 1\n    local = {}\n    local.update(y)", []),
])
def test_patched_globals_finder(source: str, expected: list[str]) -> None:
    assert patched_globals(source) == expected


def test_no_product_module_patches_another_modules_globals() -> None:
    """The simulator once replaced serving.open_runtime for everyone and added itself to the runtime registry at
    import; behaviour comes in through parameters (the update machine's ``runtimes``, a session's policy)."""
    offenders = {}
    for folder in ("edgeml", "edge_agent", "fleet", "compile", "train"):
        for f in sorted((REPO_ROOT / folder).rglob("*.py")):
            if found := patched_globals(f.read_text(encoding="utf-8")):
                offenders[str(f.relative_to(REPO_ROOT))] = found
    assert offenders == {}
