"""What a device can run, as the device reports it and as the fleet plans by it: one contract for both sides.

A device detects its :class:`Capabilities` (``edgeml.edge_agent.capabilities.detect``) and reports them in its
retained state message; the fleet picks each device a target it can run, and the device checks every update's
runtime requirement before downloading, both with :meth:`Capabilities.incompatibility`: a device that cannot
run a target says "incompatible" instead of failing later. Standard library only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["RUNTIME_NAMES", "Capabilities", "version_at_least"]

#: The runtimes a bundle can name (the agent's runtime registry, edgeml.edge_agent.runtimes.base.RUNTIMES).
RUNTIME_NAMES = ("onnxruntime", "litert", "tensorrt")


def _text(value: object) -> str | None:
    return None if value is None else str(value)


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
        deltas: The delta formats this device can apply (``["zstd"]`` with ``edgeml[delta]``; empty: full
            bundles only).
    """

    runtimes: dict[str, str]
    arch: str
    compute_capability: str | None = None
    l4t: str | None = None
    providers: list[str] = field(default_factory=list)
    deltas: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form carried in the state message."""
        return {"runtimes": dict(self.runtimes), "arch": self.arch, "compute_capability": self.compute_capability,
                "l4t": self.l4t, "providers": list(self.providers), "deltas": list(self.deltas)}

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> Capabilities:
        """What a device reported (:meth:`to_dict`'s form), leniently: unknown keys ignored, values as strings."""
        return cls(runtimes={str(k): str(v) for k, v in dict(doc.get("runtimes") or {}).items()},
                   arch=str(doc.get("arch") or ""), compute_capability=_text(doc.get("compute_capability")),
                   l4t=_text(doc.get("l4t")), providers=[str(p) for p in doc.get("providers") or []],
                   deltas=[str(d) for d in doc.get("deltas") or []])

    def incompatibility(self, runtime: dict[str, Any]) -> str | None:
        """Why a bundle's ``runtime`` requirement cannot run here, or None when it can.

        Args:
            runtime: The manifest's ``runtime`` field (``name``, ``min_version``, ``precision``).
        """
        name = runtime.get("name")
        if name not in RUNTIME_NAMES:
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
