"""Request -> action mapping and digests (taskbound.core.actions).

The corpora live in ``tests/vectors/actions/`` (STYLE.md rule 6): ``routes.yaml`` (HTTP
matching), ``jsonrpc.yaml`` (JSON-RPC bodies), ``headers.yaml`` (MCP routing headers against
the body) and ``jcs.json`` (RFC 8785 examples). Property tests check that hostile input fails
only in the documented way and that digests ignore member order and whitespace.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import re
import struct
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import quote

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from taskbound.core.actions import (
    INVALID_REQUEST,
    MAX_PATH_LENGTH,
    MAX_PATH_SEGMENTS,
    PARSE_ERROR,
    HttpRouter,
    McpHeaderMismatch,
    McpMessage,
    McpProtocolError,
    RouteError,
    action_digest,
    argument_digest,
    canonical_json,
    check_mcp_headers,
    mcp_tool_action,
    parse_jsonrpc,
)
from taskbound.core.model import Action, Tier, Tool, ToolKind
from taskbound.errors import ConfigError

VECTORS = Path(__file__).parent.parent / "vectors" / "actions"
EPOCH = datetime(2025, 1, 1, tzinfo=UTC)
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@functools.cache
def corpus(name: str) -> Any:
    text = (VECTORS / name).read_text(encoding="utf-8")
    return json.loads(text) if name.endswith(".json") else yaml.safe_load(text)


def make_tool(actions: tuple[Action, ...], kind: ToolKind = ToolKind.HTTP) -> Tool:
    return Tool("gh", "https://gw.example/gh", "https://api.example", kind, actions, EPOCH, EPOCH)


def http_action(name: str, method: str | None, path: str | None) -> Action:
    return Action(name, Tier.READ, method=method, path=path)


def corpus_actions() -> tuple[Action, ...]:
    return tuple(
        http_action(a["name"], a["method"], a["path"]) for a in corpus("routes.yaml")["actions"]
    )


ROUTER = HttpRouter.for_tool(make_tool(corpus_actions()))
ROUTE_CASES = corpus("routes.yaml")["cases"]


def body_of(text: str) -> bytes:
    return text.encode("utf-8")


def call_body(arguments: Any, name: str = "t", id_: Any = 1) -> bytes:
    message = {"jsonrpc": "2.0", "id": id_, "method": "tools/call"}
    message["params"] = {"name": name, "arguments": arguments}
    return json.dumps(message).encode()


# --- HTTP: the corpus -------------------------------------------------------------------------


@pytest.mark.parametrize("case", ROUTE_CASES, ids=lambda c: f"{c['method']} {c['path']}")
def test_route_corpus(case: dict[str, Any]) -> None:
    if "deny" in case:
        with pytest.raises(RouteError) as info:
            ROUTER.match(case["method"], case["path"])
        err = info.value
        assert (err.code, err.status) == ("no_matching_action", 403)
        # The caller learns only that nothing matched; the audit gets the reason.
        assert err.detail == RouteError.default_detail
        assert err.internal != err.detail
        return
    match = ROUTER.match(case["method"], case["path"])
    assert match.action.name == case["action"], case
    assert dict(match.params) == case["params"]


def test_corpus_covers_every_action() -> None:
    matched = {c["action"] for c in ROUTE_CASES if "action" in c}
    assert matched | {"dup.second"} == {a.name for a in corpus_actions()}


@FAST
@given(st.permutations(corpus_actions()[:-3] + corpus_actions()[-1:]))
def test_precedence_does_not_depend_on_registry_order(actions: list[Action]) -> None:
    """Only true ties (identical templates) fall back to registry order."""
    router = HttpRouter.for_tool(make_tool(tuple(actions)))
    for case in ROUTE_CASES:
        if "action" in case and not case["action"].startswith("dup."):
            assert router.match(case["method"], case["path"]).action.name == case["action"]


def test_identical_templates_resolve_to_the_first_registered() -> None:
    swapped = make_tool((http_action("b", "GET", "/dup/{b}"), http_action("a", "GET", "/dup/{a}")))
    match = HttpRouter.for_tool(swapped).match("GET", "/dup/z")
    assert (match.action.name, dict(match.params)) == ("b", {"b": "z"})


def test_params_are_read_only() -> None:
    match = ROUTER.match("GET", "/repos/octo/hello")
    with pytest.raises(TypeError):
        match.params["owner"] = "evil"  # type: ignore[index]


def test_method_mismatch_names_the_methods_in_the_audit_reason() -> None:
    with pytest.raises(RouteError) as info:
        ROUTER.match("POST", "/repos/octo/hello")
    assert "DELETE, GET" in info.value.internal


def test_path_length_bound() -> None:
    longest = "/files/" + "a" * (MAX_PATH_LENGTH - len("/files/"))
    assert ROUTER.match("GET", longest).params["path"] == longest[7:]
    with pytest.raises(RouteError) as info:
        ROUTER.match("GET", longest + "a")
    assert str(MAX_PATH_LENGTH) in info.value.internal
    with pytest.raises(RouteError):
        ROUTER.match("GET", "/" * 10_000_000)


def test_segment_count_bound() -> None:
    names = [f"p{i}" for i in range(MAX_PATH_SEGMENTS)]
    template = "".join(f"/{{{n}}}" for n in names)
    router = HttpRouter.for_tool(make_tool((http_action("deep", "GET", template),)))
    match = router.match("GET", "/x" * MAX_PATH_SEGMENTS)
    assert len(match.params) == MAX_PATH_SEGMENTS
    with pytest.raises(RouteError):
        router.match("GET", "/x" * (MAX_PATH_SEGMENTS + 1))
    with pytest.raises(ConfigError):
        HttpRouter.for_tool(make_tool((http_action("deeper", "GET", template + "/{z}"),)))


def test_mcp_actions_are_not_routes() -> None:
    tool = make_tool((Action("search", Tier.READ, mcp_tool="search"),), ToolKind.MCP)
    router = HttpRouter.for_tool(tool)
    for path in ("/", "/search", "/mcp"):
        with pytest.raises(RouteError):
            router.match("POST", path)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/a/{x}/{x}"),  # repeated parameter
        ("GET", "/a/{x}b"),  # parameter is not the whole segment
        ("GET", "/a/x{y}"),
        ("GET", "/a/{x"),
        ("GET", "/a/{}"),
        ("GET", "/a/{1x}"),
        ("GET", "/a/{x-y}"),
        ("get", "/a"),  # methods are upper case
        ("G ET", "/a"),
        ("", "/a"),
        ("GET", "a/b"),  # no leading slash
        ("GET", ""),
        ("GET", "/a/../b"),  # a literal that no request may carry
        ("GET", "/a/./b"),
        ("GET", "/a/%2e%2e"),
        ("GET", "/a/%zz"),
        ("GET", "/a/%ff"),
        ("GET", "/a/%00"),
        ("GET", "/a b"),
        ("GET", "/a?x=1"),
        ("GET", "/a#x"),
        ("GET", "/a\\b"),
        ("GET", "/" + "a" * MAX_PATH_LENGTH),
        (None, "/a"),  # an HTTP action needs both
        ("GET", None),
    ],
)
def test_templates_the_router_cannot_honour_are_config_errors(
    method: str | None, path: str | None
) -> None:
    tool = make_tool((http_action("ok", "GET", "/ok"), http_action("bad", method, path)))
    with pytest.raises(ConfigError) as info:
        HttpRouter.for_tool(tool)
    assert "'bad'" in info.value.detail


RAW_PIECES = st.sampled_from(
    [
        "/", "//", "%", "%2F", "%2f", "%2e", "%2E", "%00", "%ff", "%C3%A9", "%E2%82", "%5C",
        "%25", ".", "..", ";", "..;", "\\", "?", "#", " ", "\x00", "\t", "\u00e9", "\ud800",
        "{", "}", "a", "Z", "0", "-", "files", "repos", "me", "settings", "issues", "trail",
    ]
)  # fmt: skip
RAW_PATHS = st.one_of(
    st.lists(RAW_PIECES, max_size=30).map("".join),
    st.lists(RAW_PIECES, max_size=30).map(lambda p: "/" + "".join(p)),
    st.text(max_size=200),
    st.text(max_size=200).map(lambda t: "/" + t),
)
METHODS = st.one_of(
    st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "get", "", "G\x00T"]), st.text()
)


@FAST
@given(METHODS, RAW_PATHS)
def test_match_fails_only_with_route_error(method: str, path: str) -> None:
    try:
        match = ROUTER.match(method, path)
    except RouteError:
        return
    assert match.action.method == method
    for value in match.params.values():
        assert value
        assert "\x00" not in value


def _refused_value(value: str) -> bool:
    """The rule, restated: NUL, or a dot segment once split on / and \\ and ;params dropped."""
    pieces = re.split(r"[/\\]", value)
    return "\x00" in value or any(p.split(";", 1)[0] in (".", "..") for p in pieces)


@FAST
@given(st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=40))
def test_any_value_survives_percent_encoding_in_one_segment(value: str) -> None:
    path = "/files/" + quote(value, safe="")
    if _refused_value(value):
        with pytest.raises(RouteError):
            ROUTER.match("GET", path)
    else:
        assert dict(ROUTER.match("GET", path).params) == {"path": value}


# --- JSON-RPC: the corpus ----------------------------------------------------------------------


@pytest.mark.parametrize("case", corpus("jsonrpc.yaml")["cases"], ids=lambda c: c["why"])
def test_jsonrpc_corpus(case: dict[str, Any]) -> None:
    body = bytes.fromhex(case["body_hex"]) if "body_hex" in case else body_of(case["body"])
    if "error" in case:
        with pytest.raises(McpProtocolError) as info:
            parse_jsonrpc(body)
        err = info.value
        assert err.jsonrpc_code == case["error"], err.internal
        assert (err.code, err.status) == ("invalid_jsonrpc", 400)
        return
    messages, is_batch = parse_jsonrpc(body)
    assert is_batch is case["batch"]
    assert len(messages) == len(case["messages"])
    for message, want in zip(messages, case["messages"], strict=True):
        assert type(message.id) is type(want["id"])
        assert message.id == want["id"]
        assert message.method == want["method"]
        assert message.is_notification is (want["id"] is None)
        for attribute in ("params", "tool_name", "arguments"):
            if attribute in want:
                assert getattr(message, attribute) == want[attribute], attribute


def simple_request(i: int) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": i, "method": "ping"}


def test_batch_limit() -> None:
    messages, is_batch = parse_jsonrpc(json.dumps([simple_request(i) for i in range(32)]).encode())
    assert is_batch
    assert len(messages) == 32
    with pytest.raises(McpProtocolError) as info:
        parse_jsonrpc(json.dumps([simple_request(i) for i in range(33)]).encode())
    assert info.value.jsonrpc_code == INVALID_REQUEST
    three = json.dumps([simple_request(i) for i in range(3)]).encode()
    with pytest.raises(McpProtocolError):
        parse_jsonrpc(three, max_batch=2)


def nested(depth: int) -> Any:
    value: Any = "leaf"
    for i in range(depth):
        value = {"k": value} if i % 2 else [value]
    return value


def test_depth_limit() -> None:
    # The message is level 1, params 2, arguments 3: 29 more fit within the default 32.
    messages, _ = parse_jsonrpc(call_body({"a": nested(29)}))
    assert messages[0].arguments["a"] == nested(29)
    with pytest.raises(McpProtocolError) as info:
        parse_jsonrpc(call_body({"a": nested(30)}))
    assert info.value.jsonrpc_code == INVALID_REQUEST
    # A batch adds a level.
    with pytest.raises(McpProtocolError):
        parse_jsonrpc(b"[" + call_body({"a": nested(29)}) + b"]")
    parse_jsonrpc(call_body({"a": nested(40)}), max_depth=43)
    with pytest.raises(McpProtocolError):
        parse_jsonrpc(call_body({}), max_depth=2)


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000 + b"]" * 100_000,  # valid JSON, deeper than the interpreter recurses
        b"[" * 100_000,  # and unterminated
        b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
        b"[" * 900 + b"]" * 900,  # parses, then refused by the depth walk
    ],
    ids=["deep-array", "deep-unterminated", "deep-object", "just-parseable"],
)
def test_deep_nesting_is_refused_not_crashed(body: bytes) -> None:
    with pytest.raises(McpProtocolError) as info:
        parse_jsonrpc(body)
    assert info.value.jsonrpc_code == INVALID_REQUEST


def test_huge_numbers_are_refused_quickly() -> None:
    started = time.perf_counter()
    for text in ("1" * 100_000, "-" + "9" * 100_000, "1" * 100_000 + ".5", "1e999999999"):
        with pytest.raises(McpProtocolError) as info:
            parse_jsonrpc(call_body({}).replace(b"{}", b'{"n":' + text.encode() + b"}"))
        assert info.value.jsonrpc_code == INVALID_REQUEST
    assert time.perf_counter() - started < 1.0


def test_a_long_float_literal_is_a_number() -> None:
    messages, _ = parse_jsonrpc(call_body({}).replace(b"{}", b'{"n":0.' + b"1" * 10_000 + b"}"))
    assert canonical_json(messages[0].arguments) == b'{"n":0.1111111111111111}'


def test_message_values() -> None:
    call = McpMessage(1, "tools/call", {"name": "x", "arguments": {"a": 1}})
    assert (call.tool_name, dict(call.arguments), call.is_notification) == ("x", {"a": 1}, False)
    bare = McpMessage(2, "tools/call", {"name": "x"})
    assert bare.arguments == {}
    other = McpMessage(None, "notifications/progress", {"name": "x", "arguments": {"a": 1}})
    assert (other.tool_name, other.arguments, other.is_notification) == (None, {}, True)
    with pytest.raises(TypeError):
        bare.arguments["a"] = 1  # type: ignore[index]


def test_parsed_params_serialise_again() -> None:
    """The gateway may forward part of a batch: what it parsed must re-serialise as is."""
    body = (
        b'[{"jsonrpc":"2.0","id":1,"method":"tools/call",'
        b'"params":{"name":"a","arguments":{"x":[1,2.5,null]}}},'
        b'{"jsonrpc":"2.0","method":"notifications/initialized"}]'
    )
    messages, _ = parse_jsonrpc(body)
    rebuilt = [
        {"jsonrpc": "2.0", "id": m.id, "method": m.method, "params": m.params}
        for m in messages
        if m.id is not None
    ]
    assert json.loads(json.dumps(rebuilt))[0] == json.loads(body)[0]


def test_errors_carry_reasons() -> None:
    with pytest.raises(McpProtocolError) as info:
        parse_jsonrpc(b'{"jsonrpc":"2.0","id":1,"method":"ping"')
    assert info.value.jsonrpc_code == PARSE_ERROR
    assert "line 1" in info.value.internal
    with pytest.raises(McpProtocolError) as info:
        parse_jsonrpc(
            b'[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","id":1,"result":1}]'
        )
    assert "batch entry 1" in info.value.detail


JSON_KEYS = st.text(st.characters(exclude_categories=["Cs"]), max_size=8)
JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**53) + 1, 2**53 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(st.characters(exclude_categories=["Cs"]), max_size=12),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(JSON_KEYS, inner, max_size=4),
    max_leaves=20,
)
ANY_JSON = st.recursive(
    st.one_of(JSON_SCALARS, st.integers(), st.floats(), st.text(max_size=12)),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@FAST
@given(st.binary(max_size=300))
def test_parse_fails_only_with_protocol_error_on_bytes(body: bytes) -> None:
    try:
        parse_jsonrpc(body)
    except McpProtocolError as err:
        code = err.jsonrpc_code
    else:
        return
    assert code in (PARSE_ERROR, INVALID_REQUEST)


VALID_BODY = (
    b'[{"jsonrpc":"2.0","id":1,"method":"tools/call",'
    b'"params":{"name":"a","arguments":{"x":[1,2.5,"\\u00e9"]}}},'
    b'{"jsonrpc":"2.0","method":"notifications/initialized"}]'
)


@FAST
@given(st.data())
def test_parse_fails_only_with_protocol_error_on_mutations(data: st.DataObject) -> None:
    body = bytearray(VALID_BODY)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(body)))
        kind = data.draw(st.sampled_from(["insert", "delete", "replace"]))
        byte = data.draw(st.sampled_from(list(b'{}[],:"\\0123456789.eE-+ntfu \x00\xff')))
        if kind == "insert":
            body.insert(at, byte)
        elif at < len(body):
            if kind == "delete":
                del body[at]
            else:
                body[at] = byte
    try:
        messages, _ = parse_jsonrpc(bytes(body))
    except McpProtocolError:
        return
    for message in messages:
        argument_digest(message.arguments)


@FAST
@given(ANY_JSON, st.booleans())
def test_any_json_parses_to_digestible_messages_or_fails_cleanly(value: Any, wrap: bool) -> None:
    """Whatever JSON arrives, an accepted message's arguments always digest (I-JSON)."""
    body = call_body(value) if wrap else json.dumps(value).encode("ascii")
    try:
        messages, _ = parse_jsonrpc(body, max_depth=64)
    except McpProtocolError:
        return
    for message in messages:
        argument_digest(message.arguments)


