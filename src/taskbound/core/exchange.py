"""Delegation by token exchange (RFC 8693): what a delegated credential may carry.

Pure: given the parent credential's claims and what the request asks for, decide the
child's tool, tier, actions and constraints — each equal to or narrower than the
parent's, never wider, whatever is asked — or refuse with the RFC 8693 / RFC 6749 error.
Nothing here does I/O.

Narrowing rules:

* audience: the child names the parent's one tool. ``resource`` (RFC 8707) must be the
  parent's audience URI, ``audience`` its audience or tool id; anything else is
  ``invalid_target``.
* scope: ``<tool>:<tier>`` must be the parent's (tiers never mix); other scope tokens are
  action names, each among the parent's actions (``invalid_scope`` otherwise); when named,
  they are the child's actions.
* ``authorization_details`` (RFC 9396, type ``taskbound_tool``): at most one entry, same
  tool and tier, actions among the parent's (intersected with the scope's), constraints
  only narrowing: every parent constraint kept (a list may become a non-empty subset of
  itself, or one of its members), new ones added.
* depth: the chain (RFC 8693 §4.1 ``act``) may not exceed the configured maximum, an
  agent already in the chain cannot be added again, and a parent naming ``may_act``
  admits only that actor (``invalid_grant``).
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import rfc8785

from taskbound.core.tokens import AUTHORIZATION_DETAILS_TYPE, CredentialClaims

GRANT_TYPE: Final = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN_TYPE: Final = "urn:ietf:params:oauth:token-type:access_token"  # noqa: S105 - a URN, not a secret
JWT_TOKEN_TYPE: Final = "urn:ietf:params:oauth:token-type:jwt"  # noqa: S105 - a URN, not a secret
ID_TOKEN_TYPE: Final = "urn:ietf:params:oauth:token-type:id_token"  # noqa: S105 - a URN, not a secret
ACTOR_TOKEN_TYPES: Final = frozenset({JWT_TOKEN_TYPE, ID_TOKEN_TYPE})
MAX_DETAILS_LENGTH: Final = 8192


class ExchangeRefused(Exception):
    """An RFC 8693 §2.2.2 / RFC 6749 §5.2 error: ``error`` is the code, ``description``
    safe to show, ``internal`` the full reason for the log and the audit."""

    def __init__(self, error: str, description: str, internal: str | None = None) -> None:
        super().__init__(description)
        self.error = error
        self.description = description
        self.internal = internal or description


@dataclass(frozen=True, slots=True)
class Narrowing:
    """What the request asks the child credential to be narrowed to."""

    resources: Sequence[str] = ()
    audiences: Sequence[str] = ()
    scope: str | None = None
    authorization_details: str | None = None  # the raw JSON parameter


def narrowing_digest(narrowing: Narrowing) -> str:
    """What a parent's consent proof binds (its ``tb_narrowing`` claim): the base64url
    SHA-256 of the RFC 8785 JSON of the request's narrowing parameters exactly as sent —
    ``audience`` and ``resource`` (sorted), ``scope`` and ``authorization_details`` (the
    raw strings, or null)."""
    body = {
        "audience": sorted(narrowing.audiences),
        "resource": sorted(narrowing.resources),
        "scope": narrowing.scope,
        "authorization_details": narrowing.authorization_details,
    }
    digest = hashlib.sha256(rfc8785.dumps(body)).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


@dataclass(frozen=True, slots=True)
class ChildScope:
    tool: str
    tier: str
    actions: tuple[str, ...]
    constraints: dict[str, Any]
    depth: int


def _narrower_value(parent: Any, child: Any) -> bool:
    if child == parent:
        return True
    if isinstance(parent, list):
        if isinstance(child, str):
            return child in parent
        if isinstance(child, list) and child:
            return all(isinstance(v, str) and v in parent for v in child)
    return False


def _details(raw: str, parent: CredentialClaims) -> tuple[tuple[str, ...] | None, dict[str, Any]]:
    if len(raw) > MAX_DETAILS_LENGTH:
        raise ExchangeRefused("invalid_request", "authorization_details is too large")
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        raise ExchangeRefused("invalid_request", "authorization_details is not JSON") from None
    if not isinstance(value, list) or len(value) > 1:
        raise ExchangeRefused(
            "invalid_request", "authorization_details must be an array of at most one entry"
        )
    if not value:
        return None, {}
    entry = value[0]
    if not isinstance(entry, dict) or entry.get("type") != AUTHORIZATION_DETAILS_TYPE:
        raise ExchangeRefused(
            "invalid_request", f"authorization_details entries must be {AUTHORIZATION_DETAILS_TYPE}"
        )
    unknown = set(entry) - {"type", "tool", "tier", "actions", "constraints"}
    if unknown:
        raise ExchangeRefused(
            "invalid_request", f"unknown authorization_details members: {sorted(unknown)}"
        )
    if "tool" in entry and entry["tool"] != parent.tool:
        raise ExchangeRefused("invalid_target", "a delegated credential keeps its parent's tool")
    if "tier" in entry and entry["tier"] != parent.tier.value:
        raise ExchangeRefused("invalid_scope", "a delegated credential keeps its parent's tier")
    actions = None
    if "actions" in entry:
        named = entry["actions"]
        if not isinstance(named, list) or not all(isinstance(a, str) for a in named):
            raise ExchangeRefused("invalid_request", "authorization_details actions is not names")
        actions = tuple(named)
    constraints = entry.get("constraints", {})
    if not isinstance(constraints, dict):
        raise ExchangeRefused(
            "invalid_request", "authorization_details constraints is not an object"
        )
    return actions, constraints


def narrow(
    parent: CredentialClaims,
    asked: Narrowing,
    *,
    actor: str,
    max_depth: int,
) -> ChildScope:
    """The child's scope for ``actor``, or :class:`ExchangeRefused`."""
    depth = parent.depth + 1
    if depth > max_depth:
        raise ExchangeRefused(
            "invalid_grant",
            "the subject token cannot be delegated further",
            f"delegation depth {depth} exceeds the maximum {max_depth}",
        )
    if actor == parent.subject or actor in parent.actors:
        raise ExchangeRefused(
            "invalid_grant",
            "the actor already acts in this delegation chain",
            f"{actor} is already in the chain",
        )
    if parent.may_act is not None and parent.may_act != actor:
        raise ExchangeRefused(
            "invalid_grant",
            "the subject token names another party that may act",
            f"may_act is {parent.may_act}, actor is {actor}",
        )
    for resource in asked.resources:
        if resource != parent.audience:
            raise ExchangeRefused(
                "invalid_target", "a delegated credential keeps its parent's resource"
            )
    for audience in asked.audiences:
        if audience not in (parent.audience, parent.tool):
            raise ExchangeRefused(
                "invalid_target", "a delegated credential keeps its parent's audience"
            )
    actions: tuple[str, ...] = parent.actions
    if asked.scope is not None:
        named: list[str] = []
        for token in asked.scope.split():
            if ":" in token:
                if token != parent.scope:
                    raise ExchangeRefused(
                        "invalid_scope",
                        "a delegated credential keeps its parent's tool and tier",
                        f"asked {token}, parent is {parent.scope}",
                    )
            else:
                named.append(token)
        if named:
            actions = _only(named, actions, "scope")
    constraints: dict[str, Any] = dict(parent.constraints)
    if asked.authorization_details is not None:
        detail_actions, asked_constraints = _details(asked.authorization_details, parent)
        if detail_actions is not None:
            actions = _only(list(detail_actions), actions, "authorization_details")
        constraints = _narrow_constraints(parent.constraints, asked_constraints)
    if not actions:
        raise ExchangeRefused("invalid_scope", "a delegated credential needs at least one action")
    return ChildScope(parent.tool, parent.tier.value, actions, constraints, depth)


def _only(named: list[str], allowed: tuple[str, ...], where: str) -> tuple[str, ...]:
    wider = [a for a in named if a not in allowed]
    if wider:
        raise ExchangeRefused(
            "invalid_scope",
            "a delegated credential can only have actions its parent has",
            f"{where} asks for {', '.join(sorted(set(wider)))} beyond {', '.join(allowed)}",
        )
    return tuple(a for a in allowed if a in set(named))


def _narrow_constraints(parent: Mapping[str, Any], asked: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(parent)
    for key, value in asked.items():
        if not isinstance(value, str) and not (
            isinstance(value, list) and all(isinstance(v, str) for v in value)
        ):
            raise ExchangeRefused(
                "invalid_request", f"constraint {key!r} must be a string or a list of strings"
            )
        if key in parent and not _narrower_value(parent[key], value):
            raise ExchangeRefused(
                "invalid_scope",
                "constraints can only narrow",
                f"constraint {key!r}: {value!r} is not within {parent[key]!r}",
            )
        out[key] = value
    return out
