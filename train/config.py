"""The training configuration: one TOML (or YAML) file, validated once, hashed into the run id.

Every section is a frozen dataclass with commented defaults. An unknown key is a
:class:`~edgeml.errors.ConfigError` that names the key and suggests the closest valid one.

Example (TOML)::

    [model]
    name = "digits"            # bundle name used by `edgeml compile RUN_DIR`
    version = "1.0.0"          # optional; default 0.0.0-r<run id>
    arch = "small_cnn"         # small_cnn | mobilenet_v2 | mlp | package.module:factory

    [data]
    source = "digits"          # digits | a folder of images | a .npz file | a .csv file
    # extra = ["field/capture-1"]   # more data merged with the source (e.g. labeled capture datasets)

    [train]
    epochs = 20
    # init_from = "runs/digits-0123456789ab"   # fine-tune from a finished run (same architecture)
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeml.errors import ConfigError, MissingExtraError
from edgeml.typed_config import convert

__all__ = ["DataConfig", "ExportConfig", "ModelConfig", "TrainConfig", "TrainingConfig",
           "ValidationConfig", "config_from_dict", "load_config"]

BUILTIN_ARCHS = ("small_cnn", "mobilenet_v2", "mlp")


@dataclass(frozen=True)
class ModelConfig:
    """What to train and how the result is named."""

    name: str = "model"  # bundle name (lowercase letters, digits, '.', '_', '-')
    version: str | None = None  # semantic version; None: 0.0.0-r<run id>
    arch: str = "small_cnn"  # small_cnn | mobilenet_v2 | mlp | package.module:factory
    width: int = 16  # small_cnn: channels of the first conv
    width_mult: float = 1.0  # mobilenet_v2: width multiplier
    hidden: tuple[int, ...] = (64, 32)  # mlp: hidden layer sizes
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments for a custom factory


@dataclass(frozen=True)
class DataConfig:
    """Where the data comes from and how it is split."""

    source: str = "digits"  # digits | image folder | .npz | .csv; relative paths are relative to the config
    kind: str = "auto"  # auto | digits | images | npz | csv
    train: str | None = None  # explicit split paths (same kind as source); then source is unused
    val: str | None = None
    test: str | None = None
    label_column: str = "label"  # csv: the label column
    slice_column: str | None = None  # csv: a column of slice names for per-slice metrics
    num_classes: int | None = None  # default: number of class folders / max label + 1
    image_size: tuple[int, int] | None = None  # images: resize to (height, width); digits: upsample
    channels: int = 1  # images and digits: 1 (grayscale) or 3 (RGB)
    val_fraction: float = 0.15  # random splits: fraction of samples for validation
    test_fraction: float = 0.15  # random splits: fraction for the test split
    split_seed: int = 0  # seed of the random split (recorded in the data manifest)
    extra: tuple[str, ...] = ()  # more data merged with the source: .npz, .csv, image folders, or labeled
    #                              capture datasets (a folder holding train.npz); each is split with the
    #                              fractions above, its hash enters the run id, the card has its metrics


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation."""

    epochs: int = 20
    batch_size: int = 64  # global batch; divided among processes under DDP
    lr: float = 1e-2  # peak learning rate of Adam, annealed to 0 by a cosine schedule over all steps
    weight_decay: float = 0.0
    seed: int = 0  # model init, data order, dropout
    threads: int | None = None  # torch intra-op threads; None: torch's default
    init_from: str | None = None  # fine-tune: start from this finished run's weights (same architecture)


@dataclass(frozen=True)
class ValidationConfig:
    """Thresholds of the data checks run before training."""

    min_class_samples: int = 5  # fewer samples in a class: warning (zero: fatal)
    max_imbalance: float = 10.0  # largest / smallest class count above this: warning
    max_abs_value: float = 1e4  # a feature beyond this magnitude: warning (unnormalised data)
    allow_split_overlap: bool = False  # identical samples in two splits (leakage) is fatal unless True


@dataclass(frozen=True)
class ExportConfig:
    """ONNX export."""

    opset: int = 17
    parity_atol: float = 1e-3  # torch vs onnxruntime max abs difference allowed, scaled by output magnitude