# --- MCP routing headers --------------------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    corpus("headers.yaml")["cases"],
    ids=lambda c: f"{c['body']}-{c.get('method')}-{c.get('name')}",
)
def test_header_corpus(case: dict[str, Any]) -> None:
    body = corpus("headers.yaml")["bodies"][case["body"]]
    messages, is_batch = parse_jsonrpc(body_of(body))
    if case["ok"]:
        check_mcp_headers(messages, is_batch, case.get("method"), case.get("name"))
        return
    with pytest.raises(McpHeaderMismatch) as info:
        check_mcp_headers(messages, is_batch, case.get("method"), case.get("name"))
    assert (info.value.code, info.value.status) == ("mcp_header_mismatch", 400)


def test_headers_need_exactly_one_message() -> None:
    check_mcp_headers([], False, None, None)
    with pytest.raises(McpHeaderMismatch):
        check_mcp_headers([], False, "tools/list", None)
    two = [McpMessage(1, "ping", {}), McpMessage(2, "ping", {})]
    with pytest.raises(McpHeaderMismatch):
        check_mcp_headers(two, False, "ping", None)


def test_mcp_tool_action() -> None:
    first = Action("search", Tier.READ, mcp_tool="search")
    tool = make_tool(
        (
            Action("http", Tier.READ, method="GET", path="/x"),
            first,
            Action("search-again", Tier.WRITE, mcp_tool="search"),
            Action("delete", Tier.ADMIN, mcp_tool="delete_repo"),
        ),
        ToolKind.MCP,
    )
    assert mcp_tool_action(tool, "search") is first
    assert mcp_tool_action(tool, "delete_repo") is tool.actions[3]
    for name in ("Search", "search ", "", "http", "delete"):
        assert mcp_tool_action(tool, name) is None


