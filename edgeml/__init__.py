"""edgeml: from a trained model to a healthy fleet of edge devices.

The shared core lives here (errors, the bundle format, reference statistics, atomic file writes, the CLI
root). The packages ``edgeml.train``, ``edgeml.compile``, ``edgeml.edge_agent`` and ``edgeml.fleet`` are
installed from the repository's top-level folders of the same names.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
