"""From a request at the tool boundary to exactly one registered action, and its digest.

Three pieces, all pure (no I/O, no clock):

* :class:`HttpRouter` maps an HTTP method and raw path to the action whose method and path
  template match (DESIGN.md §3.5, issue 4 item 4). Anything it cannot map is a
  :class:`RouteError`, which the gateway answers with a deny.
* :func:`parse_jsonrpc` and :func:`check_mcp_headers` read an MCP streamable-HTTP POST body
  (JSON-RPC 2.0, https://www.jsonrpc.org/specification) and hold the routing headers of
  SEP-2243 (``Mcp-Method``, ``Mcp-Name``) to the body. :func:`mcp_tool_action` maps a
  ``tools/call`` to its action.
* :func:`canonical_json`, :func:`argument_digest` and :func:`action_digest` give the RFC 8785
  (JCS) form and SHA-256 digests that the audit records and an approval binds to.

Everything here is strict on purpose: when the gateway and the upstream could read a request
differently, the request is refused rather than guessed at.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

import rfc8785

from taskbound.core.model import Action, Tool
from taskbound.errors import ConfigError, TaskboundError

__all__ = [
    "INVALID_REQUEST",
    "MAX_PATH_LENGTH",
    "MAX_PATH_SEGMENTS",
    "MAX_SAFE_INTEGER",
    "NAME_BEARING_METHODS",
    "PARSE_ERROR",
    "HttpRouter",
    "McpHeaderMismatch",
    "McpMessage",
    "McpProtocolError",
    "RouteError",
    "RouteMatch",
    "action_digest",
    "argument_digest",
    "canonical_json",
    "check_mcp_headers",
    "mcp_tool_action",
    "parse_jsonrpc",
]

# --- errors ---------------------------------------------------------------------------------

#: JSON-RPC 2.0 §5.1: invalid JSON was received.
PARSE_ERROR: Final = -32700
#: JSON-RPC 2.0 §5.1: the JSON sent is not a valid Request object.
INVALID_REQUEST: Final = -32600


class RouteError(TaskboundError):
    """No registered action matches the request: it is denied."""

    code = "no_matching_action"
    status = 403
    default_detail = "no registered action matches this request"


class McpProtocolError(TaskboundError):
    """The body is not a JSON-RPC 2.0 request taskbound accepts.

    ``jsonrpc_code`` is :data:`PARSE_ERROR` (-32700) when the body is not JSON at all (not
    UTF-8, a syntax error, ``NaN``/``Infinity``) and :data:`INVALID_REQUEST` (-32600) for
    everything else.
    """

    code = "invalid_jsonrpc"
    status = 400
    default_detail = "the body is not a valid JSON-RPC 2.0 request"

    def __init__(
        self,
        detail: str | None = None,
        *,
        jsonrpc_code: int = INVALID_REQUEST,
        internal: str | None = None,
    ) -> None:
        super().__init__(detail, internal=internal)
        self.jsonrpc_code = jsonrpc_code


class McpHeaderMismatch(TaskboundError):
    """``Mcp-Method`` or ``Mcp-Name`` disagrees with the JSON-RPC body."""

    code = "mcp_header_mismatch"
    status = 400
    default_detail = "the MCP request headers do not match the body"


# --- HTTP: method + path template -> action -------------------------------------------------

#: Longest raw path (after the ``/{tool}`` prefix) the router looks at.
MAX_PATH_LENGTH: Final = 4096
#: Most ``/``-separated segments in a path.
MAX_PATH_SEGMENTS: Final = 64

_PARAMETER: Final = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_METHOD: Final = re.compile(r"[A-Z]+(?:-[A-Z]+)*")
# Refused anywhere in a raw path: controls, space, DEL and non-ASCII (a request-target is
# ASCII, RFC 9112 §3.2); "?" and "#" (a query or fragment is not part of the path); and a raw
# backslash, which URL parsers and some servers treat as "/" before any decoding.
_FORBIDDEN_RAW: Final = re.compile(r"[^\x21-\x7e]|[?#\\]")
_BAD_PERCENT: Final = re.compile(r"%(?![0-9A-Fa-f]{2})")
_SEPARATORS: Final = re.compile(r"[/\\]")


def _is_dot_segment(text: str) -> bool:
    # RFC 3986 §3.3 dot segments. A ";params" suffix is dropped first because servlet
    # containers strip it before normalising, which makes "..;" a traversal there.
    return text.split(";", 1)[0] in (".", "..")


def _decode_segment(raw: str) -> str:
    """One raw path segment, percent-decoded as UTF-8; raises :class:`RouteError`.

    Refuses malformed percent-encoding, bytes that are not UTF-8, NUL, and dot segments, raw
    or decoded. A decoded ``/`` or ``\\`` stays inside the segment, but the pieces it
    separates may not be dot segments either: an upstream that decodes ``%2F`` before it
    normalises would otherwise see a traversal.
    """
    if "%" not in raw:
        if _is_dot_segment(raw):
            raise RouteError(internal=f"dot segment {raw!r} in the path")
        return raw
    if _BAD_PERCENT.search(raw):
        raise RouteError(internal=f"malformed percent-encoding in path segment {raw[:100]!r}")
    try:
        text = _unquote(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise RouteError(internal=f"path segment {raw[:100]!r} is not UTF-8 once decoded") from None
    if "\x00" in text:
        raise RouteError(internal=f"path segment {raw[:100]!r} decodes to a NUL")
    if any(_is_dot_segment(piece) for piece in _SEPARATORS.split(text)):
        raise RouteError(internal=f"path segment {raw[:100]!r} decodes to a dot segment")
    return text


def _unquote(raw: str) -> bytes:
    # The caller has checked that every "%" starts a two-hex-digit escape and that the text
    # is ASCII, so this is exact (urllib's unquote would pass malformed escapes through).
    out = bytearray()
    parts = raw.split("%")
    out += parts[0].encode("ascii")
    for part in parts[1:]:
        out.append(int(part[:2], 16))
        out += part[2:].encode("ascii")
    return bytes(out)


def _split_path(path: str) -> tuple[str, ...]:
    """The decoded segments of a raw path; raises :class:`RouteError`."""
    if len(path) > MAX_PATH_LENGTH:
        raise RouteError(internal=f"path is {len(path)} characters, over {MAX_PATH_LENGTH}")
    if not path.startswith("/"):
        raise RouteError(internal=f"path {path[:100]!r} does not start with '/'")
    if path.count("/") > MAX_PATH_SEGMENTS:
        raise RouteError(internal=f"path has more than {MAX_PATH_SEGMENTS} segments")
    bad = _FORBIDDEN_RAW.search(path)
    if bad is not None:
        raise RouteError(internal=f"path has the character {bad.group()!r} at offset {bad.start()}")
    return tuple(_decode_segment(raw) for raw in path[1:].split("/"))


@dataclass(frozen=True)
class RouteMatch:
    """The action a request maps to, with its path parameters (percent-decoded)."""

    action: Action
    params: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class _Route:
    action: Action
    # One entry per segment: (parameter name, None) or (None, decoded literal).
    segments: tuple[tuple[str | None, str | None], ...]
    # Precedence: 0 for a literal segment, 1 for a parameter, compared left to right, so a
    # literal beats a parameter at the first position where two templates differ.
    rank: tuple[int, ...]
    order: int

    def bind(self, segments: Sequence[str]) -> dict[str, str] | None:
        params: dict[str, str] = {}
        for (name, literal), value in zip(self.segments, segments, strict=True):
            if name is None:
                if value != literal:
                    return None
            elif value:
                params[name] = value
            else:
                return None
        return params


def _compile(tool: Tool, order: int, action: Action) -> _Route:
    def bad(why: str) -> ConfigError:
        return ConfigError(f"tool {tool.id!r}, action {action.name!r}: {why}")

    method, path = action.method, action.path
    if method is None or path is None:
        raise bad("an HTTP action needs both a method and a path")
    if not _METHOD.fullmatch(method):
        raise bad(f"method {method!r} is not an upper-case HTTP method")
    if not path.startswith("/") or len(path) > MAX_PATH_LENGTH:
        raise bad(f"path template {path[:100]!r} must start with '/'")
    if path.count("/") > MAX_PATH_SEGMENTS or _FORBIDDEN_RAW.search(path):
        raise bad(f"path template {path[:100]!r} is not a valid path")
    segments: list[tuple[str | None, str | None]] = []
    for raw in path[1:].split("/"):
        parameter = _PARAMETER.fullmatch(raw)
        if parameter is not None:
            name = parameter.group(1)
            if any(name == seen for seen, _ in segments):
                raise bad(f"parameter {{{name}}} appears twice")
            segments.append((name, None))
        elif "{" in raw or "}" in raw:
            raise bad(f"segment {raw!r}: a parameter must be a whole segment, like {{name}}")
        else:
            try:
                segments.append((None, _decode_segment(raw)))
            except RouteError as err:
                raise bad(err.internal) from None
    rank = tuple(0 if name is None else 1 for name, _ in segments)
    return _Route(action, tuple(segments), rank, order)


class HttpRouter:
    """A tool's HTTP actions, compiled once; :meth:`match` maps a request to one of them.

    Matching rules: the method must be equal (``HEAD`` is not ``GET``); the raw path is split
    on ``/`` and each segment percent-decoded on its own, so ``%2F`` never makes a new
    segment; the segment count must equal the template's; literals compare case-sensitively
    with the decoded segment; ``{name}`` takes one whole non-empty segment. Among matching
    templates the one with a literal at the first position where they differ wins; identical
    templates resolve to the first in registry order.
    """

    __slots__ = ("_table",)

    def __init__(self, routes: Sequence[_Route]) -> None:
        table: dict[tuple[str, int], list[_Route]] = {}
        for route in routes:
            method = route.action.method
            assert method is not None
            table.setdefault((method, len(route.segments)), []).append(route)
        self._table: dict[tuple[str, int], tuple[_Route, ...]] = {
            key: tuple(sorted(group, key=lambda r: (r.rank, r.order)))
            for key, group in table.items()
        }

    @classmethod
    def for_tool(cls, tool: Tool) -> HttpRouter:
        """Compile every action of ``tool`` that has a method or a path.

        Raises :class:`~taskbound.errors.ConfigError` for a template the router cannot honour
        exactly (a partial-segment parameter, a repeated parameter name, a dot segment, bad
        percent-encoding, a lower-case method), so a registry mistake is loud rather than a
        route that silently never matches. MCP-only actions are skipped.
        """
        routes = [
            _compile(tool, order, action)
            for order, action in enumerate(tool.actions)
            if action.method is not None or action.path is not None
        ]
        return cls(routes)

    def match(self, method: str, path: str) -> RouteMatch:
        """The action for ``method`` and ``path``; raises :class:`RouteError`.

        ``path`` is the raw (still percent-encoded) request path after the ``/{tool}`` prefix,
        without the query string, as ASCII text (e.g. the ASGI ``raw_path`` decoded as
        latin-1, so that any non-ASCII byte is refused).
        """
        segments = _split_path(path)
        for route in self._table.get((method, len(segments)), ()):
            params = route.bind(segments)
            if params is not None:
                return RouteMatch(route.action, MappingProxyType(params))
        others = sorted(
            other
            for (other, count), routes in self._table.items()
            if count == len(segments)
            and other != method
            and any(r.bind(segments) is not None for r in routes)
        )
        why = f"; the path matches only {', '.join(others)}" if others else ""
        raise RouteError(internal=f"no {method[:32]!r} action for path {path[:200]!r}{why}")


# --- MCP: JSON-RPC 2.0 bodies ---------------------------------------------------------------

#: RFC 7493 (I-JSON) §2.2: integers beyond this cannot be exchanged, or digested (RFC 8785
#: §3.2.2.3), without loss; a body carrying one is refused rather than rounded.
MAX_SAFE_INTEGER: Final = 2**53 - 1
_SAFE_DIGITS: Final = len(str(MAX_SAFE_INTEGER))

#: SEP-2243: the methods whose ``Mcp-Name`` header mirrors a body parameter, and which one.
#: The first three are what the official SDK sends; the subscribe pair names a resource URI
#: as ``resources/read`` does.
NAME_BEARING_METHODS: Final[Mapping[str, str]] = MappingProxyType(
    {
        "tools/call": "name",
        "prompts/get": "name",
        "resources/read": "uri",
        "resources/subscribe": "uri",
        "resources/unsubscribe": "uri",
    }
)

_REQUEST_MEMBERS: Final = frozenset({"jsonrpc", "id", "method", "params"})
_EMPTY: Final[Mapping[str, Any]] = MappingProxyType({})
_SURROGATE: Final = re.compile("[\ud800-\udfff]")
# A lone surrogate can only come from a \uD800-\uDFFF escape: skip the walk for it otherwise.
_SURROGATE_ESCAPE: Final = re.compile(r"\\u[dD][89a-fA-F]")


@dataclass(frozen=True, slots=True)
class McpMessage:
    """One JSON-RPC request or notification from an MCP client.

    ``params`` is ``{}`` when the message had none. Treat it as read-only: it is the parsed
    body, kept as plain ``dict``/``list`` values so that it can be serialised again.
    """

    id: str | int | None
    method: str
    params: Mapping[str, Any]

    @property
    def is_notification(self) -> bool:
        return self.id is None

    @property
    def tool_name(self) -> str | None:
        """``params.name`` of a ``tools/call``; ``None`` for any other method."""
        if self.method != "tools/call":
            return None
        name = self.params.get("name")
        return name if isinstance(name, str) else None

    @property
    def arguments(self) -> Mapping[str, Any]:
        """``params.arguments`` of a ``tools/call`` (``{}`` when absent or another method)."""
        if self.method != "tools/call":
            return _EMPTY
        arguments = self.params.get("arguments")
        return arguments if isinstance(arguments, Mapping) else _EMPTY


class _Scan:
    """Hooks for :func:`json.loads` that note what taskbound refuses instead of raising, so
    that a syntax error anywhere in the body still wins and is reported as -32700."""

    __slots__ = ("not_json", "problem")

    def __init__(self) -> None:
        self.not_json: str | None = None
        self.problem: str | None = None

    def _note(self, problem: str) -> None:
        if self.problem is None:
            self.problem = problem

    def pairs(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(pairs)
        if len(obj) != len(pairs):
            seen: set[str] = set()
            for key, _ in pairs:
                if key in seen:
                    self._note(f"duplicate member {key[:100]!r} in an object")
                    break
                seen.add(key)
        return obj

    def integer(self, text: str) -> int:
        # Length first: int() on a long digit string is slow, and refused past 4,300 digits.
        value = int(text) if len(text.lstrip("-")) <= _SAFE_DIGITS else None
        if value is None or abs(value) > MAX_SAFE_INTEGER:
            self._note(f"integer {text[:40]} is outside ±(2**53 - 1) (RFC 7493 §2.2)")
            return 0
        return value

    def number(self, text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            self._note(f"number {text[:40]} is too large for a double (RFC 7493 §2.2)")
            return 0.0
        return value

    def constant(self, text: str) -> None:
        if self.not_json is None:
            self.not_json = f"{text} is not JSON (RFC 8259 §6)"


def _invalid(detail: str, internal: str | None = None) -> McpProtocolError:
    return McpProtocolError(detail, jsonrpc_code=INVALID_REQUEST, internal=internal)


def _check_tree(document: Any, max_depth: int, surrogates: bool) -> None:
    """Nesting at most ``max_depth`` containers deep; no lone surrogates (RFC 7493 §2.1).

    Iterative, so a document just under the interpreter's recursion limit cannot overflow.
    """
    stack: list[tuple[Any, int]] = [(document, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            if depth > max_depth:
                raise _invalid(f"the JSON is nested more than {max_depth} levels deep")
            for key, item in value.items():
                if surrogates and _SURROGATE.search(key):
                    raise _invalid("a member name has an unpaired surrogate (RFC 7493 §2.1)")
                stack.append((item, depth + 1))
        elif isinstance(value, list):
            if depth > max_depth:
                raise _invalid(f"the JSON is nested more than {max_depth} levels deep")
            stack.extend((item, depth + 1) for item in value)
        elif surrogates and isinstance(value, str) and _SURROGATE.search(value):
            raise _invalid("a string has an unpaired surrogate (RFC 7493 §2.1)")


def _message(obj: Any, index: int | None) -> McpMessage:
    where = "" if index is None else f"batch entry {index}: "
    if not isinstance(obj, dict):
        raise _invalid(f"{where}a JSON-RPC message must be an object")
    if "method" not in obj and ("result" in obj or "error" in obj):
        raise _invalid(f"{where}a JSON-RPC response is not accepted here")
    unexpected = obj.keys() - _REQUEST_MEMBERS
    if unexpected:
        raise _invalid(f"{where}unexpected member {min(unexpected)[:100]!r}")
    if obj.get("jsonrpc") != "2.0":
        raise _invalid(f'{where}"jsonrpc" must be "2.0"')
    method = obj.get("method")
    if not isinstance(method, str) or not method:
        raise _invalid(f'{where}"method" must be a non-empty string')
    params = obj.get("params", _EMPTY)
    if not isinstance(params, Mapping):
        raise _invalid(f'{where}"params" must be an object when present')
    if "id" in obj:
        message_id = obj["id"]
        if isinstance(message_id, bool) or not isinstance(message_id, str | int):
            raise _invalid(f'{where}"id" must be a string or an integer')
    else:
        message_id = None
        # MCP names every notification notifications/…; anything else without an id would be
        # a request the gateway never answers, or a call nobody decided.
        if not method.startswith("notifications/"):
            raise _invalid(f"{where}{method[:100]!r} needs an id: it is not a notification")
    if method == "tools/call":
        if not isinstance(params.get("name"), str):
            raise _invalid(f'{where}tools/call needs "params.name" as a string')
        if not isinstance(params.get("arguments", _EMPTY), Mapping):
            raise _invalid(f'{where}tools/call "params.arguments" must be an object')
    return McpMessage(message_id, method, dict(params) if params is _EMPTY else params)


def parse_jsonrpc(
    body: bytes, *, max_batch: int = 32, max_depth: int = 32
) -> tuple[list[McpMessage], bool]:
    """The messages of a JSON-RPC 2.0 request body, and whether it was a batch.

    The body is strict UTF-8 JSON (RFC 8259; no byte-order mark): a request or notification
    object, or a non-empty array of at most ``max_batch`` of them. Each has
    ``"jsonrpc": "2.0"``, a non-empty string ``method``, ``params`` absent or an object, and
    ``id`` absent (only for ``notifications/…`` methods) or a string or integer; no other
    members. ``tools/call`` needs a string ``params.name`` and ``params.arguments`` absent or
    an object. Also refused: responses, duplicate member names, ids repeated within a batch,
    more than ``max_depth`` nested containers (the top-level value counts as one), and what
    I-JSON (RFC 7493) excludes so that :func:`argument_digest` never fails on a parsed
    message: integers beyond ±(2**53 - 1), numbers that overflow a double, lone surrogates.

    Raises :class:`McpProtocolError` and nothing else: ``jsonrpc_code`` -32700 when the body
    is not JSON, -32600 otherwise.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise McpProtocolError(
            "the body is not UTF-8",
            jsonrpc_code=PARSE_ERROR,
            internal=f"invalid UTF-8 at byte {err.start}",
        ) from None
    scan = _Scan()
    try:
        document = json.loads(
            text,
            object_pairs_hook=scan.pairs,
            parse_int=scan.integer,
            parse_float=scan.number,
            parse_constant=scan.constant,
        )
    except json.JSONDecodeError as err:
        raise McpProtocolError(
            "the body is not JSON",
            jsonrpc_code=PARSE_ERROR,
            internal=f"{err.msg}: line {err.lineno} column {err.colno}",
        ) from None
    except RecursionError:
        raise _invalid(f"the JSON is nested more than {max_depth} levels deep") from None
    except ValueError as err:  # a hook's conversion failed: treat it as unparseable
        raise McpProtocolError(
            "the body is not JSON", jsonrpc_code=PARSE_ERROR, internal=str(err)[:200]
        ) from None
    if scan.not_json is not None:
        raise McpProtocolError(
            "the body is not JSON", jsonrpc_code=PARSE_ERROR, internal=scan.not_json
        )
    if scan.problem is not None:
        raise _invalid(scan.problem)
    surrogates = _SURROGATE_ESCAPE.search(text) is not None
    # Fewer brackets than the limit cannot nest past it: skip the walk for the common case.
    if surrogates or text.count("{") + text.count("[") > max_depth:
        _check_tree(document, max_depth, surrogates)
    if isinstance(document, dict):
        return [_message(document, None)], False
    if not isinstance(document, list):
        raise _invalid("the body must be a JSON-RPC object or a batch array of them")
    if not document:
        raise _invalid("an empty batch is not a request")
    if len(document) > max_batch:
        raise _invalid(f"a batch may hold at most {max_batch} messages")
    messages = [_message(item, index) for index, item in enumerate(document)]
    seen: set[tuple[bool, str | int]] = set()
    for index, message in enumerate(messages):
        if message.id is None:
            continue
        key = (isinstance(message.id, str), message.id)
        if key in seen:
            raise _invalid(f"batch entry {index}: id {message.id!r} is used twice")
        seen.add(key)
    return messages, True


