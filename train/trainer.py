"""The training loop: seeded, checkpointed after every epoch, resumable bit for bit, DDP-aware.

Data order comes from a :class:`torch.utils.data.DistributedSampler` seeded with ``train.seed`` and set to
the epoch, so it depends on nothing but (seed, epoch, rank, world size). A checkpoint holds the model,
optimiser and schedule states, the torch/numpy/python RNG states and the metric history, so a run resumed
from the checkpoint of epoch *k* computes exactly what the uninterrupted run computed after epoch *k*.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the model is wrapped in DistributedDataParallel (gloo on CPU,
nccl on GPU); every rank trains on its shard of each epoch, rank 0 alone evaluates and writes.
"""

from __future__ import annotations

import io
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeml._deps import require
from edgeml.errors import ConfigError, ModelError
from edgeml.fsutil import atomic_write_bytes
from edgeml.train.config import TrainingConfig

__all__ = ["Dist", "Trainer", "build_model", "init_distributed", "latest_checkpoint"]

STALL_ENV = "EDGEML_TRAIN_STALL"  # "EPOCH:BATCH": rank 0 stops (sleeps) there; used by the crash tests
_EVAL_BATCH = 512


@dataclass(frozen=True)
class Dist:
    """This process's place in a distributed run (world 1 when not distributed)."""

    rank: int = 0
    world: int = 1
    device: str = "cpu"

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """Join the process group torchrun set up (``WORLD_SIZE`` > 1), or return a single-process Dist."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    torch = require("torch", "train")
    dist = require("torch.distributed", "train")
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), device=f"cuda:{local}" if cuda else "cpu")


def build_model(cfg: TrainingConfig, input_shape: tuple[int, ...], num_classes: int) -> Any:
    """Instantiate ``model.arch`` for inputs of ``input_shape`` (no batch axis).

    Raises:
        ConfigError: A factory that cannot be imported or does not return a torch module.
    """
    import importlib

    from edgeml.train import models

    torch = require("torch", "train")
    m = cfg.model
    if m.arch == "small_cnn":
        model = models.small_cnn(in_channels=input_shape[0], num_classes=num_classes, width=m.width)
    elif m.arch == "mobilenet_v2":
        model = models.mobilenet_v2(num_classes=num_classes, width_mult=m.width_mult, in_channels=input_shape[0])
    elif m.arch == "mlp":
        model = models.mlp(in_features=int(np.prod(input_shape)), num_classes=num_classes, hidden=m.hidden)
        if len(input_shape) > 1:  # images (C, H, W): flattened first; tabular rows keep their layout and keys
            model = torch.nn.Sequential(torch.nn.Flatten(), model)
    else:
        module_name, _, attr = m.arch.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"model.arch: cannot import {m.arch!r}: {exc}") from exc
        model = factory(**{"num_classes": num_classes, **m.kwargs})
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"model.arch {m.arch} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint of the last completed epoch, or None."""
    found = sorted((run_dir / "checkpoints").glob("epoch-*.pt"))
    return found[-1] if found else None


def _rng_state() -> dict[str, Any]:
    torch = require("torch", "train")
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    keys = np.asarray(keys)
    return {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                       int(has_gauss), float(gauss)], "python": random.getstate()}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch = require("torch", "train")
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_py = state["python"]
    random.setstate((version, tuple(internal), gauss_py))


def _stall_point() -> tuple[int, int] | None:
    raw = os.environ.get(STALL_ENV)
    if not raw:
        return None
    epoch, _, batch = raw.partition(":")
    return int(epoch), int(batch)


