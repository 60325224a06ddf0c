"""What this device can run, detected: runtimes and their versions, CPU architecture, GPU and Jetson facts.

:func:`detect` fills the core's :class:`~edgeml.capabilities.Capabilities` (the contract the fleet plans by),
which the agent reports in its retained state message and checks every update against.
"""

from __future__ import annotations

import platform
import sys

from edgeml.capabilities import Capabilities, version_at_least
from edgeml.edge_agent.runtimes.base import RUNTIMES, runtime_for
from edgeml.errors import EdgeMLError

__all__ = ["Capabilities", "detect", "version_at_least"]  # the first and last re-exported from the core


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
    from edgeml import delta
    from edgeml.tensorrt import device_facts

    facts = device_facts(probe_cuda=probe_cuda)
    return Capabilities(runtimes=versions, arch=platform.machine(), compute_capability=facts.compute_capability,
                        l4t=facts.l4t_version, providers=_onnxruntime_providers(),
                        deltas=[delta.FORMAT] if delta.supported() else [])
