"""HTTP plumbing shared by the broker's endpoints: RFC 9457 problem documents, OAuth
error bodies (RFC 6749 §5.2), size limits and strict JSON bodies."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import parse_qsl

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from taskbound.errors import (
    HeadersTooLarge,
    InvalidRequest,
    PayloadTooLarge,
    TaskboundError,
    UnknownField,
    UnsupportedMediaType,
)

log = logging.getLogger("taskbound.http")

M = TypeVar("M", bound=BaseModel)

NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def problem(err: TaskboundError, **extra: Any) -> JSONResponse:
    """An RFC 9457 problem document with taskbound's stable ``code``."""
    body: dict[str, Any] = {
        "type": f"https://taskbound.dev/problems/{err.code}",
        "title": err.code.replace("_", " "),
        "status": err.status,
        "code": err.code,
        "detail": err.detail,
    }
    body.update(extra)
    headers = dict(NO_STORE)
    if err.status == 401:
        headers["WWW-Authenticate"] = 'Bearer error="invalid_token"'
    return JSONResponse(
        body, status_code=err.status, media_type="application/problem+json", headers=headers
    )


_OAUTH_CODES = {
    "invalid_request": "invalid_request",
    "unknown_field": "invalid_request",
    "payload_too_large": "invalid_request",
    "unsupported_media_type": "invalid_request",
    "invalid_admin_token": "invalid_client",
    "unsupported_grant_type": "unsupported_grant_type",
    "unauthenticated": "invalid_client",
}


def oauth_error(err: TaskboundError) -> JSONResponse:
    """RFC 6749 §5.2 error body, for the OAuth endpoints."""
    code = _OAUTH_CODES.get(err.code, "invalid_request")
    # RFC 6749 §5.2: 400 for every error but invalid_client (401); we are down: 503.
    status = 401 if code == "invalid_client" else (400 if err.status < 500 else 503)
    headers = dict(NO_STORE)
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="taskbound"'
    return JSONResponse(
        {"error": code, "error_description": err.detail}, status_code=status, headers=headers
    )


def log_refusal(request: Request, err: TaskboundError) -> None:
    level = logging.ERROR if err.status >= 500 else logging.WARNING
    log.log(
        level,
        "request refused",
        extra={
            "event": "request.refused",
            "method": request.method,
            "path": request.url.path,
            "status": err.status,
            "code": err.code,
            "reason": err.internal,
        },
    )


class LimitsMiddleware:
    """Refuses oversized header blocks (431) and bodies (413) before any handler runs.

    The body is read through a counting ``receive`` so a lying or absent Content-Length
    cannot get more than ``max_body`` bytes past it.
    """

    def __init__(
        self, app: ASGIApp, *, max_body: int | Callable[[str], int | None], max_headers: int
    ) -> None:
        self.app = app
        # One limit, or one per path (the gateway takes larger bodies than the broker).
        self.max_body_for = max_body if callable(max_body) else (lambda _path: max_body)
        self.max_headers = max_headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        size = sum(len(k) + len(v) + 4 for k, v in scope["headers"])
        if size > self.max_headers:
            await problem(HeadersTooLarge())(scope, receive, send)
            return
        max_body = self.max_body_for(scope.get("path", ""))
        if max_body is None:
            # This path enforces (and audits) its own body limit.
            await self.app(scope, receive, send)
            return
        for key, value in scope["headers"]:
            if key == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await problem(InvalidRequest("bad Content-Length"))(scope, receive, send)
                    return
                if declared > max_body:
                    await problem(PayloadTooLarge())(scope, receive, send)
                    return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > max_body:
                    raise PayloadTooLarge()
            return message

        await self.app(scope, limited, send)


async def read_json(request: Request, model: type[M]) -> M:
    """Parse a JSON object body into ``model`` (unknown fields refused)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise UnsupportedMediaType()
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        # ValueError covers malformed JSON, bad UTF-8 and integers too long to convert;
        # RecursionError, nesting deeper than the parser allows.
        raise InvalidRequest(f"the body is not valid JSON: {exc.__class__.__name__}") from None
    if not isinstance(data, dict):
        raise InvalidRequest("the body must be a JSON object")
    _check_text(data)
    return validate(model, data)


def _check_text(value: Any, depth: int = 0) -> None:
    """Refuse text no store can keep faithfully: NUL characters and lone surrogates."""
    if depth > 32:
        raise InvalidRequest("the body is nested too deeply")
    if isinstance(value, str):
        if "\x00" in value or any("\ud800" <= ch <= "\udfff" for ch in value):
            raise InvalidRequest("text must not contain NUL characters or lone surrogates")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(key, depth + 1)
            _check_text(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_text(item, depth + 1)


def flag(value: str | None, name: str) -> bool:
    """A boolean query parameter: absent, 0/false or 1/true; anything else is refused."""
    if value is None or value in ("0", "false"):
        return False
    if value in ("1", "true"):
        return True
    raise InvalidRequest(f"{name} must be true or false")


def validate(model: type[M], data: Any) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        fields = [".".join(str(p) for p in e["loc"]) for e in errors]
        if any(e["type"] == "extra_forbidden" for e in errors):
            unknown = [
                f for f, e in zip(fields, errors, strict=True) if e["type"] == "extra_forbidden"
            ]
            raise UnknownField(f"unknown field(s): {', '.join(unknown)}") from None
        first = errors[0]
        raise InvalidRequest(f"{fields[0] or 'body'}: {first['msg']}") from None


async def read_form(request: Request, *, max_fields: int = 20) -> dict[str, str]:
    """An ``application/x-www-form-urlencoded`` body (RFC 6749 endpoints). A repeated
    parameter is an error (RFC 6749 §3.1)."""
    return {k: v[0] for k, v in (await read_form_lists(request, max_fields=max_fields)).items()}


async def read_form_lists(
    request: Request, *, max_fields: int = 20, repeatable: frozenset[str] = frozenset()
) -> dict[str, list[str]]:
    """A form body whose ``repeatable`` parameters may appear several times (RFC 8693
    ``resource`` and ``audience``); any other repeated parameter is an error."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/x-www-form-urlencoded":
        raise UnsupportedMediaType("the body must be application/x-www-form-urlencoded")
    try:
        text = (await request.body()).decode("ascii")
        pairs = parse_qsl(
            text, keep_blank_values=True, strict_parsing=bool(text), max_num_fields=max_fields
        )
    except (UnicodeDecodeError, ValueError):
        raise InvalidRequest("the form body is malformed") from None
    out: dict[str, list[str]] = {}
    for key, value in pairs:
        if key in out and key not in repeatable:
            raise InvalidRequest(f"parameter {key!r} is repeated")
        out.setdefault(key, []).append(value)
    return out


def bearer(request: Request, scheme: str = "bearer") -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    kind, _, value = header.partition(" ")
    if kind.lower() != scheme or not value.strip():
        return None
    return value.strip()


def json_response(data: Any, status: int = 200, *, no_store: bool = False) -> Response:
    return JSONResponse(data, status_code=status, headers=NO_STORE if no_store else None)
