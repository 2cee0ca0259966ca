"""What an audit record keeps of a call's arguments (taskbound.core.redact).

Examples for each rule, RFC 6901's own pointer examples, and properties: whatever the
input, redaction never raises, its result is always RFC 8785 serialisable and within the
byte limit, and nothing that was under a redacted name or path is ever in it.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from types import MappingProxyType
from typing import Any

import pytest
import rfc8785
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from taskbound.core.redact import (
    CUT,
    DEFAULT_REDACT_KEYS,
    MAX_DEPTH,
    MAX_STRING_CHARS,
    REDACTED,
    TOO_DEEP,
    RedactionRules,
    parse_pointer,
    redact,
)

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DEFAULTS = RedactionRules()
ROOMY = 65536


def test_the_default_names_are_the_documented_list() -> None:
    assert DEFAULT_REDACT_KEYS == (
        "*password*",
        "*passwd*",
        "*secret*",
        "*token*",
        "authorization",
        "*cookie*",
        "*api_key*",
        "*apikey*",
        "*private_key*",
        "*credential*",
        "*session*",
        "ssn",
    )


# --- JSON Pointers (RFC 6901) -------------------------------------------------------------


@pytest.mark.parametrize(
    ("pointer", "tokens"),
    [
        # RFC 6901 §5.
        ("", ()),
        ("/foo", ("foo",)),
        ("/foo/0", ("foo", "0")),
        ("/", ("",)),
        ("/a~1b", ("a/b",)),
        ("/c%d", ("c%d",)),
        ("/e^f", ("e^f",)),
        ("/g|h", ("g|h",)),
        ("/i\\j", ("i\\j",)),
        ('/k"l', ('k"l',)),
        ("/ ", (" ",)),
        ("/m~0n", ("m~n",)),
        # §4: ~1 first, then ~0, so "~01" is "~1", not "/".
        ("/~01", ("~1",)),
        ("/body/card_number", ("body", "card_number")),
        ("/items/*/note", ("items", "*", "note")),
        ("//", ("", "")),
    ],
)
def test_pointers_parse(pointer: str, tokens: tuple[str, ...]) -> None:
    assert parse_pointer(pointer) == tokens


@pytest.mark.parametrize("pointer", ["foo", "foo/bar", "~1", "/~", "/a~", "/~2", "/a/~x/b", " /a"])
def test_what_is_not_a_pointer_is_refused(pointer: str) -> None:
    with pytest.raises(ValueError, match="not a JSON Pointer"):
        parse_pointer(pointer)
    with pytest.raises(ValueError, match="not a JSON Pointer"):
        RedactionRules(paths=(pointer,))


# --- names --------------------------------------------------------------------------------


def test_default_names_are_redacted_at_any_depth_whatever_the_case() -> None:
    arguments = {
        "project": "WEB",
        "Password": "hunter2",
        "db_passwd": 1234,
        "client_SECRET": {"nested": "deep"},
        "X-Auth-Token": ["a", "b"],
        "authorization": "Bearer abc",
        "Set-Cookie": "sid=1",
        "stripe_api_key": "sk_live",
        "ApiKey": "k",
        "private_key_pem": "-----BEGIN",
        "aws_credentials": None,
        "SessionId": "s",
        "SSN": "078-05-1120",
        "nested": {"list": [{"refresh_token": "r", "keep": "me"}], "ssn_last4": "1120"},
        "authorization_url": "https://kept.example",
    }
    out = redact(arguments, DEFAULTS, ROOMY)
    assert out == {
        "project": "WEB",
        "Password": REDACTED,
        "db_passwd": REDACTED,
        "client_SECRET": REDACTED,
        "X-Auth-Token": REDACTED,
        "authorization": REDACTED,
        "Set-Cookie": REDACTED,
        "stripe_api_key": REDACTED,
        "ApiKey": REDACTED,
        "private_key_pem": REDACTED,
        "aws_credentials": REDACTED,
        "SessionId": REDACTED,
        "SSN": REDACTED,
        # "ssn" and "authorization" are exact names, not parts of names.
        "nested": {"list": [{"refresh_token": REDACTED, "keep": "me"}], "ssn_last4": "1120"},
        "authorization_url": "https://kept.example",
    }
    # The input is left as it was.
    assert arguments["Password"] == "hunter2"


def test_an_operators_names_replace_the_defaults() -> None:
    rules = RedactionRules(keys=("card_*", "CVV"))
    out = redact({"card_number": "4111", "cvv": 123, "password": "p", "cards": 2}, rules, ROOMY)
    assert out == {"card_number": REDACTED, "cvv": REDACTED, "password": "p", "cards": 2}
    assert redact({"password": "p"}, RedactionRules(keys=()), ROOMY) == {"password": "p"}


def test_patterns_are_fnmatch() -> None:
    rules = RedactionRules(keys=("pin?", "[xy]-key", "acct[!_]*"))
    out = redact(
        {"pin1": 1, "pin": 2, "pin12": 3, "X-Key": 4, "z-key": 5, "acct9": 6, "acct_no": 7},
        rules,
        ROOMY,
    )
    assert out == {
        "pin1": REDACTED,
        "pin": 2,
        "pin12": 3,
        "X-Key": REDACTED,
        "z-key": 5,
        "acct9": REDACTED,
        "acct_no": 7,
    }


# --- paths --------------------------------------------------------------------------------


def test_paths_are_redacted() -> None:
    rules = RedactionRules(
        keys=(),
        paths=("/body/card_number", "/items/0/note", "/rows/*/email", "/a~1b", "/m~0n", "/*/pin"),
    )
    arguments = {
        "body": {"card_number": "4111", "card_holder": "Ann"},
        "items": [{"note": "first"}, {"note": "second"}],
        "rows": [{"email": "a@x", "id": 1}, {"email": "b@x"}, "scalar"],
        "a/b": 1,
        "m~n": 2,
        "a": {"b": 3},
        "x": {"pin": 1234, "other": 1},
        "y": [{"pin": 1}],
    }
    assert redact(arguments, rules, ROOMY) == {
        "body": {"card_number": REDACTED, "card_holder": "Ann"},
        "items": [{"note": REDACTED}, {"note": "second"}],
        "rows": [{"email": REDACTED, "id": 1}, {"email": REDACTED}, "scalar"],
        "a/b": REDACTED,
        "m~n": REDACTED,
        "a": {"b": 3},
        "x": {"pin": REDACTED, "other": 1},
        "y": [{"pin": 1}],  # "/*/pin" is one level down: y's items are two
    }


def test_a_path_redacts_a_whole_subtree_and_an_array_item() -> None:
    rules = RedactionRules(keys=(), paths=("/config", "/list/1"))
    out = redact({"config": {"a": [1, 2]}, "list": ["a", "b", "c"]}, rules, ROOMY)
    assert out == {"config": REDACTED, "list": ["a", REDACTED, "c"]}


def test_paths_that_lead_nowhere_change_nothing() -> None:
    rules = RedactionRules(
        keys=(), paths=("/missing", "/list/01", "/list/-", "/list/9", "/scalar/x", "/LIST/0")
    )
    arguments = {"list": ["a", "b"], "scalar": "text", "01": "kept"}
    assert redact(arguments, rules, ROOMY) == arguments


def test_the_whole_value_pointer_redacts_everything() -> None:
    assert redact({"a": 1}, RedactionRules(paths=("",)), ROOMY) == REDACTED


def test_a_path_and_a_name_together() -> None:
    rules = RedactionRules(paths=("/body/card_number",))  # with the default names
    out = redact({"body": {"card_number": "4111", "password": "p", "n": 1}}, rules, ROOMY)
    assert out == {"body": {"card_number": REDACTED, "password": REDACTED, "n": 1}}


# --- bounds -------------------------------------------------------------------------------


def test_long_strings_are_cut_with_a_marker() -> None:
    exact = "x" * MAX_STRING_CHARS
    out = redact({"exact": exact, "long": "é" * 5000, "list": ["y" * 2000]}, DEFAULTS, ROOMY)
    assert out["exact"] == exact
    assert out["long"] == "é" * (MAX_STRING_CHARS - len(CUT)) + CUT
    assert len(out["long"]) == MAX_STRING_CHARS
    assert out["list"][0].endswith(CUT)
    short = RedactionRules(max_string_chars=20)
    assert redact("a" * 21, short, ROOMY) == "a" * (20 - len(CUT)) + CUT
    with pytest.raises(ValueError, match="max_string_chars"):
        RedactionRules(max_string_chars=len(CUT))


def test_too_much_is_replaced_by_its_size_never_cut_in_the_middle() -> None:
    arguments = {"rows": [{"n": i, "text": "abcdefghij" * 10} for i in range(100)]}
    whole = redact(arguments, DEFAULTS, ROOMY)
    size = len(rfc8785.dumps(whole))
    assert size > 4096
    assert redact(arguments, DEFAULTS, 4096) == {"truncated": True, "bytes": size}
    # At the limit exactly, the value is kept.
    assert redact(arguments, DEFAULTS, size) == whole
    assert redact(arguments, DEFAULTS, size - 1) == {"truncated": True, "bytes": size}


def test_deep_nesting_is_cut() -> None:
    deep: Any = "bottom"
    for _ in range(MAX_DEPTH):
        deep = {"d": deep}
    # MAX_DEPTH containers are kept...
    assert redact(deep, DEFAULTS, ROOMY) == deep
    # ... one more is not.
    out = redact([deep], DEFAULTS, ROOMY)
    inner = out[0]
    for _ in range(MAX_DEPTH - 2):
        inner = inner["d"]
    assert inner == {"d": TOO_DEEP}
    assert redact([[[1]]], RedactionRules(max_depth=2), ROOMY) == [[TOO_DEEP]]
    # Even a structure that contains itself.
    loop: dict[str, Any] = {}
    loop["self"] = loop
    assert json.dumps(redact(loop, DEFAULTS, ROOMY)).count(TOO_DEEP) == 1


# --- what JSON cannot carry ---------------------------------------------------------------


def test_what_is_not_json_becomes_a_marker_of_its_type() -> None:
    arguments = {
        "nan": float("nan"),
        "inf": float("inf"),
        "-inf": float("-inf"),
        "bytes": b"\x00\x01",
        "set": {1, 2},
        "decimal": Decimal("1.5"),
        "when": datetime(2026, 1, 1, tzinfo=UTC),
        "object": object(),
        "tuple": (1, "two"),
        "proxy": MappingProxyType({"a": 1}),
        "big": 2**60,
        "-big": -(2**53),
        "huge": 10**5000,
        "safe": 2**53 - 1,
        "true": True,
        "none": None,
        "float": -0.0,
    }
    assert redact(arguments, DEFAULTS, ROOMY) == {
        "nan": "[float]",
        "inf": "[float]",
        "-inf": "[float]",
        "bytes": "[bytes]",
        "set": "[set]",
        "decimal": "[Decimal]",
        "when": "[datetime]",
        "object": "[object]",
        "tuple": [1, "two"],
        "proxy": {"a": 1},
        "big": str(2**60),
        "-big": str(-(2**53)),
        "huge": "[int]",
        "safe": 2**53 - 1,
        "true": True,
        "none": None,
        "float": -0.0,
    }


def test_a_member_whose_name_is_not_a_string_is_hidden() -> None:
    out = redact({1: "one", None: "none", ("a",): "tuple", "ok": 1}, DEFAULTS, ROOMY)
    assert out == {"[int]": REDACTED, "[NoneType]": REDACTED, "[tuple]": REDACTED, "ok": 1}


def test_nul_and_lone_surrogates_become_replacement_characters() -> None:
    out = redact({"a\x00b": "c\x00d", "k\ud800": ["\udfff", "ok ✓"]}, DEFAULTS, ROOMY)
    assert out == {"a\ufffdb": "c\ufffdd", "k\ufffd": ["\ufffd", "ok ✓"]}
    rfc8785.dumps(out)


# --- properties ---------------------------------------------------------------------------

odd_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=30)
    | st.sampled_from(["\ud800", "a\x00b", "\udfff\ud83d", "x" * 1500])
    | st.binary(max_size=5)
    | st.decimals(allow_nan=True)
    | st.sampled_from([object(), {1, 2}, frozenset()])
)
odd_values = st.recursive(
    odd_scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(max_size=8) | st.integers() | st.none(), inner, max_size=4)
    ),
    max_leaves=25,
)


@FAST
@given(
    value=odd_values,
    max_bytes=st.integers(64, 2048),
    depth=st.integers(1, 6),
    cap=st.integers(len(CUT) + 1, 200),
)
def test_whatever_the_input_the_output_is_json_and_within_the_limit(
    value: Any, max_bytes: int, depth: int, cap: int
) -> None:
    rules = RedactionRules(max_string_chars=cap, max_depth=depth, paths=("/*/0", "/a"))
    out = redact(value, rules, max_bytes)
    canonical = rfc8785.dumps(out)
    # It also goes through the standard library's strict JSON, as the stores write it.
    json.dumps(out, allow_nan=False)
    assert not any("\x00" in text for text in _texts(out))
    if len(canonical) > max_bytes:
        assert out == {"truncated": True, "bytes": out["bytes"]}
        assert out["bytes"] > max_bytes
    # Redacting what was recorded changes nothing.
    assert redact(out, rules, max_bytes) == out


def _texts(value: Any) -> list[str]:
    """Every string and member name in a JSON value."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [t for k, v in value.items() for t in (k, *_texts(v))]
    if isinstance(value, list):
        return [t for v in value for t in _texts(v)]
    return []


