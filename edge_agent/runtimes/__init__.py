"""Inference runtimes behind one contract (load / infer / unload), see :mod:`.base`.

The compiler's accuracy gate runs compiled models through these same classes, so what is measured at
build time is what the device runs.
"""

from edgeml.edge_agent.runtimes.base import Runtime, open_runtime, runtime_for

__all__ = ["Runtime", "open_runtime", "runtime_for"]
