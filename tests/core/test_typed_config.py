"""Every settings file is read through one typed loader: a wrong-typed value is refused with its key, its file
and the expected type (agent.toml, the bootstrap file, the training config, stored rollout options)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any, Literal

import pytest

from edgeml.edge_agent.config import load_config as load_agent_config
from edgeml.errors import ConfigError
from edgeml.typed_config import check_value

AGENT_BASE = {"bootstrap": "boot.json", "state_dir": "state"}


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)


def _agent_file(tmp_path: Path, **values: Any) -> Path:
    (tmp_path / "boot.json").write_text(json.dumps({
        "device_id": "cam-1", "username": "cam-1", "password": "pw", "host": "localhost", "port": 8883,
        "ca_pem": None, "tuf_root_b64": base64.b64encode(b"{}").decode()}))
    lines = ["[agent]"] + [f"{k} = {_toml(v)}" for k, v in {**AGENT_BASE, **values}.items()]
    (tmp_path / "agent.toml").write_text("\n".join(lines) + "\n")
    return tmp_path / "agent.toml"


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("tls", "false", "must be true or false, got str 'false'"),
    ("api_port", "8471", "must be an integer, got str"),
    ("threads", 1.5, "must be an integer, got float"),
    ("telemetry_interval_s", True, "must be a number, got bool"),
    ("runtimes", "litert", "must be a list (each a string), got str"),
    ("runtimes", ["litert", 3], "must be a list (each a string)"),
    ("tlss", True, "unknown key 'tlss' in"),
])
def test_agent_toml_values_are_checked_against_their_types(tmp_path: Path, key: str, value: Any,
                                                          expected: str) -> None:
    path = _agent_file(tmp_path, **{key: value})
    with pytest.raises(ConfigError) as info:
        load_agent_config(path)
    assert str(path) in info.value.message and expected in info.value.message, info.value.message
    if key != "tlss":
        assert f"'{key}'" in info.value.message


def test_a_well_typed_agent_toml_loads(tmp_path: Path) -> None:
    config = load_agent_config(_agent_file(tmp_path, tls=False, telemetry_interval_s=5, runtimes=["litert"]))
    assert (config.tls, config.telemetry_interval_s, config.runtimes) == (False, 5.0, ("litert",))
    assert isinstance(config.telemetry_interval_s, float) and config.bootstrap.port == 8883


def test_the_bootstrap_file_is_checked_too(tmp_path: Path) -> None:
    path = _agent_file(tmp_path)
    doc = json.loads((tmp_path / "boot.json").read_text())
    (tmp_path / "boot.json").write_text(json.dumps({**doc, "port": "8883"}))
    with pytest.raises(ConfigError, match=r"boot.json.*'port' must be an integer, got str"):
        load_agent_config(path)


@pytest.mark.parametrize(("section", "key", "value", "expected"), [
    ("train", "lr", "fast", "'lr' must be a number, got str 'fast'"),
    ("train", "seed", 1.5, "'seed' must be an integer, got float"),
    ("train", "epochs", "20", "'epochs' must be an integer, got str"),
    ("data", "image_size", [28, "x"], "'image_size' must be a list (each an integer)"),
    ("validation", "allow_split_overlap", "yes", "'allow_split_overlap' must be true or false"),
    ("model", "kwargs", [1], "'kwargs' must be a table"),
])
def test_training_config_values_are_checked_against_their_types(tmp_path: Path, section: str, key: str, value: Any,
                                                                expected: str) -> None:
    pytest.importorskip("torch")
    from edgeml.train.config import load_config

    path = tmp_path / "train.toml"
    path.write_text(f"[{section}]\n{key} = {_toml(value)}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in info.value.message and f"[{section}]" in info.value.message
    assert expected in info.value.message, info.value.message


def test_stored_rollout_options_are_checked() -> None:
    pytest.importorskip("sqlalchemy")
    from edgeml.fleet.rollouts.options import RolloutError, RolloutOptions

    good = RolloutOptions(targets=("onnx",)).to_dict()
    assert RolloutOptions.from_dict(good) == RolloutOptions(targets=("onnx",))
    with pytest.raises(RolloutError, match="'canary' must be a number, got str"):
        RolloutOptions.from_dict({**good, "canary": "0.5"})
    with pytest.raises(RolloutError, match="'select' must be a table"):
        RolloutOptions.from_dict({**good, "select": ["site"]})


@pytest.mark.parametrize(("value", "tp", "want"), [
    (3, float, 3.0), ([1, 2], tuple[int, ...], (1, 2)), ("a", Literal["a", "b"], "a"), (None, int | None, None),
    ("p", Path, Path("p")), ({"x": 1}, dict[str, float], {"x": 1.0}),
])
def test_values_are_converted_to_their_annotation(value: Any, tp: Any, want: Any) -> None:
    assert check_value(value, tp) == want


@pytest.mark.parametrize(("value", "tp"), [(float("nan"), float), (True, int), (1, bool), ("c", Literal["a", "b"]),
                                           (1, Literal["1"]), ({1: 2}, dict[str, int])])
def test_values_of_the_wrong_type_are_refused(value: Any, tp: Any) -> None:
    with pytest.raises(ConfigError, match="must be"):
        check_value(value, tp)
