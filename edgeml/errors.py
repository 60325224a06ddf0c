"""The project's errors.

Every failure a user can cause or fix is an :class:`EdgeMLError`. Its message says what was wrong and,
where there is one, what to do (``hint``). The CLI prints it in one or two lines and exits non-zero; a
traceback means a bug in edgeml. Third-party exceptions (onnxruntime, onnx, TensorFlow, TensorRT, paho,
SQLAlchemy) are translated where edgeml calls them, with ``raise ... from exc``.

The tree::

    EdgeMLError
    ├── ConfigError                 a bad option, argument or setting
    │   ├── UnknownTargetError      a compile target that does not exist
    │   └── RolloutError            a rollout that names an unknown model/version or selects no device
    ├── MissingExtraError           an optional dependency is not installed (names the pip extra)
    ├── ModelError                  a model file cannot be read, checked or loaded
    ├── DataError                   calibration/validation/inference data does not fit the model
    ├── ConversionError             a converter (onnx2tf, TensorRT builder, ORT quantizer) failed
    ├── AccuracyGateError           a compiled target lost more accuracy than allowed (carries a diagnosis)
    ├── BundleError                 an artifact bundle is malformed or unsafe
    │   └── BundleIntegrityError    a file's hash or size differs from the manifest
    ├── RuntimeBackendError         an inference runtime failed to load or run a model
    ├── StorageError                an output cannot be written
    ├── RegistryError               the fleet registry cannot be opened or changed
    │   ├── MetadataError           signed metadata or a key is missing, unreadable or inconsistent
    │   └── TargetExistsError       a different file is already published under that name/version/target
    ├── UpdateVerificationError     a device refused an update that failed TUF verification (carries kind)
    ├── ProtocolError               an MQTT topic or message breaks the protocol (edgeml.protocol)
    ├── AuthError                   a fleet API request without a valid operator token, 401 (edgeml.fleet.web.auth)
    │   └── ForbiddenError          a token whose role is too low for the action, 403
    ├── NotFoundError               something asked for by name does not exist (HTTP 404)
    ├── ConflictError               a change that the current state refuses: exists already, changed meanwhile (409)
    ├── PreprocessError             a raw inference request does not fit the manifest's preprocessing
    ├── ModelNotFound / NotServing  a local inference request for another model / before any model serves
    └── ...                         a few more, each defined beside the code that raises it
"""

from __future__ import annotations

__all__ = [
    "AccuracyGateError",
    "BundleError",
    "BundleIntegrityError",
    "ConfigError",
    "ConflictError",
    "ConversionError",
    "DataError",
    "EdgeMLError",
    "MetadataError",
    "MissingExtraError",
    "ModelError",
    "NotFoundError",
    "RegistryError",
    "RuntimeBackendError",
    "StorageError",
    "TargetExistsError",
    "UnknownTargetError",
    "UpdateVerificationError",
]


class EdgeMLError(Exception):
    """Base of every error edgeml raises on purpose.

    Args:
        message: What went wrong, in one line.
        hint: What the user can do about it, in one line (optional).
    """

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class ConfigError(EdgeMLError):
    """A bad option, argument or setting."""


class UnknownTargetError(ConfigError):
    """A compile target name that edgeml does not know."""


class MissingExtraError(EdgeMLError):
    """An optional dependency is missing; the message names the extra that installs it."""

    def __init__(self, module: str, extra: str, *, also: str | None = None) -> None:
        fix = f"pip install 'edgeml[{extra}]'"
        if also:
            fix += f" && {also}"
        super().__init__(f"{module} is not installed; run: {fix}")
        self.module = module
        self.extra = extra


class ModelError(EdgeMLError):
    """A model file cannot be read, checked or loaded."""


class DataError(EdgeMLError):
    """Calibration, validation or inference data does not fit the model."""


class ConversionError(EdgeMLError):
    """A converter failed on the model."""


class AccuracyGateError(EdgeMLError):
    """A compiled target lost more accuracy than the budget allows.

    Attributes:
        target: The compile target that failed.
        diagnosis: The ranked list of diverging tensors and suggested remedies (may be None).
    """

    def __init__(self, message: str, *, target: str, diagnosis: object | None = None) -> None:
        super().__init__(message)
        self.target = target
        self.diagnosis = diagnosis


class BundleError(EdgeMLError):
    """An artifact bundle is malformed or unsafe to open."""


class BundleIntegrityError(BundleError):
    """A file in a bundle does not match the hash or size its manifest records."""


class RuntimeBackendError(EdgeMLError):
    """An inference runtime failed to load or run a model."""


class StorageError(EdgeMLError):
    """An output file or directory cannot be written."""


class RegistryError(EdgeMLError):
    """The fleet registry cannot be opened or changed (not a registry, locked, database failure)."""


class MetadataError(RegistryError):
    """The registry's signed metadata or one of its keys is missing, unreadable or inconsistent."""


class TargetExistsError(RegistryError):
    """A different file is already published under the same name, version and target."""


class NotFoundError(EdgeMLError):
    """Something asked for by name (a rollout, a device) does not exist; the fleet's HTTP API answers 404."""


class ConflictError(EdgeMLError):
    """A change that the current state refuses (it exists already, it changed meanwhile, it is finished); 409."""


class UpdateVerificationError(EdgeMLError):
    """A device refused an update because TUF verification failed; nothing was installed.

    Attributes:
        kind: The attack or failure recognised: ``"rollback"``, ``"freeze"``, ``"mix-and-match"``,
            ``"arbitrary-file"``, ``"endless-data"``, ``"bad-signature"``, ``"manifest-mismatch"``,
            ``"not-found"``, ``"unavailable"`` or ``"invalid-metadata"``.
    """

    def __init__(self, message: str, *, kind: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.kind = kind
