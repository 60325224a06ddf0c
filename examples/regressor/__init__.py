"""A small regressor for ``edgeml compile``'s PyTorch-factory path: 8 sensor readings in, 2 values out.

    edgeml compile examples.regressor:make_net --input-shape 1,8 --checkpoint examples/regressor/net.pt ...

``net.pt`` holds weights trained by ``python -m examples.make`` on the function in :func:`targets`;
``calib.npz`` and ``val.npz`` are samples of the same readings (key ``input``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["make_net", "readings", "targets"]


def make_net() -> Any:
    """The regressor: 8 -> 32 -> 32 -> 2, ReLU (a ``torch.nn.Module``; its weights come from ``--checkpoint``)."""
    from torch import nn

    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))


def readings(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` samples of the 8 readings, uniform in [-1, 1), float32."""
    return rng.uniform(-1.0, 1.0, (n, 8)).astype(np.float32)


def targets(x: np.ndarray) -> np.ndarray:
    """What the regressor learns: two smooth functions of the readings."""
    return np.stack([np.sin(2 * x[:, 0]) + x[:, 1] * x[:, 2], x[:, 3] ** 2 - 0.5 * x[:, 4] + 0.25 * x[:, 5]],
                    axis=1).astype(np.float32)
