"""Policy-as-code: compile Cedar policy files, decide requests (DESIGN.md §5).

:func:`compile_policies` turns policy files into one parsed, schema-validated Cedar policy
set, or raises :class:`PolicyInvalid` listing *every* problem with its file and line.
:func:`decide` answers one request against that set and a pre-parsed entity set with one
Cedar evaluation on the common path. Default deny; ``forbid`` wins; an evaluation error or
"no decision" is a deny (STYLE.md rule 3: fail closed, visibly). A deny that only approval
gates (``forbid`` policies annotated ``@approval``) caused, and that approval would lift,
is ``approval_required``.

Pure: no I/O, no clock, no environment; the parsed handles are built once and reused.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any, ClassVar, Final, Literal

import cedarpy

from taskbound.core.cedar_schema import CedarSchema, PolicyInputError, probe_schema
from taskbound.errors import TaskboundError

__all__ = [
    "APPROVAL_ANNOTATION",
    "CompiledPolicies",
    "Decision",
    "DecisionRequest",
    "EntityRef",
    "EntitySet",
    "Outcome",
    "PolicyInfo",
    "PolicyInvalid",
    "PolicyProblem",
    "PolicySource",
    "compile_policies",
    "decide",
]

#: A ``forbid`` carrying this annotation is an approval gate: it denies until approval is
#: granted (``context.approval.granted``), and a deny by gates alone is approval_required.
APPROVAL_ANNOTATION: Final = "approval"

_ALLOW: Final = cedarpy.Decision.Allow
_DENY: Final = cedarpy.Decision.Deny
_EVAL_ERROR: Final = re.compile(r"error while evaluating policy `(.*?)`: ", re.DOTALL)
_FOR_POLICY: Final = re.compile(r"^for policy `[^`]*`, ")
_NO_APPLICABLE_ACTION: Final = "unable to find an applicable action"
_BACKTICKED: Final = re.compile(r"`([^`]+)`")
_IDENTIFIER: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Parser errors that Cedar reports at the first offending token: a prefix of the statement
# that reaches that token fails the same way, which locates the line.
_TOKEN_ERRORS: Final = ("unexpected token", "invalid token")


# --- sources and problems ---------------------------------------------------------------


@dataclass(frozen=True)
class PolicySource:
    """One policy file: its name (e.g. ``"tiers.cedar"``) and its text."""

    name: str
    text: str


@dataclass(frozen=True)
class PolicyProblem:
    """Why a policy file cannot load, and where."""

    file: str
    line: int
    policy_id: str | None
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:"
        if self.policy_id is not None:
            return f"{where} [{self.policy_id}] {self.message}"
        return f"{where} {self.message}"


class PolicyInvalid(TaskboundError):
    """A policy set that cannot load; ``problems`` lists every problem found.

    ``PolicyInvalid(problems)`` builds the detail from the problems;
    ``PolicyInvalid("message")`` (a problem with no file, e.g. a missing directory) has the
    message as its detail and no problems.
    """

    code: ClassVar[str] = "policy_invalid"
    status: ClassVar[int] = 400
    default_detail: ClassVar[str] = "the policy set is not valid"

    def __init__(
        self,
        problems: Iterable[PolicyProblem] | str = (),
        *,
        detail: str | None = None,
        internal: str | None = None,
    ) -> None:
        if isinstance(problems, str):
            detail, problems = detail or problems, ()
        self.problems: tuple[PolicyProblem, ...] = tuple(problems)
        if detail is None and self.problems:
            count = len(self.problems)
            lines = "\n".join(f"  {p}" for p in self.problems)
            noun = "problem" if count == 1 else "problems"
            detail = f"the policy set is not valid ({count} {noun}):\n{lines}"
        super().__init__(detail, internal=internal)


@dataclass(frozen=True)
class PolicyInfo:
    """One loaded policy: its id, where it is, its effect, annotations and text."""

    id: str
    file: str
    line: int
    effect: Literal["permit", "forbid"]
    annotations: Mapping[str, str]
    text: str


@dataclass(frozen=True)
class CompiledPolicies:
    """A validated policy set, parsed once: ``handle`` is the ``cedarpy.PolicySet``."""

    version: str
    schema: CedarSchema
    policies: Mapping[str, PolicyInfo] = field(compare=False, repr=False)
    handle: Any = field(compare=False, repr=False)
    # Loaded, but worth saying: a policy whose actions the registry does not have yet.
    warnings: tuple[PolicyProblem, ...] = field(default=(), compare=False, repr=False)
    # The ids of the approval gates, derived from ``policies``.
    approval_gates: frozenset[str] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        gates = frozenset(
            p.id
            for p in self.policies.values()
            if p.effect == "forbid" and APPROVAL_ANNOTATION in p.annotations
        )
        object.__setattr__(self, "approval_gates", gates)


# --- splitting files into statements ----------------------------------------------------


@dataclass(frozen=True)
class _Statement:
    text: str  # from its first significant character through its ';' (or end of file)
    line: int  # 1-based line of its first significant character
    terminated: bool


def _statements(text: str) -> Iterator[_Statement]:
    """Split Cedar policy text at each ``;`` outside strings and ``//`` comments.

    A statement starts at its first character that is neither blank nor comment, so its
    line is where its first annotation or its effect is.
    """
    i, n, line = 0, len(text), 1
    start: int | None = None
    start_line = 0
    while i < n:
        ch = text[i]
        if ch == "\n":
            line += 1
            i += 1
        elif ch == "/" and text.startswith("//", i):
            end = text.find("\n", i)
            i = n if end < 0 else end
        elif ch.isspace():
            i += 1
        else:
            if start is None:
                start, start_line = i, line
            if ch == '"':
                i += 1
                while i < n and text[i] != '"':
                    if text[i] == "\\":
                        i += 1
                    if i < n and text[i] == "\n":
                        line += 1
                    i += 1
                i += 1
            elif ch == ";":
                i += 1
                yield _Statement(text[start:i], start_line, True)
                start = None
            else:
                i += 1
    if start is not None:
        yield _Statement(text[start:].rstrip(), start_line, False)


def _syntax_error_offset(text: str, message: str) -> int:
    """The line (0-based, within the statement) of a parser error, or 0 if unknown.

    Cedar's parse errors carry no position. It reports the first token that cannot
    continue the policy, so the shortest prefix of whole lines failing with the same
    message ends on the line holding that token: binary search for it.
    """
    if not message.startswith(_TOKEN_ERRORS):
        return 0
    lines = text.split("\n")
    lo, hi = 1, len(lines)
    while lo < hi:
        mid = (lo + hi) // 2
        try:
            cedarpy.policies_to_json_str("\n".join(lines[:mid]))
            same = False
        except ValueError as exc:
            same = str(exc) == message
        if same:
            hi = mid
        else:
            lo = mid + 1
    return lo - 1


def _token_offset(text: str, message: str) -> int:
    """The line (0-based, within the statement) first naming what a validation error names
    (an entity type, action or attribute in backticks), or 0 if none does."""
    match = _BACKTICKED.search(message)
    if match is None:
        return 0
    token = match.group(1)
    # An identifier (an attribute, a type) is code, never inside a string literal; an
    # action uid or a tag name in quotes is.
    word = _IDENTIFIER.fullmatch(token) is not None
    if word:
        pattern = re.compile(rf"(?<![A-Za-z0-9_]){re.escape(token)}(?![A-Za-z0-9_])")
    else:
        pattern = re.compile(re.escape(token))
    for index, code in enumerate(_code_only(text, strings=not word).split("\n")):
        if pattern.search(code):
            return index
    return 0


def _code_only(text: str, *, strings: bool) -> str:
    """``text`` without its ``//`` comments, and without the contents of its string
    literals unless ``strings``; line breaks are kept."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == '"':
            end = i + 1
            while end < n and text[end] != '"':
                end += 2 if text[end] == "\\" else 1
            literal = text[i : end + 1]
            out.append(literal if strings else '""' + "\n" * literal.count("\n"))
            i = end + 1
        elif ch == "/" and text.startswith("//", i):
            end = text.find("\n", i)
            i = n if end < 0 else end
        else:
            out.append(ch)
            i += 1
    return "".join(out)


