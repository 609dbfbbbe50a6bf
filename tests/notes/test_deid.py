import pytest

from asclepius.notes.deid import placeholder_tag, replace_mimic3_placeholders, replace_mimic4_placeholders
from asclepius.recipe import load_recipe

TAGS = load_recipe().deid_tag_map
FALLBACK = "[DEID]"


@pytest.mark.parametrize("key", list(TAGS))
def test_every_tag_of_the_recipe_map(key):
    tag, known = placeholder_tag(f"{key} 123", TAGS, FALLBACK)
    # The recipe takes the FIRST key found in the text; "Wardname" contains "name", and "Name" comes earlier in
    # the map, so the recipe tags wards as [Name]. We keep that: released checkpoints were trained on it.
    expected = "[Name]" if key == "Wardname" else TAGS[key]
    assert (tag, known) == (expected, True)


@pytest.mark.parametrize(
    "span, expected",
    [
        ("2112-4-18", "2112-4-18"),  # dates (3 dash-separated parts) are kept
        ("3-9", "3-9"),  # digits with - are kept
        ("12/2/2110", "12/2/2110"),  # digits with / are kept
        ("2145", "[Reg#]"),  # a bare number
        (" 88231 ", "[Reg#]"),
        ("May 5", "May 5"),  # a month name
        ("Hospital1 18", "[Company]"),
        ("First Name3 (LF) 1234", "[Name]"),
        ("Doctor Last Name 515", "[Name]"),
        ("hospital unit name 12", "[Company]"),  # the lower-cased key also matches
        ("Month (only) 116", "[MO]"),
        ("", ""),
        ("  ", ""),
    ],
)
def test_recipe_rules(span, expected):
    assert placeholder_tag(span, TAGS, FALLBACK) == (expected, True)


def test_unknown_type_gets_the_fallback_and_is_counted():
    assert placeholder_tag("Ward Secretary Code 41", TAGS, FALLBACK) == (FALLBACK, False)
    res = replace_mimic3_placeholders("See [**Ward Secretary Code 41**] and [**Pager Code 7**].", TAGS, FALLBACK)
    assert res.text == "See  [DEID]  and  [DEID] ."
    assert res.placeholders == 2 and res.unknown == 2
    assert res.unknown_spans == ["Ward Secretary Code 41", "Pager Code 7"]


def test_pieces_are_joined_with_single_spaces_like_the_recipe():
    text = "Pt [**Known lastname 12**] seen [**2112-4-18**] at [**Hospital1 18**]. f/u [**Telephone/Fax (1) 22**]"
    res = replace_mimic3_placeholders(text, TAGS, FALLBACK)
    assert res.text == "Pt  [Name]  seen  2112-4-18  at  [Company] . f/u  [#]"
    assert (res.placeholders, res.unknown) == (4, 0)
    # an empty placeholder vanishes along with its piece; a placeholder at the very start leaves no leading space
    assert replace_mimic3_placeholders("[**Name 1**] ok [****]", TAGS, FALLBACK).text == "[Name]  ok "


def test_note_without_placeholders_is_unchanged():
    text = "Line one\n\n  Line two with [brackets] and ** stars **\n"
    res = replace_mimic3_placeholders(text, TAGS, FALLBACK)
    assert res.text == text and res.placeholders == 0


def test_placeholders_match_within_one_line_as_the_recipe_did():
    res = replace_mimic3_placeholders("a [**First Name 3**] b", {"Name": "<N>"}, FALLBACK)
    assert res.text == "a  <N>  b"
    # a stray `[**` must not swallow the clinical text up to the next `**]` on a later line
    text = "BP 120/80 [** stray\nPt given aspirin 325 mg, heparin gtt\nseen by [**Doctor Last Name 12**] today"
    res = replace_mimic3_placeholders(text, TAGS, FALLBACK)
    assert "Pt given aspirin 325 mg, heparin gtt" in res.text and res.placeholders == 1 and res.unknown_spans == []


def test_mimic4_underscores_become_one_tag():
    res = replace_mimic4_placeholders("Name:  ___   Unit No: ___\nDr. ___ saw pt. a_b __", "[DEID]")
    assert res.text == "Name:  [DEID]   Unit No: [DEID]\nDr. [DEID] saw pt. a_b __"
    assert res.placeholders == 3
