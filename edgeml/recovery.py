"""The manifest's ``recovery`` block: what ``edgeml compile --recover`` did to make an INT8 target pass.

Written by the compiler (``edgeml.compile.recover``), read by ``edgeml inspect`` and anything that reads a
bundle; absent from bundles built without ``--recover`` or that passed as they were. A bundle is untrusted
input, so the block is checked field by field, and unknown fields are refused::

    recovery {
      "stage":        "calibration" | "rescale" | "mixed"     the stage whose candidate passed
      "metric":       the gate's metric; "plain_drop", "drop", "budget": numbers or null
      "calibration":  {"method": "minmax" | "entropy" | "percentile", "percentile": number | null}
      "rescaled":     [{"kind": "equalize" | "smooth", "layers": [node name], "channels": int}]
      "fp32_parity":  the rescaled FP32 model's largest error relative to an output's magnitude, or null
      "float_nodes":  [node name]          every node kept in float (the --exclude-node flags)
      "float_layers": [{"name", "op_type", "compute_share": 0..1}]   the compute layers among them
      "float_compute_share": 0..1, "names_assigned": int (nodes the compiler named: the graph had none)
      "candidates": int, "seconds": number, "budget_s": number       how long the search took
    }
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from edgeml.bundle_rules import check_text, shown
from edgeml.errors import BundleError

__all__ = ["RECOVERY_STAGES", "check_recovery", "describe_recovery"]

RECOVERY_STAGES = ("calibration", "rescale", "mixed")
_METHODS = ("minmax", "entropy", "percentile")
_KINDS = ("equalize", "smooth")
_MAX_ITEMS = 100_000
_MAX_NAME = 1024
_KEYS = {"stage", "metric", "plain_drop", "drop", "budget", "calibration", "rescaled", "fp32_parity",
         "float_nodes", "float_layers", "float_compute_share", "names_assigned", "candidates", "seconds",
         "budget_s"}


def _object(value: Any, field: str, keys: set[str], required: set[str]) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise BundleError(f"manifest field {field} must be a JSON object, got {shown(value)}")
    unknown = set(value) - keys
    missing = required - set(value)
    if unknown or missing:
        what = f"unknown key {shown(sorted(unknown)[0])}" if unknown else f"no {shown(sorted(missing)[0])}"
        raise BundleError(f"manifest field {field} has {what}")
    return value


def _number(value: Any, field: str, *, low: float = -math.inf, high: float = math.inf,
            optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not low <= value <= high:
        raise BundleError(f"manifest field {field} must be a number from {low:g} to {high:g}"
                          f"{' or null' if optional else ''}, got {shown(value)}")
    return float(value)


def _count(value: Any, field: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 2**31 - 1:
        raise BundleError(f"manifest field {field} must be a non-negative integer, got {shown(value)}")
    return value


def _choice(value: Any, field: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise BundleError(f"manifest field {field} must be one of {', '.join(choices)}, got {shown(value)}")
    return str(value)


def _names(value: Any, field: str) -> list[str]:
    if not isinstance(value, list) or len(value) > _MAX_ITEMS:
        raise BundleError(f"manifest field {field} must be a list of at most {_MAX_ITEMS} names")
    return [check_text(v, f"{field}[{i}]", limit=_MAX_NAME) for i, v in enumerate(value)]


def _list(value: Any, field: str) -> list[Any]:
    if not isinstance(value, list) or len(value) > _MAX_ITEMS:
        raise BundleError(f"manifest field {field} must be a list of at most {_MAX_ITEMS} entries")
    return value


def check_recovery(value: Any) -> dict[str, Any] | None:
    """The ``recovery`` block, checked (None when absent).

    Raises:
        BundleError: It is malformed: an unknown or missing key, a value of the wrong type or out of range.
    """
    if value is None:
        return None
    block = _object(value, "recovery", _KEYS, _KEYS)
    _choice(block["stage"], "recovery.stage", RECOVERY_STAGES)
    check_text(block["metric"], "recovery.metric", limit=_MAX_NAME)
    for key in ("plain_drop", "drop", "budget", "fp32_parity"):
        _number(block[key], f"recovery.{key}", optional=True)
    cal = _object(block["calibration"], "recovery.calibration", {"method", "percentile"}, {"method", "percentile"})
    _choice(cal["method"], "recovery.calibration.method", _METHODS)
    _number(cal["percentile"], "recovery.calibration.percentile", low=0, high=100, optional=True)
    for i, item in enumerate(_list(block["rescaled"], "recovery.rescaled")):
        field = f"recovery.rescaled[{i}]"
        keys = {"kind", "layers", "channels"}
        entry = _object(item, field, keys, keys)
        _choice(entry["kind"], f"{field}.kind", _KINDS)
        _names(entry["layers"], f"{field}.layers")
        _count(entry["channels"], f"{field}.channels")
    _names(block["float_nodes"], "recovery.float_nodes")
    for i, item in enumerate(_list(block["float_layers"], "recovery.float_layers")):
        field = f"recovery.float_layers[{i}]"
        keys = {"name", "op_type", "compute_share"}
        entry = _object(item, field, keys, keys)
        check_text(entry["name"], f"{field}.name", limit=_MAX_NAME)
        check_text(entry["op_type"], f"{field}.op_type", limit=_MAX_NAME)
        _number(entry["compute_share"], f"{field}.compute_share", low=0, high=1)
    _number(block["float_compute_share"], "recovery.float_compute_share", low=0, high=1)
    for key in ("names_assigned", "candidates"):
        _count(block[key], f"recovery.{key}")
    _number(block["seconds"], "recovery.seconds", low=0)
    _number(block["budget_s"], "recovery.budget_s", low=0)
    return dict(block)


def describe_recovery(block: Mapping[str, Any]) -> str:
    """One line for ``edgeml inspect`` and the compile table, e.g. ``mixed: 1 layer in float (12.5% of
    compute), minmax; drop 87.25 -> 0.40``."""
    cal = block["calibration"]
    parts = [f"{cal['method']} {cal['percentile']:g}" if cal.get("percentile") is not None else cal["method"]]
    if block["rescaled"]:
        kinds = sorted({r["kind"] for r in block["rescaled"]})
        parts.append(f"{'+'.join(kinds)} of {len(block['rescaled'])} activation(s)")
    layers = block["float_layers"]
    if block["float_nodes"]:
        parts.append(f"{len(layers)} layer(s) in float ({100 * block['float_compute_share']:.1f}% of compute)")
    else:
        parts.append("every layer INT8")
    drops = ""
    if block.get("plain_drop") is not None and block.get("drop") is not None:
        drops = f"; {block['metric']} drop {block['plain_drop']:.2f} -> {block['drop']:.2f}"
    return f"{block['stage']}: {', '.join(parts)}{drops}"