# --- compiling --------------------------------------------------------------------------


def _policy_version(schema: CedarSchema, sources: Sequence[PolicySource]) -> str:
    material = json.dumps(
        [schema.version, sorted([s.name, s.text] for s in sources)],
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return "sha256:" + hashlib.sha256(material.encode("utf-8", "surrogatepass")).hexdigest()


def compile_policies(sources: Sequence[PolicySource], schema: CedarSchema) -> CompiledPolicies:
    """Parse and validate ``sources`` against ``schema`` into one policy set.

    Each statement is parsed and validated on its own, so every problem carries its file
    and line. A policy's id is its ``@id("…")`` annotation, else ``"<file>:<line>"``; ids
    are unique across files. Templates are refused. All problems of all files are
    collected and raised together as one :class:`PolicyInvalid`. No policy at all is a
    valid set (which denies everything).

    A policy whose scope names only tiers the registry has no action of yet (a fresh
    registry; an admin permit before any admin tool) is type-checked against placeholder
    actions instead, loads, matches nothing, and is listed in ``warnings``.
    """
    problems: list[PolicyProblem] = []
    infos: dict[str, PolicyInfo] = {}
    seen: dict[str, PolicyInfo] = {}  # every parsed policy, valid or not, for duplicate ids
    static: dict[str, Any] = {}
    names: set[str] = set()
    warnings: list[PolicyProblem] = []
    probe = _Probe(schema)
    for source in sources:
        if source.name in names:
            problems.append(PolicyProblem(source.name, 1, None, "file is given twice"))
            continue
        names.add(source.name)
        for stmt in _statements(source.text):
            before = len(problems)
            info, est = _compile_statement(source.name, stmt, schema, probe, problems, warnings)
            if info is None:
                continue
            first = seen.get(info.id)
            if first is not None:
                problems.append(
                    PolicyProblem(
                        source.name,
                        stmt.line,
                        info.id,
                        f"duplicate policy id (first at {first.file}:{first.line})",
                    )
                )
                continue
            seen[info.id] = info
            if len(problems) == before:
                infos[info.id] = info
                static[info.id] = est
    if problems:
        raise PolicyInvalid(problems)
    document = {"staticPolicies": static, "templates": {}, "templateLinks": []}
    try:
        handle = cedarpy.PolicySet.from_json_str(json.dumps(document))
    except ValueError as exc:  # every statement passed alone; this is not expected
        raise PolicyInvalid(
            [PolicyProblem("", 0, None, f"the policy set cannot be assembled: {exc}")]
        ) from exc
    return CompiledPolicies(
        version=_policy_version(schema, sources),
        schema=schema,
        policies=MappingProxyType(infos),
        handle=handle,
        warnings=tuple(warnings),
    )


class _Probe:
    """The probe schema, built at most once per compilation and only if needed."""

    def __init__(self, schema: CedarSchema) -> None:
        self._schema = schema
        self._handle: Any = None

    def handle(self) -> Any:
        if self._handle is None:
            self._handle = probe_schema(self._schema)
        return self._handle


def _registry_actions_in_scope(scope: Any, schema: CedarSchema) -> bool:
    """Whether a policy's action scope (Cedar JSON) covers any action of the registry.
    Unknown shapes count as covering (so their validation errors stand)."""
    if not isinstance(scope, Mapping):
        return True
    op = scope.get("op")
    if op == "All":
        return bool(schema.actions)
    if op == "==":
        uids = [scope.get("entity")]
    elif op == "in":
        uids = scope["entities"] if "entities" in scope else [scope.get("entity")]
    else:
        return True
    for uid in uids:
        if not isinstance(uid, Mapping):
            return True
        target = uid.get("id")
        if target in schema.actions:
            return True
        if op == "in" and any(a.tier == target for a in schema.actions.values()):
            return True
    return False


def _compile_statement(
    file: str,
    stmt: _Statement,
    schema: CedarSchema,
    probe: _Probe,
    problems: list[PolicyProblem],
    warnings: list[PolicyProblem],
) -> tuple[PolicyInfo | None, Any]:
    """Parse and validate one statement; problems go to ``problems``. Returns the policy
    (also when it fails validation, so duplicate ids are still seen) and its JSON form."""
    try:
        document = json.loads(cedarpy.policies_to_json_str(stmt.text))
    except ValueError as exc:
        message = str(exc)
        offset = _syntax_error_offset(stmt.text, message)
        if not stmt.terminated:
            message = f"{message} (the statement does not end with ';')"
        problems.append(PolicyProblem(file, stmt.line + offset, None, f"syntax error: {message}"))
        return None, None
    if document.get("templates"):
        problems.append(
            PolicyProblem(
                file,
                stmt.line,
                None,
                "templates (?principal / ?resource slots) are not supported",
            )
        )
        return None, None
    policies = document.get("staticPolicies") or {}
    if len(policies) != 1:  # a statement ends at ';', so it holds exactly one policy
        problems.append(PolicyProblem(file, stmt.line, None, "expected exactly one policy"))
        return None, None
    (est,) = policies.values()
    annotations = {
        str(k): "" if v is None else str(v) for k, v in (est.get("annotations") or {}).items()
    }
    policy_id = annotations.get("id", f"{file}:{stmt.line}")
    if not policy_id:
        problems.append(PolicyProblem(file, stmt.line, None, "@id must not be empty"))
        return None, None
    messages = [
        _FOR_POLICY.sub("", e.error)
        for e in cedarpy.validate_policies(stmt.text, schema.handle).errors
    ]
    if (
        messages
        and all(_NO_APPLICABLE_ACTION in m for m in messages)
        and not _registry_actions_in_scope(est.get("action"), schema)
    ):
        # The scope names only tiers the registry has no action of yet (a fresh registry,
        # or no admin tool): Cedar cannot type-check the body against no action. Check it
        # against placeholder actions instead; the policy loads and matches nothing until
        # such actions exist, when the registry change recompiles it for real.
        messages = [
            _FOR_POLICY.sub("", e.error)
            for e in cedarpy.validate_policies(stmt.text, probe.handle()).errors
        ]
        if not messages:
            warnings.append(
                PolicyProblem(
                    file, stmt.line, policy_id, "matches no action of the current registry"
                )
            )
    for message in messages:
        offset = _token_offset(stmt.text, message)
        problems.append(PolicyProblem(file, stmt.line + offset, policy_id, message))
    info = PolicyInfo(
        id=policy_id,
        file=file,
        line=stmt.line,
        effect="forbid" if est.get("effect") == "forbid" else "permit",
        annotations=MappingProxyType(annotations),
        text=stmt.text,
    )
    return info, est


# --- entities ---------------------------------------------------------------------------


class EntitySet:
    """An immutable, pre-parsed Cedar entity set (a ``cedarpy.Entities`` handle).

    Build the registry's entities once; add per-task entities with :meth:`with_entities`,
    which returns a new set and leaves this one untouched.
    """

    __slots__ = ("_schema", "handle")

    def __init__(self, handle: Any, schema: CedarSchema) -> None:
        self.handle: Any = handle
        self._schema = schema

    @classmethod
    def build(cls, entities: list[dict[str, Any]], schema: CedarSchema) -> EntitySet:
        """Parse ``entities`` (Cedar JSON) and validate them against ``schema``.

        Raises :class:`PolicyInputError` if they do not parse or conform.
        """
        try:
            handle = cedarpy.Entities.from_json_str(json.dumps(entities), schema.handle)
        except (ValueError, TypeError) as exc:
            raise PolicyInputError("the entities are not valid", internal=str(exc)) from exc
        return cls(handle, schema)

    def with_entities(self, extra: list[dict[str, Any]]) -> EntitySet:
        """A new set: this one plus ``extra`` (e.g. the task entity), validated.

        Raises :class:`PolicyInputError` if ``extra`` does not parse or conform, or
        clashes with an entity already here.
        """
        try:
            handle = self.handle.with_added_json_str(json.dumps(extra), self._schema.handle)
        except (ValueError, TypeError) as exc:
            raise PolicyInputError("the entities are not valid", internal=str(exc)) from exc
        return EntitySet(handle, self._schema)

    def __len__(self) -> int:
        return len(self.handle)

    def __setattr__(self, name: str, value: Any) -> None:
        if hasattr(self, name):
            raise AttributeError(f"{type(self).__name__} is immutable")
        super().__setattr__(name, value)


# --- deciding ---------------------------------------------------------------------------


class Outcome(StrEnum):
    ALLOW = "allow"
    DENY = "deny"
    APPROVAL_REQUIRED = "approval_required"


@dataclass(frozen=True)
class EntityRef:
    """A Cedar entity uid: ``Agent::"spiffe://…"``, ``Tool::"github"``…"""

    type: str
    id: str

    def as_json(self) -> dict[str, dict[str, str]]:
        """The Cedar JSON form for an entity-typed attribute (``{"__entity": …}``)."""
        return {"__entity": {"type": self.type, "id": self.id}}


@dataclass(frozen=True)
class DecisionRequest:
    """May ``principal`` perform ``action`` (a Cedar action id) on ``resource``?"""

    principal: EntityRef
    action: str
    resource: EntityRef
    context: Mapping[str, Any]


@dataclass(frozen=True)
class Decision:
    """The answer, the policies that determined it, evaluation errors, and the set's
    version. ``errors`` non-empty always means deny."""

    outcome: Outcome
    determining: tuple[str, ...]
    errors: tuple[str, ...]
    policy_version: str

    @property
    def allowed(self) -> bool:
        return self.outcome is Outcome.ALLOW


def _evaluate(
    policies: CompiledPolicies,
    entities: EntitySet,
    request: DecisionRequest,
    context: dict[str, Any],
) -> Any:
    principal, resource = request.principal, request.resource
    return cedarpy.is_authorized(
        {
            "principal": {"type": principal.type, "id": principal.id},
            "action": {"type": "Action", "id": request.action},
            "resource": {"type": resource.type, "id": resource.id},
            "context": context,
        },
        policies.handle,
        entities.handle,
        policies.schema.handle,
    )


def _erroring(policies: CompiledPolicies, errors: Sequence[str]) -> set[str]:
    """The ids of the policies Cedar names in its evaluation errors."""
    found: set[str] = set()
    for error in errors:
        match = _EVAL_ERROR.match(error)
        if match and match.group(1) in policies.policies:
            found.add(match.group(1))
    return found


def _denied_on_error(
    policies: CompiledPolicies, errors: Sequence[str], forbids: Sequence[str] = ()
) -> Decision:
    """The deny for a decision with errors: determined by the erroring policies and any
    forbid that matched anyway."""
    errors = tuple(str(e) for e in errors)
    determining = tuple(sorted({*forbids, *_erroring(policies, errors)}))
    return Decision(Outcome.DENY, determining, errors, policies.version)


def decide(policies: CompiledPolicies, entities: EntitySet, request: DecisionRequest) -> Decision:
    """Decide ``request`` with one Cedar evaluation (two when approval gates deny).

    - any evaluation error: deny, with the errors, determined by the erroring policies and
      any forbid that matched (fail closed: an erroring ``forbid`` must not be skipped into
      an allow, so even Cedar's "allow" is a deny here);
    - "no decision" (e.g. a context attribute the schema does not know): deny;
    - allow: allow, determined by the permits that matched;
    - deny by approval gates only: evaluated again as if approval were granted; if that
      allows, approval_required (determined by the gates), else deny;
    - any other deny: deny by the matching forbids (none: the default deny).

    Never raises: a request Cedar cannot take is a deny with an error.
    """
    try:
        context = request.context
        if type(context) is not dict:
            context = dict(context)
        result = _evaluate(policies, entities, request, context)
        diagnostics = result.diagnostics
        errors = diagnostics.errors
        decision = result.decision
        if errors:
            forbids = diagnostics.reasons if decision is _DENY else ()
            return _denied_on_error(policies, errors, forbids)
        reasons = tuple(sorted(diagnostics.reasons))
        if decision is _ALLOW:
            return Decision(Outcome.ALLOW, reasons, (), policies.version)
        if decision is not _DENY:
            return _denied_on_error(policies, ("no decision",))
        gates = policies.approval_gates
        if not reasons or not gates.issuperset(reasons):
            return Decision(Outcome.DENY, reasons, (), policies.version)
        return _decide_approval(policies, entities, request, context, reasons)
    except Exception as exc:  # a request Cedar cannot take is a deny, never a crash
        return _denied_on_error(policies, (f"invalid request: {type(exc).__name__}: {exc}",))


def _decide_approval(
    policies: CompiledPolicies,
    entities: EntitySet,
    request: DecisionRequest,
    context: Mapping[str, Any],
    gates: tuple[str, ...],
) -> Decision:
    approval = context.get("approval")
    granted = {**approval, "granted": True} if isinstance(approval, Mapping) else {"granted": True}
    result = _evaluate(policies, entities, request, {**context, "approval": granted})
    errors = result.diagnostics.errors
    if errors:
        forbids = result.diagnostics.reasons if result.decision is _DENY else ()
        return _denied_on_error(policies, errors, forbids)
    if result.decision is _ALLOW:
        return Decision(Outcome.APPROVAL_REQUIRED, gates, (), policies.version)
    if result.decision is not _DENY:
        return _denied_on_error(policies, ("no decision",))
    return Decision(Outcome.DENY, tuple(sorted(result.diagnostics.reasons)), (), policies.version)