# Plain text that never holds the marker planted under secret names.
plain_text = st.text(alphabet="abcdefghijklmnopqrstuvwxyz 0123456789/~*", max_size=10)
names = plain_text | st.sampled_from(
    ["password", "Password", "API_KEY", "x-auth-token", "authorization", "ssn", "SessionId"]
)
trees = st.recursive(
    st.none() | st.booleans() | st.integers(-1000, 1000) | plain_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(names, inner, max_size=4),
    max_leaves=30,
)


def plant(value: Any, rules: RedactionRules, secret: bool = False) -> Any:
    """``value`` with every string and member name under a redacted name marked SECRET."""
    if isinstance(value, dict):
        return {
            (f"SECRET-{k}" if secret else k): plant(v, rules, secret or rules.secret_key(k))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [plant(v, rules, secret) for v in value]
    if isinstance(value, str) and secret:
        return f"SECRET-{value}"
    if secret and value is not None and not isinstance(value, bool):
        return f"SECRET-{value}"
    return value


@FAST
@given(tree=trees)
def test_nothing_under_a_redacted_name_is_ever_recorded(tree: Any) -> None:
    value = plant(tree, DEFAULTS)
    out = redact(value, DEFAULTS, ROOMY)
    assert "SECRET" not in json.dumps(out, ensure_ascii=False)


def _escape(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


@FAST
@given(tree=trees.filter(lambda t: isinstance(t, dict | list) and bool(t)), data=st.data())
def test_nothing_at_a_redacted_path_is_ever_recorded(tree: Any, data: st.DataObject) -> None:
    # A path into the tree, drawn step by step; the value where it ends becomes a secret.
    tokens: list[str] = []
    node: Any = tree
    while True:
        key: Any
        if isinstance(node, dict):
            key = data.draw(st.sampled_from(sorted(node)))
        else:
            key = data.draw(st.integers(0, len(node) - 1))
        tokens.append(str(key))
        parent, node = node, node[key]
        if not (isinstance(node, dict | list) and node and data.draw(st.booleans())):
            break
    parent[key] = {"planted": "SECRET", "SECRET": 1}
    pointer = "".join("/" + _escape(t) for t in tokens)
    out = redact(tree, RedactionRules(keys=(), paths=(pointer,)), ROOMY)
    assert "SECRET" not in json.dumps(out, ensure_ascii=False), (pointer, out)
