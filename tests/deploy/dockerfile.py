"""A small Dockerfile reader shared by the lint-level checks (tests/deploy) and the emulated Raspberry Pi
(tests/pi), which carries out the Pi Dockerfile's final stage itself."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from tests.conftest import REPO_ROOT

__all__ = ["DOCKERFILES", "Stage", "parse_dockerfile", "stages"]

#: name -> (Dockerfile, the edgeml extras its image installs)
DOCKERFILES = {
    "jetson": (REPO_ROOT / "Dockerfile.jetson", {"agent", "tensorrt", "delta"}),
    "raspberrypi": (REPO_ROOT / "deploy" / "raspberrypi" / "Dockerfile", {"agent", "litert", "delta"}),
}


@dataclass
class Stage:
    """One build stage: its base image and its instructions as (KEYWORD, arguments)."""

    image: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, with continuation lines joined and comments dropped."""
    logical, current = [], ""
    for raw in text.splitlines():
        if raw.lstrip().startswith("#"):
            continue  # a comment, alone or inside a continued instruction
        if raw.rstrip().endswith("\\"):
            current += raw.rstrip()[:-1] + " "
            continue
        current += raw
        if current.strip():
            logical.append(current.strip())
        current = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            image = re.sub(r"\$\{(\w+)\}", lambda m: global_args.get(m.group(1), m.group(0)), args.split()[0])
            stages.append(Stage(image))
        elif not stages and keyword == "ARG":
            name, _, default = args.partition("=")
            global_args[name] = default
        elif stages:
            stages[-1].instructions.append((keyword, args))
    return global_args, stages


def stages(name: str) -> list[Stage]:
    """The stages of the Dockerfile ``name`` (a key of :data:`DOCKERFILES`)."""
    return parse_dockerfile(DOCKERFILES[name][0].read_text())[1]


