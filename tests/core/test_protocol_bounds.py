"""Bounded JSON (edgeml.protocol.codec): what a device can send past the size limit, and the fast path's proof.

Every payload is bound-checked; most are decided from their bytes alone (``_needs_walk``). These tests check
that the shortcut never lets through what the exact check (``check_json``) refuses, on generated JSON
built to hit every bound (long digit runs, large exponents, \\u escapes, deep nesting).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeml.protocol import MAX_DEPTH, ProtocolError, Telemetry, check_json, parse
from edgeml.protocol.codec import _needs_walk, decode_object, nests_deeper


@pytest.fixture(params=["msgspec", "stdlib"])
def decoder(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each bound holds with either decoder: msgspec (the fleet's install) or the standard library alone (a
    device's, where msgspec is not installed)."""
    from edgeml.protocol import codec

    if request.param == "msgspec" and not codec._fast():
        pytest.skip("msgspec is not installed")
    if request.param == "stdlib":
        monkeypatch.setattr(codec, "_FAST", False)
    return str(request.param)


def _telemetry(metrics: Any) -> bytes:
    return json.dumps({"schema": "edgeml.telemetry/1", "device_id": "cam-1", "seq": 1, "sent_at": 1.0,
                       "metrics": metrics}).encode()


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"a": value}
    return value


@pytest.mark.parametrize(("payload", "match"), [
    (_telemetry({"x": 2**63}), "64-bit range"),
    (_telemetry({"x": -(2**63) - 1}), "64-bit range"),
    (_telemetry({"x": int("9" * 400)}), "64-bit range"),
    (b'{"schema":"edgeml.telemetry/1","device_id":"cam-1","seq":1,"sent_at":1,"metrics":{"x":1e999}}', "finite"),
    (b'{"schema":"edgeml.telemetry/1","device_id":"cam-1","seq":1,"sent_at":1,"metrics":{"x":-1E+400}}', "finite"),
    (b'{"schema":"edgeml.telemetry/1","device_id":"cam-1","seq":1,"sent_at":1,"metrics":{"x":NaN}}', "not valid"),
    (b'{"schema":"edgeml.telemetry/1","device_id":"cam-1","seq":1,"sent_at":1,"metrics":{"x":Infinity}}',
     "not valid"),
    (_telemetry({"x": "a\u0000b"}), "NUL"),
    (_telemetry({"a\u0000": 1}), "NUL"),
    (b'{"schema":"edgeml.telemetry/1","device_id":"cam-1","seq":1,"sent_at":1,"metrics":{"x":"\\ud800"}}',
     "surrogates"),
    (b'{"schema":"edgeml.telemetry/1","device_id":"cam-1","seq":1,"sent_at":1,"metrics":{"x":"\xed\xa0\x80"}}',
     "not valid UTF-8"),
    (_telemetry(_nested(MAX_DEPTH)), "deeper than"),
    (b'{"a":' * 5000 + b"1" + b"}" * 5000, "deeper than"),
    (_telemetry({"x": [[[[[[[[[[[1]]]]]]]]]]]}), "deeper than"),
])
@pytest.mark.usefixtures("decoder")
def test_out_of_bounds_refused(payload: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        parse("telemetry", payload)


@pytest.mark.parametrize("metrics", [
    {"x": 2**63 - 1, "y": -(2**63), "z": 1e308, "w": -1.5e-300},
    {"drift": {"top_features": [{"name": "f", "ks": 0.1}] * 3, "drivers": ["f"]}},
    {"unit": "°C", "emoji": "\U0001f600"},  # escaped as \\u by json.dumps (a valid surrogate pair)
    _nested(MAX_DEPTH - 2),
])
@pytest.mark.usefixtures("decoder")
def test_in_bounds_accepted(metrics: Any) -> None:
    message = parse("telemetry", _telemetry(metrics))
    assert isinstance(message, Telemetry) and message.metrics == metrics


def test_largest_sequence_number_round_trips() -> None:
    message = Telemetry("cam-1", 2**63 - 1, 1.0, {})
    assert parse("telemetry", message.to_bytes()) == message


_SCALAR = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=6)
           | st.sampled_from(["\x00", "\ud800", "ok", 10**18, -(10**19), 2**63, 1e300, 1e-320]))
_VALUE = st.recursive(_SCALAR, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=3), c, max_size=3),
                      max_leaves=30)


def _exact_ok(value: Any) -> bool:
    try:
        check_json(value)
    except ProtocolError:
        return False
    return True


