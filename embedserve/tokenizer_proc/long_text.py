"""A long text is tokenized a prefix at a time, so that one huge input cannot stall the tokenizer.

Measured before: one 10 MB string ("a " x 5M) held the tokenizer process 10.8 s at 3.1 GB (30 MB:
50 s, 8.9 GB), every other request waited behind it, and then it was refused for its length. What a
text holds past the context length never reaches the model, so a prefix with more tokens than that
decides: the text is refused, or (--allow-auto-truncate) truncated exactly as the whole would be.

A prefix ends where a word ends and a space follows. Every tokenizer here splits words there before
anything else (BERT's whitespace pre-tokenizer, byte-level BPE's regex, SentencePiece's metaspace),
so a prefix's tokens are the whole text's first tokens. Prefixes start at `CHARS_PER_TOKEN` characters
per allowed token and double, so a text padded with spaces costs at most about twice its whole
tokenization; a text with no space at all is tokenized whole.

That leaves texts of little but spaces, or of no space at all: `tokenizers` reads 3 MB of spaces in
~1.6 s here. So a text may hold at most `MAX_CHARS_PER_TOKEN` characters per token of the context
(64,000 for a 256-token model), the bound TEI sets: longer ones are refused, or with
--allow-auto-truncate cut there first (at a word end when one is near).
"""

from __future__ import annotations

import re
from collections.abc import Callable

# NOTE: English runs ~4-5 characters per token: inputs that fit the context rarely take the prefix
# path, and those that do come out whole.
CHARS_PER_TOKEN = 8
MAX_CHARS_PER_TOKEN = 250
# NOTE: a cut at the bound looks back this far for a word end; a text whose last space lies further
# back (CJK after a spaced title, minified code, base64) is cut at the bound itself: cutting at that
# space dropped everything after the title.
CUT_LOOKBACK_CHARS = 1000
# NOTE: a prefix must pass the limit by this many tokens: its last few tokens may differ from the
# whole text's where a vocabulary merges across spaces (SentencePiece without whitespace splitting).
MARGIN_TOKENS = 16


_WORD_THEN_SPACE = re.compile(r"[^ ](?= )")


def max_chars(limit: int) -> int:
    """The most characters a text may hold for a context of `limit` tokens."""
    return limit * MAX_CHARS_PER_TOKEN


def cut_to_max_chars(text: str, limit: int) -> str:
    """`text` cut to at most `max_chars(limit)` characters, at a word end where one is."""
    cap = max_chars(limit)
    if len(text) <= cap:
        return text
    end = word_end_before(text, cap, search_on=False)
    return text[: end if cap - CUT_LOOKBACK_CHARS <= end <= cap else cap]


def word_end_before(text: str, end: int, search_on: bool = True) -> int:
    """The last position <= `end` where a word ends and a space follows, else (`search_on`) the
    first after it, else `len(text)`."""
    if end >= len(text):
        return len(text)
    space = text.rfind(" ", 0, end + 1)
    # NOTE: back to the start of that run of spaces, in C: a run can be 64,000 characters long
    start = len(text[:space].rstrip(" ")) if space > 0 else 0
    if start > 0 or not search_on:
        return start if start > 0 else len(text)
    after = _WORD_THEN_SPACE.search(text, max(0, end - 1))
    return after.start() + 1 if after else len(text)


def long_prefix(text: str, limit: int, encode: Callable[[str], list[int]]) -> tuple[str, list[int]]:
    """The shortest tried prefix of `text` with more than `limit` (+ `MARGIN_TOKENS`) tokens, or the
    whole text, and its ids from `encode` (special tokens included, never truncated)."""
    window = limit * CHARS_PER_TOKEN
    while True:
        prefix = text[: word_end_before(text, window)]
        ids = encode(prefix)
        if len(prefix) == len(text) or len(ids) > limit + MARGIN_TOKENS:
            return prefix, ids
        window *= 2


def is_long(text: str, limit: int) -> bool:
    """Whether `long_prefix` may cut `text` (shorter texts are always tokenized whole)."""
    return len(text) > limit * CHARS_PER_TOKEN
