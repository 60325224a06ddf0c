"""The built-in ``digits`` data (scikit-learn's bundled 8x8 digits, offline) and a short training loop.

Used by the demo, the compile benchmark and tests; the full trainer builds on the same pieces.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgeml._deps import require

__all__ = ["digits_arrays", "export_onnx", "fit"]


def digits_arrays(size: int = 8, channels: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """Train/val/test splits of the digits, NCHW float32 scaled to [0, 1], optionally upsampled.

    Returns:
        Keys ``x_train, y_train, x_val, y_val, x_test, y_test``; deterministic for a seed.
    """
    datasets = require("sklearn.datasets", "train")
    data = datasets.load_digits()
    x = (data.images.astype(np.float32) / 16.0)[:, None]
    if size != 8:
        idx = (np.arange(size) * 8 // size).astype(np.int64)
        x = x[:, :, idx][:, :, :, idx]
    if channels != 1:
        x = np.repeat(x, channels, axis=1)
    y = data.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = np.ascontiguousarray(x[order]), y[order]
    n_val = n_test = len(x) // 6
    n_train = len(x) - n_val - n_test
    return {"x_train": x[:n_train], "y_train": y[:n_train], "x_val": x[n_train:n_train + n_val],
            "y_val": y[n_train:n_train + n_val], "x_test": x[n_train + n_val:], "y_test": y[n_train + n_val:]}


def fit(model: Any, x: np.ndarray, y: np.ndarray, *, epochs: int = 10, lr: float = 3e-3, batch: int = 64,
        seed: int = 0) -> Any:
    """Train ``model`` from scratch with Adam and cross-entropy; returns it in eval mode.

    Its weights are drawn again from ``seed`` first (every layer's ``reset_parameters``), so that the same call
    gives the same model: the weights it was built with came from the global random state.
    """
    torch = require("torch", "train")
    torch.manual_seed(seed)
    for module in model.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=gen).split(batch):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
    return model.eval()


def export_onnx(model: Any, example: np.ndarray, path: str, opset: int = 17) -> str:
    """Export with a dynamic batch axis (input ``input``, output ``output``)."""
    import warnings

    torch = require("torch", "train")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.from_numpy(example[:1]),), path, dynamo=False,
                          input_names=["input"], output_names=["output"], opset_version=opset,
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    return path
