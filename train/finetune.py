"""Fine-tuning: start a run from the weights of an earlier, finished run (``train.init_from``).

The earlier run must have the same architecture: the same ``[model]`` settings that shape the network
(``arch``, ``width``, ``width_mult``, ``hidden``, ``kwargs``), and a state dict whose every tensor has the
shape the new model expects (the number of classes included). Anything else is a
:class:`~edgeml.errors.ConfigError` that names what differs, before any training starts.

The weights' sha256 enters the run id (with the config hash), so fine-tuning from different weights gives a
different run.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeml.errors import ConfigError
from edgeml.rundir import read_run_record
from edgeml.train.config import TrainingConfig

__all__ = ["ARCH_KEYS", "InitSource", "check_fits", "check_weights", "init_source", "load_init_weights"]

#: The ``[model]`` settings that shape the network; a fine-tuned run must match its init run on all of them.
ARCH_KEYS = ("arch", "width", "width_mult", "hidden", "kwargs")


@dataclass(frozen=True)
class InitSource:
    """The finished run a fine-tune starts from.

    Attributes:
        run_dir: Its run directory.
        run_id: Its run id.
        weights: Its final state dict file (``model.pt``).
        sha256: The state dict file's sha256.
    """

    run_dir: Path
    run_id: str
    weights: Path
    sha256: str

    def to_dict(self) -> dict[str, str]:
        return {"run_dir": str(self.run_dir), "run_id": self.run_id, "weights_sha256": self.sha256}


def _norm(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def init_source(cfg: TrainingConfig) -> InitSource | None:
    """The run named by ``train.init_from`` (None when not set), checked against ``cfg``'s architecture.

    Raises:
        ConfigError: Not a finished run directory, or its ``[model]`` architecture differs from ``cfg``'s.
    """
    if cfg.train.init_from is None:
        return None
    run_dir = cfg.resolve(cfg.train.init_from)
    record = read_run_record(run_dir)
    weights = run_dir / "model.pt"
    if record.get("status") != "complete" or not weights.is_file():
        raise ConfigError(f"train.init_from: run {run_dir} has not finished (status {record.get('status')!r}, "
                          f"no model.pt)", hint=f"finish it first: edgeml train --resume {run_dir}")
    import json

    try:
        theirs = json.loads((run_dir / "config.json").read_text()).get("model", {})
    except (OSError, ValueError) as exc:
        raise ConfigError(f"train.init_from: cannot read {run_dir / 'config.json'}: {exc}") from exc
    ours = cfg.to_dict()["model"]
    differ = [f"{k}: run {_norm(theirs.get(k))!r}, config {_norm(ours.get(k))!r}" for k in ARCH_KEYS
              if _norm(theirs.get(k)) != _norm(ours.get(k))]
    if differ:
        raise ConfigError(f"train.init_from: run {record['run_id']} has another architecture ({'; '.join(differ)})",
                          hint="fine-tune with the [model] settings of that run, or train from scratch "
                               "without init_from")
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    return InitSource(run_dir, str(record["run_id"]), weights, sha)


def check_weights(expected: dict[str, Any], given: dict[str, Any], run_id: str) -> None:
    """Refuse a state dict whose tensor names or shapes differ from the model's.

    Raises:
        ConfigError: Naming the missing, unexpected and mis-shaped tensors (a different number of classes
            shows as the last layer's shape).
    """
    missing = sorted(set(expected) - set(given))
    extra = sorted(set(given) - set(expected))
    shapes = [f"{k} (run {list(given[k].shape)}, model {list(expected[k].shape)})" for k in expected
              if k in given and tuple(given[k].shape) != tuple(expected[k].shape)]
    problems = ([f"missing {', '.join(missing[:5])}"] if missing else []) + \
        ([f"unexpected {', '.join(extra[:5])}"] if extra else []) + \
        ([f"shape of {', '.join(shapes[:5])}"] if shapes else [])
    if problems:
        raise ConfigError(f"train.init_from: the weights of run {run_id} do not fit this model: "
                          f"{'; '.join(problems)}", hint="the architecture and the number of classes must match "
                          "the run's; check [model] and data.num_classes")


def _state(init: InitSource) -> Any:
    import torch

    try:
        return torch.load(init.weights, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"train.init_from: cannot read {init.weights}: {exc}") from exc


def check_fits(init: InitSource, cfg: TrainingConfig, input_shape: tuple[int, ...], num_classes: int) -> None:
    """Refuse, before anything is written, init weights that do not fit the model ``cfg`` builds.

    Raises:
        ConfigError: See :func:`check_weights`.
    """
    from edgeml.train.trainer import build_model

    check_weights(build_model(cfg, input_shape, num_classes).state_dict(), _state(init), init.run_id)


def load_init_weights(model: Any, init: InitSource) -> None:
    """Load the init run's weights into ``model``.

    Raises:
        ConfigError: The weights do not fit the model, or cannot be read.
    """
    state = _state(init)
    own = model.state_dict()
    check_weights(own, state, init.run_id)
    model.load_state_dict({k: v.to(own[k].device) for k, v in state.items()})