# --- digests: RFC 8785 known answers ------------------------------------------------------------


@pytest.mark.parametrize("doc", corpus("jcs.json")["documents"], ids=lambda d: d["source"])
def test_jcs_documents(doc: dict[str, str]) -> None:
    expected = doc["expected"].encode("utf-8")
    assert canonical_json(json.loads(doc["input"])) == expected
    if "expected_hex" in doc:
        assert bytes.fromhex(doc["expected_hex"]) == expected
    value = json.loads(doc["input"])
    if isinstance(value, dict):
        # The same answer through the gateway's path: body -> parse -> arguments -> digest.
        body = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"t","arguments":'
        messages, _ = parse_jsonrpc(body + doc["input"].encode("utf-8") + b"}}")
        assert canonical_json(messages[0].arguments) == expected
        digest = "sha256:" + hashlib.sha256(expected).hexdigest()
        assert argument_digest(messages[0].arguments) == digest


@pytest.mark.parametrize(
    "vector", corpus("jcs.json")["numbers"], ids=lambda v: f"{v['ieee754']}-{v['comment']}"
)
def test_jcs_numbers(vector: dict[str, str | None]) -> None:
    (number,) = struct.unpack(">d", bytes.fromhex(str(vector["ieee754"])))
    if vector["expected"] is None:
        with pytest.raises(ValueError, match="not representable"):
            canonical_json(number)
    else:
        assert canonical_json(number) == vector["expected"].encode("ascii")
        assert canonical_json({"n": number}) == b'{"n":' + vector["expected"].encode() + b"}"