def _decode_header_value(value: str) -> str | None:
    """SEP-2243 header value: verbatim, or ``=?base64?…?=`` around canonical base64 of UTF-8
    (how clients carry names that are not plain printable ASCII). ``None`` when malformed."""
    if not (value.startswith("=?base64?") and value.endswith("?=") and len(value) >= 11):
        return value
    payload = value[9:-2]
    try:
        raw = base64.b64decode(payload, validate=True)
        if base64.b64encode(raw).decode("ascii") != payload:
            return None
        return raw.decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None


def check_mcp_headers(
    messages: Sequence[McpMessage],
    is_batch: bool,
    mcp_method: str | None,
    mcp_name: str | None,
) -> None:
    """Hold the SEP-2243 routing headers to the body; raises :class:`McpHeaderMismatch`.

    A header that is absent is not checked. When given, on a single message, ``Mcp-Method``
    must equal ``method`` exactly and ``Mcp-Name`` (after its base64 sentinel is decoded)
    must equal the body parameter named in :data:`NAME_BEARING_METHODS`; ``Mcp-Name`` on any
    other method is a mismatch. On a batch either header is a mismatch: it cannot describe
    every message. The caller must refuse a routing header sent more than once before this.
    """
    if mcp_method is None and mcp_name is None:
        return
    if is_batch or len(messages) != 1:
        raise McpHeaderMismatch(
            "Mcp-Method and Mcp-Name are not allowed on a batch",
            internal=f"routing headers on a batch of {len(messages)}",
        )
    message = messages[0]
    if mcp_method is not None and mcp_method != message.method:
        raise McpHeaderMismatch(
            "the Mcp-Method header does not match the body's method",
            internal=f"Mcp-Method {mcp_method[:100]!r}, body method {message.method[:100]!r}",
        )
    if mcp_name is None:
        return
    key = NAME_BEARING_METHODS.get(message.method)
    if key is None:
        raise McpHeaderMismatch(
            f"the Mcp-Name header is not allowed on {message.method[:100]!r}",
            internal=f"Mcp-Name {mcp_name[:100]!r} on method {message.method[:100]!r}",
        )
    expected = message.params.get(key)
    if not isinstance(expected, str) or _decode_header_value(mcp_name) != expected:
        raise McpHeaderMismatch(
            f"the Mcp-Name header does not match the body's params.{key}",
            internal=f"Mcp-Name {mcp_name[:100]!r}, body params.{key} {str(expected)[:100]!r}",
        )


