"""Checking structured answers and schemas: strict JSON, JSON Schema validation with bounded pattern matching,
and whether a schema has any finite instance at all.

Every answer of ``output_format`` json or tags goes through :func:`validate_answer` before it is returned, local
or from a server: strict JSON (``core.strict_json``: no ``NaN``/``Infinity``, finite numbers, bounded depth and
number length), then the schema (``jsonschema``). JSON Schema's ``pattern`` / ``patternProperties`` are matched
with the ``regex`` module under a time limit and with the GIL released (``concurrent=True``), never with Python's
``re``, whose backtracking on a pattern such as ``(a+)+$`` can hold the process (and Cancel) for seconds; Cancel
(``should_stop``) is looked at before every pattern match.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

from ..core import strict_json
from ..core.errors import GenerationInterrupted, QwenVLError

# The longest a single pattern match may take (a hostile pattern against a long answer): then the answer is refused.
PATTERN_TIMEOUT_S = 1.0

_state = threading.local()  # the running check's should_stop (Cancel), read before each pattern match


class PatternTimeout(ValueError):
    """A pattern match took longer than PATTERN_TIMEOUT_S."""


def safe_search(pattern: str, text: str) -> bool:
    """``re.search`` semantics, without unbounded backtracking: a match past the time limit raises PatternTimeout."""
    import regex

    should_stop = getattr(_state, "should_stop", None)
    if should_stop is not None and should_stop():
        raise GenerationInterrupted("Generation was interrupted (while checking a pattern).")
    try:
        return regex.search(pattern, text, timeout=PATTERN_TIMEOUT_S, concurrent=True) is not None
    except TimeoutError as exc:
        raise PatternTimeout(f"the pattern {pattern[:60]!r} took more than {PATTERN_TIMEOUT_S:g} s to check "
                             "against the answer (simplify the pattern)") from exc


def check_patterns_compile(schema: Any) -> None:
    """Every ``pattern`` / ``patternProperties`` key of the schema compiles (with the engine that checks them)."""
    import regex

    for pattern in _patterns(schema):
        try:
            regex.compile(pattern)
        except (regex.error, TypeError) as exc:
            raise QwenVLError(f"json_schema has a pattern that is not a valid regular expression: {pattern[:80]!r} "
                              f"({exc}).") from exc


def _patterns(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if isinstance(node.get("pattern"), str):
            yield node["pattern"]
        if isinstance(node.get("patternProperties"), dict):
            yield from node["patternProperties"].keys()
        for value in node.values():
            yield from _patterns(value)
    elif isinstance(node, list):
        for value in node:
            yield from _patterns(value)


# -- jsonschema with the bounded matcher -----------------------------------------------------------
def _pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Iterator[Any]:
    from jsonschema.exceptions import ValidationError

    if validator.is_type(instance, "string") and not safe_search(pattern, instance):
        yield ValidationError(f"{instance[:60]!r} does not match {pattern[:60]!r}")


def _pattern_properties(validator: Any, patterns: dict[str, Any], instance: Any, schema: Any) -> Iterator[Any]:
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in patterns.items():
        for key, value in instance.items():
            if safe_search(pattern, key):
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def _additional_properties(validator: Any, additional: Any, instance: Any, schema: Any) -> Iterator[Any]:
    from jsonschema.exceptions import ValidationError

    if not validator.is_type(instance, "object"):
        return
    known = schema.get("properties", {})
    patterns = schema.get("patternProperties", {})
    extras = [k for k in instance if k not in known and not any(safe_search(p, k) for p in patterns)]
    if validator.is_type(additional, "object"):
        for key in extras:
            yield from validator.descend(instance[key], additional, path=key)
    elif additional is False and extras:
        yield ValidationError(f"additional properties are not allowed ({', '.join(repr(k) for k in extras[:5])} "
                              "unexpected)")


_VALIDATORS: dict[type, type] = {}
_VALIDATORS_LOCK = threading.Lock()


def bounded_validator(schema: dict[str, Any]) -> Any:
    """A jsonschema validator for ``schema`` whose pattern keywords use :func:`safe_search`."""
    import jsonschema

    base = jsonschema.validators.validator_for(schema)
    with _VALIDATORS_LOCK:
        cls = _VALIDATORS.get(base)
        if cls is None:
            cls = _VALIDATORS[base] = jsonschema.validators.extend(base, {
                "pattern": _pattern, "patternProperties": _pattern_properties,
                "additionalProperties": _additional_properties})
    return cls(schema)


def schema_error(schema: dict[str, Any], value: Any, should_stop: Callable[[], bool] | None = None) -> str | None:
    """Why ``value`` does not validate against ``schema`` (None when it does)."""
    import jsonschema

    _state.should_stop = should_stop
    try:
        error = jsonschema.exceptions.best_match(bounded_validator(schema).iter_errors(value))
    except PatternTimeout as exc:
        return str(exc)
    finally:
        _state.should_stop = None
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path)
    return f"{error.message[:200]}" + (f" (at {where})" if where else "")


# -- does the schema have any finite instance? -------------------------------------------------------
def no_finite_instance(schema: dict[str, Any]) -> str | None:
    """Why no finite JSON value satisfies ``schema`` (None when one may): a required property, a non-empty
    array's items or every branch of a choice that leads back to itself forever (``$ref`` cycles).

    A least fixed point over the schema's nodes: a node is finite when the values it forces are all finite;
    ``$ref`` targets start as "not known finite" and become finite as the iteration proves them so.
    """
    nodes: dict[str, Any] = {}
    _collect(schema, "#", nodes)
    finite: dict[str, bool] = {ptr: False for ptr in nodes}
    changed = True
    while changed:
        changed = False
        for ptr, node in nodes.items():
            if not finite[ptr] and _finite(node, ptr, schema, finite):
                finite[ptr] = changed = True
    if finite.get("#", True):
        return None
    return ("json_schema has no finite instance: it requires itself without end (a required property, a "
            "non-empty array or every choice leads back through $ref to the same object). Make that property "
            "optional, allow an empty array, or add a branch without the reference.")


def _collect(node: Any, ptr: str, nodes: dict[str, Any]) -> None:
    if isinstance(node, dict):
        nodes[ptr] = node
        for key, value in node.items():
            _collect(value, f"{ptr}/{_escape(key)}" if ptr != "#" else f"#/{_escape(key)}", nodes)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _collect(value, f"{ptr}/{i}", nodes)


def _escape(key: str) -> str:
    return str(key).replace("~", "~0").replace("/", "~1")


def _finite(node: Any, ptr: str, root: dict[str, Any], finite: dict[str, bool]) -> bool:
    """Whether ``node`` has a finite instance, given what is known finite so far."""
    if node is True or not isinstance(node, dict):
        return node is not False
    ref = node.get("$ref")
    if isinstance(ref, str):
        if not ref.startswith("#"):
            return True  # an outside reference: not ours to prove
        target = "#" if ref in ("#", "#/") else ref.rstrip("/")
        if target in finite and not finite[target]:
            return False
    if "const" in node or "enum" in node:
        return True  # a listed value is finite

    def sub(key: str, value: Any) -> bool:
        child = f"{ptr}/{key}" if ptr != "#" else f"#/{key}"
        return finite.get(child, _finite(value, child, root, finite)) if isinstance(value, dict) else value is not False

    for key in ("anyOf", "oneOf"):
        branches = node.get(key)
        if isinstance(branches, list) and branches and not any(
                sub(f"{key}/{i}", b) for i, b in enumerate(branches)):
            return False
    if isinstance(node.get("allOf"), list) and not all(sub(f"allOf/{i}", b) for i, b in enumerate(node["allOf"])):
        return False
    props = node.get("properties") if isinstance(node.get("properties"), dict) else {}
    for name in node.get("required", []) if isinstance(node.get("required"), list) else []:
        if name in props and not sub(f"properties/{_escape(name)}", props[name]):
            return False
    if isinstance(node.get("minItems"), int) and node["minItems"] > 0 and isinstance(node.get("items"), dict):
        if not sub("items", node["items"]):
            return False
    if isinstance(node.get("prefixItems"), list):
        if not all(sub(f"prefixItems/{i}", b) for i, b in enumerate(node["prefixItems"])):
            return False
    return True


# -- one answer --------------------------------------------------------------------------------------
def parse_strict(text: str) -> Any:
    """An answer's JSON, strictly (raw control characters inside strings are allowed: some servers' grammars let
    them through; they are written back escaped)."""
    return strict_json.loads(text, allow_control_characters=True)


# -- how far one token can push the end away ---------------------------------------------------------------
_PATTERN_GUESS = 16  # bytes assumed for a pattern-constrained string with no maxLength


def largest_step(schema: dict[str, Any]) -> int:
    """An estimate, in bytes (each token writes at least one), of how much one token can lengthen the shortest way
    to finish an answer of ``schema``: opening an optional property, one more array item, a longer ``anyOf``
    branch. Each is the smallest instance of what it opens (with its key), the largest over the schema."""
    defs = {}
    _collect(schema, "#", defs)
    largest = 0
    for node in defs.values():
        if not isinstance(node, dict):
            continue
        props = node.get("properties")
        if isinstance(props, dict):
            required = set(node.get("required", [])) if isinstance(node.get("required"), list) else set()
            for key, sub in props.items():
                if key not in required:
                    largest = max(largest, len(key.encode()) + 4 + min_bytes(sub, defs))
        if isinstance(node.get("items"), dict):
            largest = max(largest, 1 + min_bytes(node["items"], defs))
        for key in ("anyOf", "oneOf"):
            if isinstance(node.get(key), list):
                largest = max([largest, *(min_bytes(b, defs) for b in node[key])])
    return largest


def min_bytes(node: Any, defs: dict[str, Any], seen: frozenset[str] = frozenset()) -> int:
    """Bytes of the smallest compact JSON instance of ``node`` (an estimate: patterns are guessed, a cycle counts
    nothing more)."""
    if not isinstance(node, dict):
        return 4
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#"):
        target = "#" if ref in ("#", "#/") else ref.rstrip("/")
        if target in seen or target not in defs:
            return 0
        return min_bytes(defs[target], defs, seen | {target})
    if "const" in node:
        return len(strict_json.dumps(node["const"]).encode())
    if isinstance(node.get("enum"), list) and node["enum"]:
        return min(len(strict_json.dumps(v).encode()) for v in node["enum"])
    for key in ("anyOf", "oneOf"):
        if isinstance(node.get(key), list) and node[key]:
            return min(min_bytes(b, defs, seen) for b in node[key])
    kind = node.get("type")
    kind = kind[0] if isinstance(kind, list) and kind else kind
    if kind == "object" or isinstance(node.get("properties"), dict):
        props = node.get("properties") if isinstance(node.get("properties"), dict) else {}
        required = node.get("required") if isinstance(node.get("required"), list) else []
        return 2 + sum(len(str(k).encode()) + 4 + min_bytes(props.get(k, {}), defs, seen) for k in required)
    if kind == "array":
        count = node.get("minItems", 0) if isinstance(node.get("minItems"), int) else 0
        return 2 + count * (1 + min_bytes(node.get("items", {}), defs, seen))
    if kind == "string":
        low = node.get("minLength", 0) if isinstance(node.get("minLength"), int) else 0
        if "pattern" in node:
            low = max(low, min(node.get("maxLength", _PATTERN_GUESS), _PATTERN_GUESS))
        return 2 + low
    if kind in ("integer", "number"):
        bounds = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
        return 2 + max((len(str(node[b])) for b in bounds if b in node), default=1)
    return 4  # true/null/false, or anything: a small value