def test_argument_digest_known_answers() -> None:
    assert argument_digest({}) == (
        "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
    )
    assert argument_digest({"title": "Crash", "labels": ["bug"]}) == (
        "sha256:5bf57ddfc72710ea64e72565dce84b11bc155de963e1885aa8c9a33219ec2a31"
    )


def test_action_digest_known_answers() -> None:
    # sha256 of {"action":"create_issue","arguments":{"labels":["bug"],"title":"Crash"},
    #            "resource":"octo/hello","tool":"github"}
    arguments = {"title": "Crash", "labels": ["bug"]}
    assert action_digest("github", "create_issue", "octo/hello", arguments) == (
        "sha256:e5832f3cea2889f2d1ffcc21a937641f6c9ca50dc4b4f43a1165a7deaa1d4048"
    )
    # ... {"action":"create_issue","arguments":{},"resource":null,"tool":"github"}
    assert action_digest("github", "create_issue", None, {}) == (
        "sha256:b335d7c78417124b79941c92437a6c3ebc915709f2786c6df17ee096ee4e331c"
    )


def test_action_digest_binds_every_field() -> None:
    base = ("github", "create_issue", "octo/hello", {"title": "Crash"})
    variants = [
        ("gitlab", *base[1:]),
        (base[0], "delete_repo", *base[2:]),
        (*base[:2], "octo/other", base[3]),
        (*base[:2], None, base[3]),
        (*base[:2], "", base[3]),
        (*base[:3], {"title": "Crash "}),
        (*base[:3], {"title": "Crash", "extra": None}),
        (*base[:3], {"title": ["Crash"]}),
    ]
    digests = {action_digest(*v) for v in [base, *variants]}  # type: ignore[arg-type]
    assert len(digests) == len(variants) + 1
    reordered = {"b": 1, "a": {"y": 2, "x": 3}}
    assert action_digest("t", "a", None, reordered) == action_digest(
        "t", "a", None, {"a": {"x": 3, "y": 2}, "b": 1}
    )


