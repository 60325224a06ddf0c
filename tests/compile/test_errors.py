"""Bad input through the real ``edgeml compile`` process: one clear ``error:`` line, exit status 2, no
traceback, and nothing left behind (no bundle, no hidden scratch directory). A run where only some targets
fail ships the others and exits 1."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import DigitsModel, RunCli

onnx = pytest.importorskip("onnx")

#: (model file, extra CLI arguments) for one case, prepared in the test's directory.
Prepared = tuple[Path, list[str]]


def _model_bytes(name: str, content: Callable[[bytes], bytes]) -> Callable[[DigitsModel, Path], Prepared]:
    def prepare(digits: DigitsModel, tmp: Path) -> Prepared:
        path = tmp / name
        path.write_bytes(content(digits.onnx.read_bytes()))
        return path, ["-t", "onnx"]

    return prepare


def _png(_: bytes) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _zip(model: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("model.onnx", model)
    return buf.getvalue()


def _fails_checker(_: bytes) -> bytes:
    from onnx import TensorProto, helper

    node = helper.make_node("Relu", ["undefined_tensor"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    return bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString())


def _data(calib: dict[str, np.ndarray] | None = None, val: dict[str, np.ndarray] | None = None,
          target: str = "onnx-int8", extra: tuple[str, ...] = ()) -> Callable[[DigitsModel, Path], Prepared]:
    """The digits model with replaced calibration and/or validation arrays (None keeps the good file)."""

    def prepare(digits: DigitsModel, tmp: Path) -> Prepared:
        args = ["-t", target]
        for flag, arrays, good in (("--calib", calib, digits.calib), ("--val", val, digits.val)):
            path = good
            if arrays is not None:
                path = tmp / f"{flag[2:]}.npz"
                np.savez(path, **arrays)  # type: ignore[arg-type]
            args += [flag, str(path)]
        return digits.onnx, args + list(extra)

    return prepare


def _args(*args: str) -> Callable[[DigitsModel, Path], Prepared]:
    return lambda digits, tmp: (digits.onnx, list(args))


_X = np.zeros((10, 1, 8, 8), np.float32)

CASES = [
    pytest.param(_model_bytes("half.onnx", lambda b: b[: len(b) // 2]),
                 "half.onnx is not a readable ONNX model (truncated or not ONNX)", id="truncated-onnx"),
    pytest.param(_model_bytes("noise.onnx", lambda b: np.random.default_rng(0).bytes(4096)),
                 "noise.onnx is not a readable ONNX model", id="random-bytes-onnx"),
    pytest.param(_model_bytes("notes.onnx", lambda b: b"this is a text file, renamed\n"),
                 "notes.onnx is not a readable ONNX model", id="text-renamed-onnx"),
    pytest.param(_model_bytes("photo.onnx", _png), "photo.onnx is not a readable ONNX model", id="png-renamed-onnx"),
    pytest.param(_model_bytes("archive.onnx", _zip), "archive.onnx is not a readable ONNX model",
                 id="zip-renamed-onnx"),
    pytest.param(_model_bytes("model.zip", _zip), "model.zip is not an ONNX model (expected a .onnx file)",
                 id="zip-file"),
    pytest.param(_model_bytes("broken.onnx", _fails_checker), "broken.onnx fails the ONNX checker",
                 id="fails-onnx-checker"),
    pytest.param(lambda digits, tmp: (tmp / "absent.onnx", ["-t", "onnx"]), "absent.onnx does not exist",
                 id="missing-model"),
    pytest.param(_data(calib={"input": np.zeros((10, 1, 16, 16), np.float32)}),
                 "input 'input': expected shape Nx1x8x8, calibration data", id="calibration-shape"),
    pytest.param(_data(calib={"input": np.zeros((10, 8, 8), np.float32)}),
                 "input 'input': expected shape Nx1x8x8", id="calibration-rank"),
    pytest.param(_data(calib={"input": np.zeros((10, 1, 8, 8), np.int64)}),
                 "input 'input': expected dtype float32, calibration data", id="calibration-dtype"),
    pytest.param(_data(calib={"images": _X, "masks": _X}), "has no array for model input 'input'",
                 id="calibration-wrong-keys"),
    pytest.param(_data(val={"input": _X, "labels": np.zeros(10, np.float32)}),
                 "'labels' must be one integer per sample", id="float-labels"),
    pytest.param(_data(val={"input": _X, "labels": np.zeros(9, np.int64)}),
                 "'labels' must be one integer per sample", id="labels-count"),
    pytest.param(_data(val={"input": _X}, extra=("--metric", "accuracy")),
                 "--metric accuracy needs labels", id="accuracy-without-labels"),
    pytest.param(_args("-t", "onnx", "-t", "tpu"), "unknown target 'tpu'", id="unknown-target"),
    pytest.param(lambda digits, tmp: (digits.onnx, ["-t", "onnx-int8", "--calib", str(digits.calib)]),
                 "INT8 targets are gated on validation data: pass --val", id="int8-without-val"),
    pytest.param(_args("-t", "onnx", "--version", "1.0"), "version '1.0' is not a semantic version",
                 id="bad-version"),
    pytest.param(_args("-t", "onnx", "--name", "My Model"), "model name 'My Model' is invalid", id="bad-name"),
    pytest.param(_args("-t", "onnx", "--max-accuracy-drop", "150"), "--max-accuracy-drop 150.0 is not between",
                 id="bad-budget"),
    pytest.param(_args("-t", "onnx-int8", "--calibration-method", "magic"), "unknown calibration method 'magic'",
                 id="bad-calibration-method"),
    pytest.param(_data(calib={"input": _X}, val={"input": _X}, extra=("--calib-samples", "0")),
                 "--calib-samples must be at least 1", id="bad-calib-samples"),
]


def _assert_one_error_line(code: int, out: str, err: str, message: str) -> None:
    assert code == 2, f"exit {code}\nstdout: {out[-2000:]}\nstderr: {err[-2000:]}"
    assert "Traceback" not in err and "Traceback" not in out, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert message in errors[0], err


def _assert_nothing_left(root: Path) -> None:
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*.edgeml")) == []
    assert sorted(str(p.relative_to(root)) for p in root.rglob(".edgeml-*")) == []


@pytest.mark.parametrize(("prepare", "message"), CASES)
def test_bad_input_gives_one_error_line_and_writes_nothing(
    prepare: Callable[[DigitsModel, Path], Prepared], message: str, digits: DigitsModel, run_cli: RunCli,
    tmp_path: Path,
) -> None:
    model, args = prepare(digits, tmp_path)
    dist = tmp_path / "dist"
    dist.mkdir()
    code, out, err = run_cli("compile", model, *args, "-o", dist, "--no-benchmark")
    _assert_one_error_line(code, out, err, message)
    assert list(dist.iterdir()) == []
    _assert_nothing_left(tmp_path)


def test_missing_extra_names_the_install_command(digits: DigitsModel, run_cli: RunCli, tmp_path: Path) -> None:
    # The pipeline checks extras with importlib.util.find_spec; a None entry in sys.modules is Python's own
    # way to mark a module as not importable, and find_spec honours it, so this is what a machine without
    # onnx2tf looks like to edgeml.
    dist = tmp_path / "dist"
    code, out, err = run_cli("compile", digits.onnx, "-t", "onnx", "-t", "tflite", "-o", dist, "--no-benchmark",
                             prelude="sys.modules['onnx2tf'] = None")
    _assert_one_error_line(code, out, err, "onnx2tf is not installed; run: pip install 'edgeml[tflite]' && "
                                           "pip install --no-deps onnx2tf==1.29.24")
    assert not dist.exists()  # checked before anything is created
    _assert_nothing_left(tmp_path)


@pytest.mark.parametrize("output", ["afile/dist", "afile"], ids=["parent-is-a-file", "output-is-a-file"])
def test_unwritable_output_directory(output: str, digits: DigitsModel, run_cli: RunCli, tmp_path: Path) -> None:
    # Tests may run as root, where chmod does not stop writes: a regular file in the way stops everyone.
    (tmp_path / "afile").write_bytes(b"not a directory")
    code, out, err = run_cli("compile", digits.onnx, "-t", "onnx", "-o", tmp_path / output, "--no-benchmark")
    expected = "is a file, not a directory" if output == "afile" else "is not writable"
    _assert_one_error_line(code, out, err, f"{tmp_path / output} {expected}")
    assert (tmp_path / "afile").read_bytes() == b"not a directory"
    _assert_nothing_left(tmp_path)


@pytest.mark.parametrize(
    ("flags", "status", "reason"),
    [
        (["--max-error", "0"], "gate-failed", "accuracy gate failed: max abs error"),
        (["--exclude-node", "no_such_node"], "error", "--exclude-node names no node of the model: no_such_node"),
    ],
    ids=["gate-failed", "build-error"],
)
def test_one_failing_target_does_not_stop_the_others(flags: list[str], status: str, reason: str,
                                                     digits: DigitsModel, run_cli: RunCli, tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    code, out, err = run_cli("compile", digits.onnx, "-t", "onnx", "-t", "onnx-int8", "--calib", digits.calib,
                             "--val", digits.val, "--name", "digits", "--version", "1.0.0", "-o", dist,
                             "--no-benchmark", *flags)
    assert code == 1, out + err
    assert "Traceback" not in err and not [line for line in err.splitlines() if line.startswith("error:")]
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in out.splitlines()
            if line.startswith("│")}
    assert rows == {"onnx": "written", "onnx-int8": status}
    assert f"✗ onnx-int8: {reason}" in out
    assert sorted(p.name for p in dist.iterdir()) == ["digits-1.0.0-onnx.edgeml"]
    code, out, err = run_cli("verify", dist / "digits-1.0.0-onnx.edgeml")
    assert (code, out.strip()) == (0, f"ok: {dist / 'digits-1.0.0-onnx.edgeml'} (3 files verified)"), err


@pytest.mark.parametrize(("ir", "opsets", "expected"), [
    (8, [("", 17), ("com.microsoft", 1)], "1.12"),  # a torch export: a Jetson's onnxruntime 1.16 takes it
    (8, [("", 18)], "1.14"),
    (9, [("ai.onnx", 19)], "1.15"),
    (10, [("", 21)], "1.18"),
    (11, [("", 23)], "1.23"),
])
def test_bundles_ask_for_the_oldest_onnxruntime_that_runs_them(ir: int, opsets: list[tuple[str, int]],
                                                                 expected: str) -> None:
    from onnx import helper

    from edgeml.compile.backends.onnx_fp32 import ort_min_version

    model = helper.make_model(helper.make_graph([], "g", [], []), ir_version=ir,
                              opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    assert ort_min_version(model) == expected


def test_a_model_newer_than_the_table_asks_for_this_hosts_onnxruntime() -> None:
    import onnxruntime
    from onnx import helper

    from edgeml.compile.backends.onnx_fp32 import ort_min_version

    model = helper.make_model(helper.make_graph([], "g", [], []), ir_version=99,
                              opset_imports=[helper.make_opsetid("", 99)])
    assert ort_min_version(model) == ".".join(onnxruntime.__version__.split(".")[:2])