@dataclass(frozen=True)
class TrainingConfig:
    """The whole configuration of one training run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    base_dir: str = field(default=".", compare=False)  # where relative data paths are resolved

    def to_dict(self) -> dict[str, Any]:
        """Plain data (without ``base_dir``), as written to the run directory.

        Settings added after runs existed (``data.extra``, ``train.init_from``) appear only when set, so a run
        that uses neither keeps the config hash, and the run id, it had before they existed.
        """
        out = dataclasses.asdict(self)
        out.pop("base_dir")
        for section, key, default in _LATER_KEYS:
            if out[section][key] == default:
                del out[section][key]
            elif isinstance(out[section][key], tuple):
                out[section][key] = list(out[section][key])
        return out

    def digest(self) -> str:
        """sha256 of the canonical JSON of the resolved configuration (defaults included)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def resolve(self, path: str) -> Path:
        """A data path from the config, relative to the config file's folder."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else Path(self.base_dir) / p


_LATER_KEYS: tuple[tuple[str, str, Any], ...] = (("data", "extra", ()), ("train", "init_from", None))

_SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig,
                              "validation": ValidationConfig, "export": ExportConfig}


def _unknown(key: str, valid: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(sorted(valid))}"
    return ConfigError(f"unknown key {key!r} in {where}", hint=hint)


def _coerce(cls: type, section: str, values: dict[str, Any]) -> Any:
    """One section, every value checked against its field's type (``lr = "fast"``, ``seed = 1.5`` refused)."""
    return convert(cls, values, where=f"[{section}]")


def _check(cfg: TrainingConfig) -> TrainingConfig:
    t, d = cfg.train, cfg.data
    for name, value in (("train.epochs", t.epochs), ("train.batch_size", t.batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, not {value!r}")
    if not 0 <= d.val_fraction < 1 or not 0 <= d.test_fraction < 1 or d.val_fraction + d.test_fraction >= 1:
        raise ConfigError("data.val_fraction and data.test_fraction must be in [0, 1) and sum below 1")
    if d.kind not in ("auto", "digits", "images", "npz", "csv"):
        raise ConfigError(f"data.kind {d.kind!r} is not auto, digits, images, npz or csv")
    if d.channels not in (1, 3):
        raise ConfigError(f"data.channels must be 1 or 3, not {d.channels}")
    if d.image_size is not None and (len(d.image_size) != 2 or min(d.image_size) < 1):
        raise ConfigError(f"data.image_size must be [height, width], not {list(d.image_size)}")
    arch = cfg.model.arch
    if arch not in BUILTIN_ARCHS and ":" not in arch:
        raise ConfigError(f"model.arch {arch!r} is not one of {', '.join(BUILTIN_ARCHS)} or package.module:factory")
    if (d.val is None) != (d.train is None):
        raise ConfigError("data.train and data.val are given together (explicit splits) or not at all")
    return cfg


def config_from_dict(raw: dict[str, Any], base_dir: str | Path = ".") -> TrainingConfig:
    """Validate a parsed configuration.

    Raises:
        ConfigError: An unknown section or key (named, with the closest valid one), or a bad value.
    """
    sections: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in _SECTIONS:
            raise _unknown(key, list(_SECTIONS), "the configuration")
        if not isinstance(value, dict):
            raise ConfigError(f"[{key}] must be a table of settings, not {type(value).__name__}")
        sections[key] = _coerce(_SECTIONS[key], key, value)
    return _check(TrainingConfig(**sections, base_dir=str(base_dir)))


def _parse(path: Path) -> dict[str, Any]:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as exc:
            raise MissingExtraError("pyyaml", "train", also="pip install pyyaml (or write the config as TOML)") \
                from exc
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    else:
        try:
            import tomllib
        except ImportError:  # Python 3.10
            import tomli as tomllib
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections")
    return data


def load_config(path: str | Path) -> TrainingConfig:
    """Read and validate a TOML (``.toml``) or YAML (``.yaml``/``.yml``, needs PyYAML) configuration.

    Raises:
        ConfigError: The file is missing, unparsable, or has an unknown key or bad value.
        MissingExtraError: A YAML file without PyYAML installed.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        return config_from_dict(_parse(p), base_dir=p.resolve().parent)
    except ConfigError as exc:  # name the file: the key and the expected type are in the message
        raise ConfigError(f"{p}: {exc.message}", hint=exc.hint) from None