@dataclass
class Trainer:
    """Trains one model on the train split and evaluates it on the validation split after every epoch.

    Attributes:
        cfg: The configuration.
        x_train, y_train, x_val, y_val: The splits, as numpy arrays.
        num_classes: Output size.
        run_dir: Where checkpoints go (rank 0 writes).
        dist: This process's rank and world size.
        log: Receives one line per epoch (rank 0).
    """

    cfg: TrainingConfig
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    num_classes: int
    run_dir: Path
    dist: Dist = field(default_factory=Dist)
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)
    history: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        torch = self.torch = require("torch", "train")
        t = self.cfg.train
        if t.threads:
            torch.set_num_threads(t.threads)
        torch.use_deterministic_algorithms(True, warn_only=True)
        random.seed(t.seed)
        np.random.seed(t.seed)
        torch.manual_seed(t.seed)
        self.model = build_model(self.cfg, tuple(self.x_train.shape[1:]), self.num_classes).to(self.dist.device)
        self.batch = max(1, t.batch_size // self.dist.world)
        self.sampler = torch.utils.data.DistributedSampler(range(len(self.x_train)), num_replicas=self.dist.world,
                                                           rank=self.dist.rank, shuffle=True, seed=t.seed)
        steps = -(-len(self.sampler) // self.batch) * t.epochs
        self.opt = torch.optim.Adam(self.model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=max(1, steps))
        self.net = self.model
        if self.dist.world > 1:
            ddp = torch.nn.parallel.DistributedDataParallel
            self.net = ddp(self.model, device_ids=None if self.dist.device == "cpu" else [self.dist.device])
        self.start_epoch = 0

    def resume(self, checkpoint: Path) -> None:
        """Restore everything from a checkpoint; training continues with the next epoch.

        Raises:
            ModelError: The checkpoint cannot be read or does not fit the model.
        """
        try:
            state = self.torch.load(checkpoint, map_location="cpu", weights_only=True)
            self.model.load_state_dict(state["model"])
            self.opt.load_state_dict(state["optimizer"])
            self.sched.load_state_dict(state["scheduler"])
        except Exception as exc:
            raise ModelError(f"cannot resume from {checkpoint}: {exc}") from exc
        _set_rng_state(state["rng"])
        self.start_epoch = int(state["epoch"])
        self.history = list(state["history"])

    def _checkpoint(self, epoch: int) -> None:
        state = {"epoch": epoch, "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                 "scheduler": self.sched.state_dict(), "rng": _rng_state(), "history": self.history,
                 "sampler_epoch": epoch - 1}
        buf = io.BytesIO()
        self.torch.save(state, buf)
        (self.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.run_dir / "checkpoints" / f"epoch-{epoch:04d}.pt", buf.getvalue())

    def _train_epoch(self, epoch: int) -> tuple[float, float]:
        torch, f = self.torch, self.torch.nn.functional
        self.sampler.set_epoch(epoch)
        order = torch.tensor(list(self.sampler), dtype=torch.int64)
        xt, yt = torch.from_numpy(self.x_train), torch.from_numpy(self.y_train)
        stall = _stall_point() if self.dist.main else None
        self.net.train()
        total, correct, seen = 0.0, 0, 0
        for b, idx in enumerate(order.split(self.batch), start=1):
            x, y = xt[idx].to(self.dist.device), yt[idx].to(self.dist.device)
            self.opt.zero_grad()
            out = self.net(x)
            loss = f.cross_entropy(out, y)
            loss.backward()
            self.opt.step()
            self.sched.step()
            total += float(loss.detach()) * len(idx)
            correct += int((out.argmax(1) == y).sum())
            seen += len(idx)
            if stall == (epoch + 1, b):
                self.log(f"stalled at epoch {epoch + 1} batch {b} ({STALL_ENV})")
                while True:
                    time.sleep(60)
        return total / max(seen, 1), correct / max(seen, 1)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """The model's outputs on ``x`` (eval mode, batched)."""
        self.model.eval()
        outs = []
        with self.torch.no_grad():
            for start in range(0, len(x), _EVAL_BATCH):
                chunk = self.torch.from_numpy(x[start:start + _EVAL_BATCH]).to(self.dist.device)
                outs.append(self.model(chunk).float().cpu().numpy())
        return np.concatenate(outs) if outs else np.zeros((0, self.num_classes), np.float32)

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
        """Loss and accuracy on (x, y)."""
        logits = self.logits(x)
        lt = self.torch.from_numpy(logits)
        loss = float(self.torch.nn.functional.cross_entropy(lt, self.torch.from_numpy(y))) if len(y) else 0.0
        return {"loss": loss, "accuracy": float((logits.argmax(1) == y).mean()) if len(y) else 0.0}

    def fit(self, on_epoch: Callable[[list[dict[str, Any]]], None] | None = None) -> list[dict[str, Any]]:
        """Train the remaining epochs; returns the metric history (one dict per epoch)."""
        epochs = self.cfg.train.epochs
        for epoch in range(self.start_epoch, epochs):
            t0 = time.perf_counter()
            train_loss, train_acc = self._train_epoch(epoch)
            if not self.dist.main:
                continue
            val = self.evaluate(self.x_val, self.y_val)
            row = {"epoch": epoch + 1, "train_loss": train_loss, "train_accuracy": train_acc,
                   "val_loss": val["loss"], "val_accuracy": val["accuracy"], "lr": self.opt.param_groups[0]["lr"],
                   "seconds": round(time.perf_counter() - t0, 3)}
            self.history.append(row)
            self._checkpoint(epoch + 1)
            if on_epoch:
                on_epoch(self.history)
            self.log(f"epoch {epoch + 1:>3}/{epochs}  loss {train_loss:.4f}  train acc {100 * train_acc:6.2f}%  "
                     f"val loss {val['loss']:.4f}  val acc {100 * val['accuracy']:6.2f}%  {row['seconds']:.1f}s")
        return self.history
