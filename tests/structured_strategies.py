"""Hypothesis strategies for JSON schemas built from the features the README's "Structured output" section lists:
objects, required, enums with any case, const, numbers with bounds, strings with length and patterns, arrays,
nesting and ``$ref``. Bounded so that a valid answer fits a few hundred tokens of a character-level tokenizer."""

from __future__ import annotations

import json

from hypothesis import strategies as st

LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
# Keys as people write them: capitalised, camelCase, snake_case.
KEYS = st.text(alphabet=LETTERS + "_", min_size=1, max_size=10).filter(lambda k: k[0] != "_")
WORDS = st.text(alphabet=LETTERS + " -", min_size=1, max_size=8).filter(lambda w: w.strip() == w)
PATTERNS = ["^[A-Z]{3}$", "^[a-z]+-[0-9]{2}$", "^(Yes|No)$", "^#[0-9a-f]{6}$", "[A-Z]"]


@st.composite
def _integer(draw: st.DrawFn) -> dict:
    low = draw(st.integers(-1000, 1000))
    return {"type": "integer", "minimum": low, "maximum": low + draw(st.integers(0, 500))}


@st.composite
def _number(draw: st.DrawFn) -> dict:
    low = draw(st.integers(-100, 100))
    schema = {"type": "number", "minimum": low, "maximum": low + draw(st.integers(1, 50))}
    if draw(st.booleans()):
        schema["exclusiveMaximum"] = schema.pop("maximum")
    return schema


@st.composite
def _string(draw: st.DrawFn) -> dict:
    if draw(st.booleans()):
        return {"type": "string", "pattern": draw(st.sampled_from(PATTERNS)), "maxLength": 12}
    low = draw(st.integers(0, 4))
    return {"type": "string", "minLength": low, "maxLength": low + draw(st.integers(0, 10))}


LEAVES = st.one_of(
    st.lists(WORDS, min_size=1, max_size=4, unique=True).map(lambda values: {"enum": values}),
    st.one_of(WORDS, st.integers(-99, 99), st.booleans()).map(lambda value: {"const": value}),
    _integer(), _number(), _string(), st.just({"type": "boolean"}),
)


@st.composite
def _object(draw: st.DrawFn, children: st.SearchStrategy) -> dict:
    props = draw(st.dictionaries(KEYS, children, min_size=1, max_size=3))
    required = [k for k in props if draw(st.booleans())]
    schema = {"type": "object", "properties": props, "additionalProperties": False}
    if required:
        schema["required"] = required
    return schema


@st.composite
def _array(draw: st.DrawFn, children: st.SearchStrategy) -> dict:
    low = draw(st.integers(0, 2))
    return {"type": "array", "items": draw(children), "minItems": low, "maxItems": low + draw(st.integers(0, 2))}


NODES = st.recursive(LEAVES, lambda kids: st.one_of(_object(kids), _array(kids)), max_leaves=5)


@st.composite
def schemas(draw: st.DrawFn) -> dict:
    """A top-level object schema; sometimes its parts are ``$defs`` reached by ``$ref``, sometimes a tree that
    refers to itself (finite: the self-reference is optional)."""
    kind = draw(st.sampled_from(["plain", "defs", "tree"]))
    if kind == "tree":
        return {"type": "object", "additionalProperties": False, "required": ["Name"],
                "properties": {"Name": draw(LEAVES),
                               "children": {"type": "array", "items": {"$ref": "#"}, "maxItems": 2}}}
    top = draw(_object(NODES))
    if kind == "defs":
        defs = {}
        for i, (key, sub) in enumerate(list(top["properties"].items())):
            defs[f"Part{i}"] = sub
            top["properties"][key] = {"$ref": f"#/$defs/Part{i}"}
        top["$defs"] = defs
    return top


def as_text(schema: dict) -> str:
    return json.dumps(schema)