def mcp_tool_action(tool: Tool, name: str) -> Action | None:
    """The action of ``tool`` whose ``mcp_tool`` is ``name`` (the first, in registry order,
    should the registry hold two), or ``None``: an unknown tool name is denied."""
    for action in tool.actions:
        if action.mcp_tool is not None and action.mcp_tool == name:
            return action
    return None


# --- digests --------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """``value`` as the dict/list/scalar tree rfc8785 takes; raises ``ValueError``."""
    if value is None or isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"object member name {key!r} is not a string")
            out[key] = _plain(item)
        return out
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    raise ValueError(f"{type(value).__name__} is not a JSON value")


def canonical_json(value: Any) -> bytes:
    """The RFC 8785 (JCS) serialisation of ``value``, as UTF-8.

    Takes ``None``, ``bool``, ``int``, ``float``, ``str``, mappings with string keys, lists
    and tuples. Raises ``ValueError`` for anything JCS cannot represent exactly: another
    type, a non-string key, NaN or an infinity, an integer beyond ±(2**53 - 1) (§3.2.2.3),
    a string with a lone surrogate.
    """
    try:
        return rfc8785.dumps(_plain(value))
    except RecursionError:
        raise ValueError("the value is nested too deeply to canonicalise") from None


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def argument_digest(arguments: Mapping[str, Any]) -> str:
    """``"sha256:"`` + hex SHA-256 of :func:`canonical_json` of ``arguments``.

    Independent of member order and whitespace in the body. Raises ``ValueError`` when
    ``arguments`` is not a mapping or holds a value :func:`canonical_json` refuses (never
    for the arguments of a message :func:`parse_jsonrpc` accepted).
    """
    if not isinstance(arguments, Mapping):
        raise ValueError("arguments must be a JSON object")
    return _sha256(canonical_json(arguments))


def action_digest(
    tool: str, action: str, resource: str | None, arguments: Mapping[str, Any]
) -> str:
    """What an approval binds to: ``"sha256:"`` + hex SHA-256 of the JCS form of
    ``{"tool", "action", "resource", "arguments"}`` (``resource`` ``null`` when ``None``).

    Raises ``ValueError`` as :func:`argument_digest` does, or when a name is not a string.
    This and :func:`argument_digest` share one hash space: never compare one to the other.
    """
    if not isinstance(tool, str) or not isinstance(action, str):
        raise ValueError("tool and action must be strings")
    if resource is not None and not isinstance(resource, str):
        raise ValueError("resource must be a string or None")
    if not isinstance(arguments, Mapping):
        raise ValueError("arguments must be a JSON object")
    document = {"tool": tool, "action": action, "resource": resource, "arguments": arguments}
    return _sha256(canonical_json(document))
