"""Tag rules (captioning/tag_rules.py): exclude_tags and replace_tags as issue 31 specifies them."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwenvl_fast.captioning.tag_rules import (
    TagRuleError,
    TagRules,
    parse_exclude,
    parse_replace,
    parse_rules,
    split_items,
    tag_key,
)

BASE = ["red car", "blue sky", "1girl", "solo", "tree", "a cat on a mat", "blurry", "watermark", "x"]


@st.composite
def spelling(draw, words=BASE):
    """One of a few tags, spelt as a person or a model might: any case, `_` or spaces, padding around it."""
    word = draw(st.sampled_from(words))
    chars = [draw(st.sampled_from([" ", "_", "  "])) if c == " " else
             (c.upper() if draw(st.booleans()) else c) for c in word]
    pad = draw(st.sampled_from(["", " ", "  "]))
    return pad + "".join(chars) + draw(st.sampled_from(["", " "]))


captions = st.lists(spelling() | st.sampled_from(["", " "]), max_size=12).map(",".join)
tag_lists = st.lists(spelling(), max_size=4)
rule_lists = st.lists(st.tuples(spelling(), st.lists(spelling(), max_size=2)), max_size=4)


def rules_text(rules):
    return "\n".join(f"{old} = {', '.join(new)}" for old, new in rules)


def keys(text):
    return [tag_key(t) for t in split_items(text)]


@settings(max_examples=200)
@given(captions, tag_lists, rule_lists)
def test_no_excluded_tag_ever_survives(caption, exclude, rules):
    out = parse_rules(",".join(exclude), rules_text(rules)).apply(caption)
    assert not set(keys(out)) & {tag_key(t) for t in exclude}


@settings(max_examples=200)
@given(captions, tag_lists, rule_lists)
def test_no_duplicates_and_no_empty_items(caption, exclude, rules):
    parsed = parse_rules(",".join(exclude), rules_text(rules))
    out = parsed.apply(caption)
    if parsed.empty:  # no rules: the caption is left exactly as it is (tested below)
        assert out == caption
        return
    assert len(keys(out)) == len(set(keys(out)))
    assert all(item.strip() and item == item.strip() for item in out.split(", ")) or out == ""


@settings(max_examples=200)
@given(captions, tag_lists)
def test_exclude_only_keeps_order_spelling_and_first_copy(caption, exclude):
    """Without replace rules the result is the input's items, trimmed, in order, first copy of each kept."""
    excluded = {tag_key(t) for t in exclude}
    expected, seen = [], set()
    for item in split_items(caption):
        if tag_key(item) not in excluded and tag_key(item) not in seen:
            seen.add(tag_key(item))
            expected.append(item)
    rules = parse_rules(",".join(exclude), "")
    assert rules.apply(caption) == (", ".join(expected) if not rules.empty else caption)


@settings(max_examples=200)
@given(captions, tag_lists, rule_lists)
def test_idempotent_where_no_rule_feeds_another(caption, exclude, rules):
    olds = {tag_key(old) for old, _ in rules}
    rules = [(old, [t for t in new if tag_key(t) not in olds]) for old, new in rules]
    parsed = parse_rules(",".join(exclude), rules_text(rules))
    once = parsed.apply(caption)
    assert parsed.apply(once) == once


@settings(max_examples=200)
@given(captions, rule_lists)
def test_items_no_rule_names_come_through_verbatim(caption, rules):
    """A rule only touches a whole item equal to its old tag: every other item is kept, spelt as it was."""
    olds = {tag_key(old) for old, _ in rules}
    out = parse_rules("", rules_text(rules)).apply(caption)
    produced = {tag_key(t) for _, new in rules for t in new}
    untouched = [i for i in split_items(caption) if tag_key(i) not in olds and tag_key(i) not in produced]
    out_items = split_items(out)
    firsts = list(dict.fromkeys(tag_key(i) for i in untouched))
    for key in firsts:
        first = next(i for i in untouched if tag_key(i) == key)
        assert first in out_items
    # ... and in the same order
    positions = [out_items.index(next(i for i in untouched if tag_key(i) == key)) for key in firsts]
    assert positions == sorted(positions)


def test_matching_ignores_case_and_underscores():
    rules = parse_rules("Red_Car, BLUE SKY", "")
    assert rules.apply("red car, RED   CAR, red_car, Blue_Sky, tree") == "tree"


def test_rules_apply_once_in_order_and_not_recursively():
    rules = parse_rules("", "a = b\nb = c\na = z")
    assert rules.apply("a") == "b"  # the first rule for a wins; its b is not turned into c
    assert rules.apply("b, a") == "c, b"


def test_empty_new_drops_and_commas_in_new_give_several_tags():
    rules = parse_rules("", "blurry =\n1girl = girl, solo")
    assert rules.apply("1girl, blurry, tree, solo") == "girl, solo, tree"


def test_a_rule_product_that_is_excluded_is_dropped():
    assert parse_rules("car", "red car = car").apply("red car, tree") == "tree"


def test_prose_is_split_on_commas_and_only_whole_items_match():
    prose = "A red car parked by a tree, blurry, in the evening light."
    assert parse_rules("blurry", "").apply(prose) == "A red car parked by a tree, in the evening light."
    assert parse_rules("red car", "").apply(prose) == prose  # no partial match
    assert parse_rules("in the evening light", "").apply(prose) == prose  # the item is "... light."


def test_no_rules_leave_the_caption_exactly_as_it_is():
    text = "a cat,a cat ,  on a mat"
    assert TagRules().apply(text) == text
    assert parse_rules("", "# only a comment\n\n").apply(text) == text


def test_everything_removed_is_empty():
    assert parse_rules("a, b", "").apply("a, b, A, _b_") == ""
    assert parse_rules("", "a =").apply(" , a ,") == ""


@pytest.mark.parametrize("text,words", [
    ("cat dog", "line 1 ('cat dog') has no '='"),
    ("a = b\n = c", "line 2"),
    ("a, b = c", "comma before '='"),
])
def test_bad_rules_name_the_line_and_the_fix(text, words):
    with pytest.raises(TagRuleError, match="replace_tags") as info:
        parse_replace(text)
    assert words in str(info.value)
    assert isinstance(info.value, ValueError)


def test_a_pasted_file_is_refused_clearly():
    with pytest.raises(TagRuleError, match="at most"):
        parse_exclude("x," * (1 << 20))


def test_newlines_separate_excluded_tags_too():
    assert parse_exclude("a\nb, c\n\n") == frozenset({"a", "b", "c"})


def test_equals_sign_inside_new_is_kept():
    assert parse_rules("", "smile = =_=").apply("smile") == "=_="
