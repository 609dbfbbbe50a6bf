"""De-identification placeholders → the recipe's tags.

MIMIC-III writes removed identifiers as `[**First Name 123**]`, `[**2112-4-18**]`, `[**Hospital1 18**]`. The recipe
(after PhysioNet's Clinical-T5) replaces each by a short tag. Its rules, kept exactly because released checkpoints
were trained on text made this way:

1. the first key of the tag map found in the placeholder text (as written, or lower-cased) gives the tag;
2. else a text of three dash-separated parts (a date such as 2112-4-18) is kept;
3. else a bare number becomes [Reg#];
4. else digits with - or / are kept;
5. else a text with a month name is kept;
6. else an empty placeholder becomes '';
7. else the recipe raised NotImplementedError — we use a fallback tag and count it.

The pieces between placeholders are joined with single spaces, dropping empty pieces, as the recipe did.
MIMIC-IV-Note writes every removed identifier as `___`; those all become one tag.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# Within one line, as the recipe matched: with DOTALL a stray `[**` would swallow clinical text up to the next `**]`.
PLACEHOLDER = re.compile(r"\[\*\*(.*?)\*\*\]")
MIMIC4_PLACEHOLDER = re.compile(r"_{3,}")
MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)  # fmt: skip


def placeholder_tag(span: str, tag_map: dict[str, str], fallback: str) -> tuple[str, bool]:
    """The replacement for one placeholder's inner text, and whether a recipe rule knew it."""
    return PlaceholderTagger(tag_map, fallback)(span)


class PlaceholderTagger:
    """The recipe's rules with the map's lower-cased keys computed once and recent answers cached: a MIMIC-III
    discharge summary has dozens of placeholders and most repeat (hospitals, name types, common dates)."""

    CACHE_SIZE = 200_000

    def __init__(self, tag_map: dict[str, str], fallback: str):
        self.keys = [(key, key.lower(), tag) for key, tag in tag_map.items()]
        self.fallback = fallback
        self.cache: dict[str, tuple[str, bool]] = {}

    def __call__(self, span: str) -> tuple[str, bool]:
        hit = self.cache.get(span)
        if hit is None:
            if len(self.cache) >= self.CACHE_SIZE:
                self.cache.clear()
            hit = self.cache[span] = self._rules(span)
        return hit

    def _rules(self, span: str) -> tuple[str, bool]:
        for key, lower, tag in self.keys:
            if key in span or lower in span:
                return tag, True
        if len(span.split("-")) == 3:
            return span, True
        if span.strip().isnumeric():
            return "[Reg#]", True
        if span.replace("-", "").replace("/", "").isnumeric():
            return span, True
        if any(month in span for month in MONTHS):
            return span, True
        if span.strip() == "":
            return "", True
        return self.fallback, False


@dataclass
class DeidResult:
    text: str
    placeholders: int
    unknown_spans: list[str] = field(default_factory=list)  # inner texts no recipe rule knew

    @property
    def unknown(self) -> int:
        return len(self.unknown_spans)


def replace_mimic3_placeholders(
    text: str, tag_map: dict[str, str], fallback: str, tagger: PlaceholderTagger | None = None
) -> DeidResult:
    """Replace every `[**...**]` of a note; pass a `tagger` to reuse its cache across notes."""
    tagger = tagger or PlaceholderTagger(tag_map, fallback)
    pieces: list[str] = []
    last = 0
    placeholders = 0
    unknown: list[str] = []
    for match in PLACEHOLDER.finditer(text):
        tag, known = tagger(match.group(1))
        pieces.append(text[last : match.start()])
        pieces.append(tag)
        last = match.end()
        placeholders += 1
        if not known:
            unknown.append(match.group(1))
    if placeholders == 0:
        return DeidResult(text, 0)  # the recipe's join is the identity for a note without placeholders
    pieces.append(text[last:])
    return DeidResult(" ".join(p for p in pieces if p != ""), placeholders, unknown)


def replace_mimic4_placeholders(text: str, tag: str) -> DeidResult:
    new_text, n = MIMIC4_PLACEHOLDER.subn(tag, text)
    return DeidResult(new_text, n)