NOT_EXACT_JSON = {
    "nan": float("nan"),
    "inf": float("inf"),
    "-inf": -float("inf"),
    "2**53": 2**53,
    "-2**53": -(2**53),
    "10**400": 10**400,
    "lone-surrogate": "\ud800",
    "lone-surrogate-key": {"\udfff": 1},
    "int-key": {1: "a"},
    "tuple-key": {("a",): 1},
    "set": {"a": {1, 2}},
    "bytes": b"bytes",
    "bytearray": bytearray(b"x"),
    "decimal": Decimal("1.5"),
    "datetime": EPOCH,
    "object": object(),
    "nested-nan": [1, {"a": [float("nan")]}],
    "too-deep": functools.reduce(lambda v, _: [v], range(10_000), []),
}


@pytest.mark.parametrize("value", NOT_EXACT_JSON.values(), ids=NOT_EXACT_JSON.keys())
def test_canonical_json_refuses_what_is_not_exact_json(value: Any) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the documented contract is ValueError
        canonical_json(value)
    if isinstance(value, dict):
        with pytest.raises(ValueError):  # noqa: PT011
            argument_digest(value)


def test_canonical_json_accepts_mappings_tuples_and_str_enums() -> None:
    value = MappingProxyType({"b": (1, 2), "a": MappingProxyType({"t": Tier.READ})})
    assert canonical_json(value) == b'{"a":{"t":"read"},"b":[1,2]}'
    assert canonical_json(True) == b"true"
    assert canonical_json({"a": True}) != canonical_json({"a": 1})
    assert canonical_json(2**53 - 1) == b"9007199254740991"


