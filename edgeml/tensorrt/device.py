"""What an engine depends on, as found on this machine: TensorRT version, GPU compute capability, L4T release.

An engine only loads on the GPU, TensorRT and JetPack/L4T release it was built for, so these facts go into
its cache key (:func:`edgeml.tensorrt.cache.engine_cache_key`). Each is None where it cannot be found; nothing
here needs TensorRT or cuda-python installed (both are tried, lazily).

Map::

    DeviceFacts                            the three facts
    device_facts()                         find them: L4T release file, CUDA (or the Jetson device tree)
    parse_l4t_release()                    /etc/nv_tegra_release -> "36.3.0"
    compute_capability_from_device_tree()  /proc/device-tree/compatible -> "8.7"
    tensorrt_version()                     tensorrt.__version__, or None
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from edgeml.errors import EdgeMLError
from edgeml.tensorrt.libs import cuda_ok, require_cudart

__all__ = ["DeviceFacts", "compute_capability_from_device_tree", "device_facts", "parse_l4t_release",
           "tensorrt_version"]

_L4T_RELEASE = Path("/etc/nv_tegra_release")
_DEVICE_TREE_COMPATIBLE = Path("/proc/device-tree/compatible")
#: Jetson SoC (device-tree ``compatible``) -> GPU compute capability, for hosts without cuda-python.
_TEGRA_COMPUTE_CAPABILITY = {"tegra264": "11.0", "tegra234": "8.7", "tegra194": "7.2", "tegra186": "6.2",
                             "tegra210": "5.3"}


@dataclass(frozen=True)
class DeviceFacts:
    """What an engine depends on, as found on this machine (None where it cannot be found).

    Attributes:
        tensorrt_version: ``tensorrt.__version__``.
        compute_capability: The first GPU's, e.g. ``"8.7"``.
        l4t_version: The Jetson L4T release, e.g. ``"36.3.0"`` (JetPack 6.0).
    """

    tensorrt_version: str | None
    compute_capability: str | None
    l4t_version: str | None


def parse_l4t_release(text: str) -> str | None:
    """The L4T version in ``/etc/nv_tegra_release``'s first line, e.g. ``"# R36 (release), REVISION: 3.0,
    GCID: ..."`` -> ``"36.3.0"``; None when the text is not in that form."""
    match = re.search(r"^#\s*R(\d+)\s*\(release\),\s*REVISION:\s*(\d+(?:\.\d+)*)", text, re.MULTILINE)
    return f"{match.group(1)}.{match.group(2)}" if match else None


def compute_capability_from_device_tree(compatible: bytes) -> str | None:
    """The GPU compute capability of a Jetson from ``/proc/device-tree/compatible`` (NUL-separated
    strings such as ``nvidia,tegra234``); None when no known Tegra SoC is named."""
    for entry in compatible.split(b"\0"):
        vendor, _, soc = entry.decode("ascii", "replace").strip().partition(",")
        if vendor == "nvidia" and soc in _TEGRA_COMPUTE_CAPABILITY:
            return _TEGRA_COMPUTE_CAPABILITY[soc]
    return None


def _cuda_compute_capability() -> str | None:
    try:
        cudart = require_cudart()
        attr = cudart.cudaDeviceAttr
        major = cuda_ok(cudart, cudart.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMajor, 0),
                        "cudaDeviceGetAttribute")
        minor = cuda_ok(cudart, cudart.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMinor, 0),
                        "cudaDeviceGetAttribute")
    except (EdgeMLError, RuntimeError, OSError):  # no cuda-python, no driver or no GPU: not known here
        return None
    return f"{major}.{minor}"


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def tensorrt_version() -> str | None:
    """``tensorrt.__version__``, or None when TensorRT cannot be imported."""
    try:
        import tensorrt
    except (ImportError, OSError):
        return None
    return str(tensorrt.__version__)


def device_facts(*, release_file: Path = _L4T_RELEASE, compatible_file: Path = _DEVICE_TREE_COMPATIBLE,
                 probe_cuda: bool = True) -> DeviceFacts:
    """TensorRT version, GPU compute capability and L4T release of this machine.

    The compute capability comes from CUDA (cuda-python) when ``probe_cuda`` and it is installed, else from
    the Jetson device tree.

    Args:
        release_file: The L4T release file.
        compatible_file: The device tree's ``compatible`` list.
        probe_cuda: Ask the CUDA runtime (initialises CUDA; False for tests and CPU-only hosts).
    """
    release = _read(release_file)
    l4t = parse_l4t_release(release.decode("utf-8", "replace")) if release is not None else None
    capability = _cuda_compute_capability() if probe_cuda else None
    if capability is None:
        compatible = _read(compatible_file)
        capability = compute_capability_from_device_tree(compatible) if compatible is not None else None
    return DeviceFacts(tensorrt_version(), capability, l4t)
