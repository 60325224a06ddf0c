"""The backend contract: turn the checked FP32 ONNX into one target's files."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeml.errors import ConversionError, EdgeMLError
from edgeml.progress import Progress

if TYPE_CHECKING:
    from edgeml.compile.data import Dataset
    from edgeml.compile.options import CompileOptions
    from edgeml.compile.source import SourceModel
    from edgeml.compile.targets import Target

__all__ = ["Backend", "BuildContext", "BuildResult"]


@dataclass
class BuildContext:
    """What every backend gets.

    Attributes:
        source: The checked FP32 ONNX model.
        options: The run's options.
        calib: Calibration data (None when not given; INT8 backends then refuse).
        workdir: A private scratch directory, deleted after the run.
        progress: Where to report progress.
        shared: Results that backends of one run share (e.g. one onnx2tf conversion for two targets).
    """

    source: SourceModel
    options: CompileOptions
    calib: Dataset | None
    workdir: Path
    progress: Progress = field(default_factory=Progress)
    shared: dict[str, Any] = field(default_factory=dict)


@dataclass
class BuildResult:
    """What a backend produced.

    Attributes:
        files: Bundle member name -> file; includes ``model_file``.
        model_file: The member name of the model.
        model_format: ``onnx`` or ``tflite``.
        runtime: Manifest runtime block: name, min_version, precision, build (TensorRT).
        eval_path: The file the accuracy gate runs.
        eval_runtime: The runtime the gate uses.
        proxy: Set when the gate runs a stand-in (e.g. TensorRT's QDQ ONNX in onnxruntime).
        quantized_onnx: For ONNX-based INT8 targets, the QDQ model (used by the diagnosis).
        notes: Lines for the report.
    """

    files: dict[str, Path]
    model_file: str
    model_format: str
    runtime: dict[str, Any]
    eval_path: Path
    eval_runtime: str
    proxy: str | None = None
    quantized_onnx: Path | None = None
    notes: list[str] = field(default_factory=list)


class Backend(ABC):
    """Builds one target. ``build`` wraps ``_build_impl`` and turns foreign failures into ConversionError."""

    def __init__(self, target: Target) -> None:
        self.target = target

    def build(self, ctx: BuildContext) -> BuildResult:
        """Build the target in ``ctx.workdir``.

        Raises:
            ConversionError: The converter failed.
            DataError: Calibration data is missing or unusable.
        """
        try:
            return self._build_impl(ctx)
        except EdgeMLError:
            raise
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConversionError(f"{self.target.name}: conversion failed: {first}") from exc

    @abstractmethod
    def _build_impl(self, ctx: BuildContext) -> BuildResult: ...
