"""The shared test helpers behave as the suites that use them expect."""

from __future__ import annotations

import contextlib

import pytest

from tests.conftest import RunCli, require_service


@pytest.mark.parametrize(
    ("available", "env", "outcome"),
    [
        (True, "1", None),
        (True, None, None),
        (False, None, pytest.skip.Exception),
        (False, "0", pytest.skip.Exception),
        (False, "1", pytest.fail.Exception),
    ],
    ids=["available-required", "available", "missing", "missing-env-zero", "missing-required"],
)
def test_require_service_skips_unless_services_are_required(available: bool, env: str | None,
                                                            outcome: type[BaseException] | None,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    if env is None:
        monkeypatch.delenv("EDGEML_REQUIRE_SERVICES", raising=False)
    else:
        monkeypatch.setenv("EDGEML_REQUIRE_SERVICES", env)
    expect = (pytest.raises(outcome, match="mosquitto unavailable: not on PATH") if outcome
              else contextlib.nullcontext())
    with expect:
        require_service("mosquitto", available, "not on PATH")


def test_run_cli_returns_code_and_streams(run_cli: RunCli) -> None:
    code, out, err = run_cli("verify", "absent.edgeml")
    assert code == 2 and out == ""
    assert err.strip() == "error: absent.edgeml: no such bundle"
    code, out, _ = run_cli("--help", prelude="print('prelude ran')")
    assert code == 0 and out.startswith("prelude ran\n") and "compile" in out
