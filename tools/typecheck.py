"""Run mypy over the source tree as the installed ``edgeml`` namespace.

The top-level folders (compile/, train/, ...) install as ``edgeml.compile`` etc. through setuptools'
package-dir mapping, which mypy cannot follow in an editable install. This script lays out a tree of
symlinks in .build/typecheck/ that mirrors the installed layout, runs mypy on it, and prints errors with
the real repository paths.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    mapping: dict[str, str] = config["tool"]["setuptools"]["package-dir"]
    tree = ROOT / ".build" / "typecheck"
    pkg = tree / "edgeml"
    if pkg.exists():
        for path in sorted(pkg.rglob("*"), reverse=True):
            path.unlink() if path.is_symlink() or path.is_file() else path.rmdir()
    pkg.mkdir(parents=True, exist_ok=True)
    links: dict[str, str] = {}
    for name, folder in sorted(mapping.items()):
        dest = tree.joinpath(*name.split("."))
        dest.mkdir(parents=True, exist_ok=True)
        for src in (ROOT / folder).glob("*.py"):
            (dest / src.name).symlink_to(src)
        links[str(dest.relative_to(ROOT))] = folder
    subpackages = [init.parent for folder in set(mapping.values()) for init in (ROOT / folder).rglob("*/__init__.py")]
    for sub in sorted(subpackages):
        rel = sub.relative_to(ROOT)
        top = rel.parts[0]
        name = next(k for k, v in mapping.items() if v == top)
        dest = tree.joinpath(*name.split("."), *rel.parts[1:])
        if dest.exists():
            continue
        dest.mkdir(parents=True)
        for src in sub.glob("*.py"):
            (dest / src.name).symlink_to(src)
        links[str(dest.relative_to(ROOT))] = str(rel)
    proc = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
                           str(pkg)], cwd=ROOT, capture_output=True, text=True, check=False)
    out = proc.stdout + proc.stderr
    for prefix in sorted(links, key=len, reverse=True):
        out = out.replace(prefix + os.sep, links[prefix] + os.sep)
    sys.stdout.write(out)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