def test_digest_input_checks() -> None:
    with pytest.raises(ValueError):  # noqa: PT011
        argument_digest([1, 2])  # type: ignore[arg-type]
    with pytest.raises(ValueError):  # noqa: PT011
        action_digest(1, "a", None, {})  # type: ignore[arg-type]
    with pytest.raises(ValueError):  # noqa: PT011
        action_digest("t", "a", 5, {})  # type: ignore[arg-type]
    with pytest.raises(ValueError):  # noqa: PT011
        action_digest("t", "a", None, [])  # type: ignore[arg-type]


def shuffled(value: Any, rng: random.Random) -> Any:
    if isinstance(value, dict):
        items = [(k, shuffled(v, rng)) for k, v in value.items()]
        rng.shuffle(items)
        return dict(items)
    if isinstance(value, list):
        return [shuffled(v, rng) for v in value]
    return value


@FAST
@given(
    st.dictionaries(JSON_KEYS, JSON_VALUES, max_size=6),
    st.randoms(use_true_random=False),
    st.sampled_from([None, 0, 1, 4, "\t"]),
    st.sampled_from([(",", ":"), (", ", ": "), (" ,\n", " :\r\n ")]),
    st.booleans(),
)
def test_digest_ignores_member_order_and_whitespace(
    arguments: dict[str, Any],
    rng: random.Random,
    indent: int | str | None,
    separators: tuple[str, str],
    ascii_only: bool,
) -> None:
    text = json.dumps(
        {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
         "params": {"name": "t", "arguments": shuffled(arguments, rng)}},
        indent=indent, separators=separators, ensure_ascii=ascii_only,
    )  # fmt: skip
    messages, _ = parse_jsonrpc(text.encode("utf-8"), max_depth=64)
    assert argument_digest(messages[0].arguments) == argument_digest(arguments)
    assert action_digest("t", "a", None, messages[0].arguments) == action_digest(
        "t", "a", None, arguments
    )


@FAST
@given(st.dictionaries(JSON_KEYS, JSON_VALUES, max_size=6), JSON_KEYS, JSON_VALUES)
def test_digest_changes_when_a_member_is_added(
    arguments: dict[str, Any], key: str, value: Any
) -> None:
    if key in arguments:
        return
    assert argument_digest({**arguments, key: value}) != argument_digest(arguments)
