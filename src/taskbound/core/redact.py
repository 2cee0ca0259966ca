"""What of a call's arguments its audit record keeps (docs/audit-format.md, ``arguments``).

:func:`redact` turns the arguments of a call into the value its record carries:

* the value of an object member whose name matches one of ``keys`` — case-insensitive
  :mod:`fnmatch` patterns such as ``*password*``, at any depth — becomes
  :data:`REDACTED`, whatever it was (a string, a number, a whole object);
* so does the value at each of ``paths``: RFC 6901 JSON Pointers (``/body/card_number``,
  ``/items/0/note``), where a reference token ``*`` stands for any member or index;
* a string longer than ``max_string_chars`` is cut, ending in :data:`CUT`; a container
  nested more than ``max_depth`` deep becomes :data:`TOO_DEEP`;
* what JSON cannot carry becomes a marker of its type (``"[bytes]"``, ``"[float]"`` for
  NaN and the infinities); a member whose name is not a string is never shown
  (``{"[int]": "[redacted]"}``); an integer beyond ±(2**53 - 1), which RFC 8785 cannot
  carry exactly, is kept as its decimal digits; NUL characters and lone surrogates, which
  no store keeps, become U+FFFD;
* when the RFC 8785 form of the result is longer than ``max_bytes``, the record carries
  ``{"truncated": true, "bytes": N}`` instead (N the length it would have had), never a
  value cut in the middle.

The result is always a value RFC 8785 serialises. Pure: no I/O, and it never raises for
any value it is given.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from fnmatch import translate
from typing import Any, Final

import rfc8785

__all__ = [
    "CUT",
    "DEFAULT_REDACT_KEYS",
    "MAX_DEPTH",
    "MAX_STRING_CHARS",
    "REDACTED",
    "TOO_DEEP",
    "RedactionRules",
    "parse_pointer",
    "redact",
]

REDACTED: Final = "[redacted]"
TOO_DEEP: Final = "[too deep]"
#: The end of a string that was cut (as a long ``detail`` is cut).
CUT: Final = "…[truncated]"
MAX_STRING_CHARS: Final = 1024
MAX_DEPTH: Final = 16

#: The member names whose values are never recorded unless an operator says otherwise.
DEFAULT_REDACT_KEYS: Final = (
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

_MAX_SAFE_INTEGER: Final = 2**53 - 1
# Past this, the decimal form of an integer is long and slow to make (and Python refuses
# more than 4,300 digits): the integer is a marker.
_MAX_INTEGER_BITS: Final = 10_000
_SURROGATE: Final = re.compile("[\ud800-\udfff]")
_BAD_ESCAPE: Final = re.compile("~(?![01])")

# The unconsumed reference tokens of each pointer still on the way to the current value.
_Pointers = tuple[tuple[str, ...], ...]


def parse_pointer(pointer: str) -> tuple[str, ...]:
    """The reference tokens of an RFC 6901 JSON Pointer (§3), unescaped (§4): ``~1`` is
    ``/`` and ``~0`` is ``~``. ``""`` (the whole value) has none.

    ``ValueError`` for text that is not a JSON Pointer: one that does not start with ``/``,
    or holds a ``~`` not followed by ``0`` or ``1``.
    """
    if pointer == "":
        return ()
    if not pointer.startswith("/"):
        raise ValueError(f"{pointer!r} is not a JSON Pointer: it must start with '/' (RFC 6901)")
    tokens = pointer[1:].split("/")
    for token in tokens:
        if _BAD_ESCAPE.search(token):
            raise ValueError(
                f"{pointer!r} is not a JSON Pointer: '~' must be followed by 0 or 1 (RFC 6901 §3)"
            )
    return tuple(t.replace("~1", "/").replace("~0", "~") for t in tokens)


@dataclass(frozen=True, slots=True)
class RedactionRules:
    """What :func:`redact` hides and how far it goes. Built once (the patterns and pointers
    are compiled here: ``ValueError`` for a path that is not a JSON Pointer)."""

    keys: tuple[str, ...] = DEFAULT_REDACT_KEYS
    paths: tuple[str, ...] = ()
    max_string_chars: int = MAX_STRING_CHARS
    max_depth: int = MAX_DEPTH
    _key_pattern: re.Pattern[str] | None = field(init=False, repr=False, compare=False)
    _pointers: tuple[tuple[str, ...], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_string_chars < len(CUT) + 1:
            raise ValueError(f"max_string_chars must be at least {len(CUT) + 1}")
        pattern = "|".join(f"(?:{translate(k.lower())})" for k in self.keys)
        object.__setattr__(self, "_key_pattern", re.compile(pattern) if self.keys else None)
        object.__setattr__(self, "_pointers", tuple(parse_pointer(p) for p in self.paths))

    def secret_key(self, name: str) -> bool:
        """Whether a member called ``name`` has its value redacted (case-insensitive)."""
        return self._key_pattern is not None and self._key_pattern.match(name.lower()) is not None


def redact(value: object, rules: RedactionRules, max_bytes: int) -> Any:
    """``value`` as an audit record carries it (see the module): at most ``max_bytes`` in
    its RFC 8785 form, or ``{"truncated": true, "bytes": N}``."""
    out = _value(value, rules, 0, rules._pointers)
    size = len(rfc8785.dumps(out))
    if size > max_bytes:
        return {"truncated": True, "bytes": size}
    return out


def _value(value: object, rules: RedactionRules, depth: int, pointers: _Pointers) -> Any:
    if () in pointers:
        return REDACTED
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return _text(str.__str__(value), rules.max_string_chars)
    if isinstance(value, int):
        return _integer(int.__int__(value), rules.max_string_chars)
    if isinstance(value, float):
        number = float.__float__(value)
        return number if math.isfinite(number) else "[float]"
    if isinstance(value, Mapping):
        if depth >= rules.max_depth:
            return TOO_DEEP
        return _object(value.items(), rules, depth, pointers)
    if isinstance(value, list | tuple):
        if depth >= rules.max_depth:
            return TOO_DEEP
        return [
            _value(item, rules, depth + 1, _step(pointers, str(index)))
            for index, item in enumerate(value)
        ]
    return f"[{type(value).__name__}]"


def _object(
    members: Iterable[tuple[object, object]], rules: RedactionRules, depth: int, pointers: _Pointers
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, item in members:
        if not isinstance(key, str):
            # Not JSON: a name no pattern can be trusted to match, so its value is hidden.
            out[f"[{type(key).__name__}]"] = REDACTED
            continue
        member = str.__str__(key)
        name = _clean(member)
        if rules.secret_key(member):
            out[name] = REDACTED
        else:
            out[name] = _value(item, rules, depth + 1, _step(pointers, member))
    return out


def _step(pointers: _Pointers, token: str) -> _Pointers:
    """The rest of each pointer that goes through the member or index ``token``."""
    if not pointers:
        return pointers
    return tuple(p[1:] for p in pointers if p[0] == token or p[0] == "*")


def _clean(text: str) -> str:
    """``text`` without what no store keeps and RFC 8785 refuses: NUL, lone surrogates."""
    if not text.isascii():
        text = _SURROGATE.sub("\ufffd", text)
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    return text


def _text(text: str, limit: int) -> str:
    text = _clean(text)
    if len(text) > limit:
        return text[: limit - len(CUT)] + CUT
    return text


def _integer(number: int, limit: int) -> int | str:
    if -_MAX_SAFE_INTEGER <= number <= _MAX_SAFE_INTEGER:
        return number
    # RFC 8785 §3.2.2.3 carries integers exactly only up to 2**53 - 1: keep the digits.
    if number.bit_length() > _MAX_INTEGER_BITS:
        return "[int]"
    return _text(str(number), limit)
