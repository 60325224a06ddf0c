"""Optional MLflow tracking: parameters, per-epoch metrics and the run directory as artifacts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeml.errors import MissingExtraError

__all__ = ["MlflowTracker"]


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


class MlflowTracker:
    """Logs one training run to the MLflow tracking server at ``uri``.

    Raises:
        MissingExtraError: mlflow is not installed (checked at construction, before any training).
    """

    def __init__(self, uri: str) -> None:
        try:
            import mlflow
        except ImportError as exc:
            raise MissingExtraError("mlflow", "train", also="pip install mlflow") from exc
        self.mlflow = mlflow
        self.uri = uri
        self.logged = 0

    def start(self, run_name: str, params: dict[str, Any]) -> None:
        """Open an MLflow run and log the configuration as parameters."""
        self.mlflow.set_tracking_uri(self.uri)
        self.mlflow.start_run(run_name=run_name)
        self.mlflow.log_params(_flatten(params))

    def on_epoch(self, history: list[dict[str, Any]]) -> None:
        """Log the epochs not logged yet."""
        for row in history[self.logged:]:
            metrics = {k: float(v) for k, v in row.items() if k != "epoch"}
            self.mlflow.log_metrics(metrics, step=int(row["epoch"]))
        self.logged = len(history)

    def finish(self, run_dir: Path, final: dict[str, float]) -> None:
        """Log final metrics and the run directory's files (checkpoints excluded), and close the run."""
        self.mlflow.log_metrics(final)
        for path in sorted(run_dir.iterdir()):
            if path.is_file():
                self.mlflow.log_artifact(str(path))
        self.mlflow.end_run()
