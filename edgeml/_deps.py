"""Lazy imports of optional, heavy libraries.

``edgeml --help`` must stay instant and the agent's install must not pull torch or TensorFlow, so heavy
libraries are imported only inside the function that needs them, through :func:`require`, which turns
an ImportError into a one-line :class:`~edgeml.errors.MissingExtraError` naming the extra to install.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from edgeml.errors import MissingExtraError

__all__ = ["ONNX2TF_INSTALL", "require"]

#: onnx2tf's own pins downgrade numpy/onnx/TensorFlow, so it is installed beside the stack, without deps.
ONNX2TF_INSTALL = "pip install --no-deps onnx2tf==1.29.24"


def require(module: str, extra: str, *, also: str | None = None) -> ModuleType:
    """Import ``module`` or explain which extra installs it.

    Args:
        module: Dotted module name, e.g. ``"onnxruntime"``.
        extra: The edgeml extra that provides it, e.g. ``"ort"``.
        also: An extra install command to print after the pip extra (optional).

    Raises:
        MissingExtraError: The module (or one it needs) cannot be imported.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(module, extra, also=also) from exc
