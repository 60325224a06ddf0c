"""What this device can run: runtimes and their versions, CPU architecture, GPU and Jetson facts.

The agent reports :class:`Capabilities` in its retained state message so that the fleet sends each device
a target it can run, and checks every update's runtime requirements against them before downloading
(:meth:`Capabilities.incompatibility`): a device that cannot run a target says "incompatible" instead of
failing later.
"""

from __future__ import annotations

import platform
import re
import sys
from dataclasses import dataclass, field
from typing import Any

from edgeml.edge_agent.runtimes.base import RUNTIMES, runtime_for
from edgeml.errors import EdgeMLError

__all__ = ["Capabilities", "detect", "version_at_least"]


def version_at_least(version: str, minimum: str) -> bool:
    """Whether dotted ``version`` >= ``minimum``, comparing the leading numbers (``"1.32.0" >= "1.17"``)."""

    def numbers(text: str) -> tuple[int, ...]:
        return tuple(int(n) for n in re.findall(r"\d+", text.split("+")[0])[:4])

    return numbers(version) >= numbers(minimum)


@dataclass(frozen=True)
class Capabilities:
    """This device's facts.

    Attributes:
        runtimes: Installed runtime name -> version (``onnxruntime``, ``litert``, ``tensorrt``).
        arch: CPU architecture, e.g. ``aarch64``.
        compute_capability: The GPU's compute capability (e.g. ``"8.7"``), None without one.
        l4t: The Jetson L4T release (e.g. ``"36.3.0"``), None elsewhere.
        providers: onnxruntime's execution providers on this device.
    """

    runtimes: dict[str, str]
    arch: str
    compute_capability: str | None = None
    l4t: str | None = None
    providers: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form carried in the state message."""
        return {"runtimes": dict(self.runtimes), "arch": self.arch, "compute_capability": self.compute_capability,
                "l4t": self.l4t, "providers": list(self.providers)}

    def incompatibility(self, runtime: dict[str, Any]) -> str | None:
        """Why a bundle's ``runtime`` requirement cannot run here, or None when it can.

        Args:
            runtime: The manifest's ``runtime`` field (``name``, ``min_version``, ``precision``).
        """
        name = runtime.get("name")
        if name not in RUNTIMES:
            return f"unknown runtime {name!r}"
        installed = self.runtimes.get(str(name))
        if installed is None:
            return f"{name} is not installed on this device"
        minimum = runtime.get("min_version")
        if name == "litert" and installed.startswith("ai-edge-litert"):
            minimum = None  # LiteRT's own releases succeed tflite-runtime, whose numbering min_version uses
        if minimum and not version_at_least(installed, str(minimum)):
            return f"{name} {installed} is older than the required {minimum}"
        if name == "tensorrt" and self.compute_capability is None:
            return "TensorRT needs an NVIDIA GPU, and none was found"
        return None


def _onnxruntime_providers() -> list[str]:
    """onnxruntime's execution providers, once onnxruntime is loaded (detecting them must not load it: a
    device serving a LiteRT model should not pay onnxruntime's memory)."""
    onnxruntime = sys.modules.get("onnxruntime")
    return list(onnxruntime.get_available_providers()) if onnxruntime is not None else []


def detect(probe_cuda: bool = False) -> Capabilities:
    """Find this device's capabilities (runtime versions are read from package metadata where it exists).

    Args:
        probe_cuda: Ask the CUDA runtime for the compute capability (initialises CUDA); otherwise the
            Jetson device tree is read.
    """
    versions: dict[str, str] = {}
    for name in RUNTIMES:
        try:
            version = runtime_for(name).version()
        except EdgeMLError:
            version = None
        if version:
            versions[name] = version
    from edgeml.tensorrt import device_facts

    facts = device_facts(probe_cuda=probe_cuda)
    return Capabilities(runtimes=versions, arch=platform.machine(), compute_capability=facts.compute_capability,
                        l4t=facts.l4t_version, providers=_onnxruntime_providers())