@settings(max_examples=600, deadline=None)
@given(value=_VALUE, exponent=st.booleans())
def test_fast_path_never_passes_what_the_exact_check_refuses(value: Any, exponent: bool) -> None:
    try:
        text = json.dumps({"v": value}, ensure_ascii=exponent)  # both spellings of non-ASCII text
    except ValueError:
        return
    payload = text.encode("utf-8", "surrogatepass")
    try:
        decoded = json.loads(payload.decode("utf-8"))  # strict, as decode_object (json.loads(bytes) is lenient)
    except (UnicodeDecodeError, ValueError):
        return  # raw surrogates are not UTF-8: the decoder refuses them before any bound
    if not _needs_walk(payload):
        assert _exact_ok(decoded), payload[:200]


@settings(max_examples=300, deadline=None)
@given(value=_VALUE)
def test_decode_object_agrees_with_the_exact_check(value: Any) -> None:
    payload = json.dumps({"v": value}).encode()
    if len(payload) > 60_000:
        return
    try:
        decode_object("telemetry", payload)
        accepted = True
    except ProtocolError:
        accepted = False
    assert accepted == _exact_ok(json.loads(payload))


def _typed(value: Any) -> Any:
    """``value`` with every scalar's type kept (1 == 1.0 == True in Python)."""
    if isinstance(value, dict):
        return {k: _typed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_typed(v) for v in value]
    return (type(value).__name__, repr(value))


_JSONISH = st.text(alphabet='{}[]":,.-+eE0123456789 \\u\x00\x1ftrufalsn\u00e9\U0001f600\ud800', max_size=40)


@settings(max_examples=800, deadline=None)
@given(value=_VALUE, ascii_only=st.booleans(), junk=_JSONISH, cut=st.integers(0, 200))
def test_the_fast_decoder_gives_the_standard_librarys_values(value: Any, ascii_only: bool, junk: str,
                                                             cut: int) -> None:
    """msgspec (the fleet's decoder) and the standard library (a device's) agree on every document msgspec
    accepts, well formed or not; decode_object falls back to the standard library on everything else."""
    pytest.importorskip("msgspec")
    from edgeml.protocol import codec

    try:
        text = json.dumps({"v": value}, ensure_ascii=ascii_only)
    except ValueError:
        return
    for doc in (text, text[:cut] + junk + text[cut:], junk):
        payload = doc.encode("utf-8", "surrogatepass")
        try:
            fast = codec._fast().decode(payload)
        except codec._FAST_ERRORS:
            continue
        assert _typed(fast) == _typed(json.loads(payload.decode("utf-8"))), payload[:200]


def test_events_have_a_size_limit_before_decoding() -> None:
    huge = b'{"schema":"edgeml.event/1","type":"update","pad":"' + b"x" * (5 * 1024 * 1024) + b'"}'
    with pytest.raises(ProtocolError, match="exceeds the limit of 16384"):
        parse("event", huge)


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


_BRACKETY = st.text(alphabet='[]{}"\\ab', max_size=8)  # strings full of brackets, quotes and backslashes
_DEEP = st.recursive(st.integers() | _BRACKETY,
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_BRACKETY, inner, max_size=3),
                     max_leaves=40)


@given(value=_DEEP, limit=st.integers(0, 12))
def test_nesting_is_measured_on_the_bytes_exactly(value: Any, limit: int) -> None:
    assert nests_deeper(json.dumps(value).encode(), limit) == (_depth(value) > limit)


def test_deep_nesting_is_refused_before_the_parser_even_with_a_raised_recursion_limit() -> None:
    """Python's C JSON decoder recurses per level, guarded only by the recursion limit: a library that raises
    it (CI crashed with a segfault in a 100,000-deep manifest) must not turn deep input into a crash."""
    import subprocess
    import sys
    code = (
        "import sys; sys.setrecursionlimit(10**7)\n"
        "from edgeml.protocol import parse, ProtocolError\n"
        "from edgeml.bundle_rules import load_json\n"
        "from edgeml.errors import BundleError\n"
        "deep = b'[' * 1_000_000 + b']' * 1_000_000\n"
        "try:\n    load_json(deep, 'manifest.json')\nexcept BundleError as e:\n    print('bundle:', e)\n"
        "try:\n    parse('telemetry', b'{\"a\":' * 10_000 + b'1' + b'}' * 10_000)\n"
        "except ProtocolError as e:\n    print('protocol:', e)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "bundle: manifest.json nests arrays or objects deeper than 32 levels" in done.stdout
    assert "protocol: telemetry: JSON nested deeper than 10 levels" in done.stdout
