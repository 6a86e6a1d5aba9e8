"""A long text is read a prefix at a time (tokenizer_proc/long_text.py): a prefix that ends at a word
end must give the whole text's first tokens, for WordPiece (the bundled MiniLM), byte-level BPE and
a SentencePiece-style metaspace tokenizer alike; truncating from a prefix must equal truncating the
whole text."""

from __future__ import annotations

import random

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from embedserve.tokenizer_proc.long_text import (
    cut_to_max_chars,
    is_long,
    long_prefix,
    max_chars,
    word_end_before,
)
from embedserve.tokenizer_proc.process import CHUNK_CHARS, CHUNK_TEXTS, TokenizerWorker, chunks, truncate_ids
from embedserve.tokenizer_proc.text_tokenizer import TextTokenizer

WORDS = "the of and river bank's loan 2024 naïve café 東京 emoji🙂 don't x-ray (note) a,b ... e.g. ".split()


def random_text(rnd: random.Random, words: int) -> str:
    gaps = [" ", " ", " ", "  ", "\n", " \t ", ", "]
    return "".join(rnd.choice(WORDS) + rnd.choice(gaps) for _ in range(words)).strip()


def trained_bpe(pre_tokenizer) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizer
    rnd = random.Random(1)
    trainer = trainers.BpeTrainer(
        vocab_size=800, special_tokens=["[UNK]"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([random_text(rnd, 50) for _ in range(200)], trainer)
    return tok


@pytest.mark.parametrize(
    "pre_tokenizer",
    [pre_tokenizers.ByteLevel(add_prefix_space=False), pre_tokenizers.Metaspace()],
    ids=["byte-level BPE", "metaspace"],
)
def test_a_prefix_ending_at_a_word_end_gives_the_first_tokens(pre_tokenizer):
    tok = trained_bpe(pre_tokenizer)
    rnd = random.Random(2)
    for _ in range(40):
        text = random_text(rnd, rnd.randint(20, 200))
        whole = tok.encode(text).ids
        end = word_end_before(text, rnd.randint(1, len(text)))
        prefix = tok.encode(text[:end]).ids
        assert prefix == whole[: len(prefix)], (text, end)


def test_bert_truncation_from_a_prefix_equals_truncating_the_whole(bundled_model_path):
    ours = TextTokenizer(str(bundled_model_path))
    rnd = random.Random(3)
    texts = [random_text(rnd, rnd.randint(300, 3000)) for _ in range(20)]
    assert all(is_long(t, 256) for t in texts)
    whole = ours.encode_batch(texts)  # no limit: every text tokenized whole
    assert ours.encode_batch(texts, max_length=256) == [[*w[:255], 102] for w in whole]
    for ids, full in zip(ours.encode_batch(texts, stop_above=256), whole, strict=True):
        assert len(ids) > 256 and ids[:-1] == full[: len(ids) - 1] and ids[-1] == 102


def test_a_huge_text_is_read_only_in_part(bundled_model_path):
    ours = TextTokenizer(str(bundled_model_path))
    huge = "word " * 2_000_000  # 10 MB: whole, 2M tokens and gigabytes in the tokenizer
    ids = ours.encode_batch([huge, "short"], stop_above=256)
    assert 256 < len(ids[0]) < 10_000 and ids[1] == [101, 2460, 102]
    assert ours.encode_batch([huge], max_length=256)[0] == [101] + [2773] * 254 + [102]


def test_word_ends():
    assert word_end_before("abc def ghi", 6) == 3
    assert word_end_before("abc   def ghi", 5) == 3  # the start of the run of spaces
    assert word_end_before("abcdefgh ij", 3) == 8  # none before: the first after
    assert word_end_before("  abcdefgh", 5) == 10  # leading spaces end no word
    assert word_end_before("abcdefgh", 3) == 8 and word_end_before("abc", 10) == 3
    assert word_end_before("abcdefgh ij", 3, search_on=False) == 11  # nowhere to cut before


def test_texts_are_cut_to_the_character_bound():
    cap = max_chars(4)
    assert cut_to_max_chars("x" * cap, 4) == "x" * cap
    assert cut_to_max_chars("word " * cap, 4) == ("word " * cap)[: cap - 1].rstrip()
    assert cut_to_max_chars("y" * (cap + 5), 4) == "y" * cap  # no word end: cut at the bound
    titled = "Title: " + "中文" * max_chars(16)  # its only space is in the title
    assert cut_to_max_chars(titled, 16) == titled[: max_chars(16)]  # cut at the bound, not there


def test_a_long_spaceless_text_is_truncated_from_its_start(bundled_model_path):
    ours = TextTokenizer(str(bundled_model_path))
    titled = "标题: " + "中文文本" * 20_000  # 80,004 characters, over the bound, spaces only at the start
    ids = ours.encode_batch([titled], max_length=256)[0]
    assert ids == ours.encode_batch([titled[:64_000]], max_length=256)[0] and len(ids) == 256


def test_only_texts_tokenized_in_part_are_reported_so(bundled_model_path):
    ours = TextTokenizer(str(bundled_model_path))
    in_part: set[int] = set()
    texts = ["short", "word " * 3000, "中" * 3000]  # the CJK one has no space: tokenized whole
    ids = ours.encode_batch(texts, stop_above=256, counted_in_part=in_part)
    assert in_part == {1} and len(ids[2]) == 3002


def test_the_tokenizer_process_encodes_in_chunks_as_in_one_call(bundled_model_path):
    """The tokenizer process encodes CHUNK_TEXTS at a time (a health probe can go between two calls):
    the same ids as one call, and a text read in part is reported at its index in the whole list."""
    worker = TokenizerWorker.__new__(TokenizerWorker)  # its encoding alone: no sockets, no ring
    worker.tokenizer, worker.context_length, worker.truncate = (
        TextTokenizer(str(bundled_model_path)),
        256,
        False,
    )
    between = []
    worker._send_probes_waiting = lambda: between.append(1)
    texts = [f"text number {i}" for i in range(2 * CHUNK_TEXTS + 5)]
    texts[CHUNK_TEXTS + 3] = "word " * 3000
    in_part: set[int] = set()
    ids = worker._encode(texts, in_part)
    whole: set[int] = set()
    assert ids == worker.tokenizer.encode_batch(texts, stop_above=256, counted_in_part=whole)
    assert in_part == whole == {CHUNK_TEXTS + 3}
    assert len(between) == 2  # after the first and the second chunk


def test_encode_calls_are_bounded_by_texts_and_by_characters():
    assert chunks(["a"] * (2 * CHUNK_TEXTS + 1)) == [
        (0, CHUNK_TEXTS), (CHUNK_TEXTS, 2 * CHUNK_TEXTS), (2 * CHUNK_TEXTS, 2 * CHUNK_TEXTS + 1)
    ]  # fmt: skip
    spaceless = ["a" * 60_000] * 10  # one of these is encoded whole: ~14 ms each here
    assert chunks(spaceless) == [(0, 4), (4, 8), (8, 10)]
    assert chunks(["a" * (CHUNK_CHARS + 1), "b"]) == [(0, 1), (1, 2)]  # one text over the bound: alone
    assert chunks([]) == []


def test_long_prefix_grows_until_the_limit_is_passed_or_the_text_ends():
    calls = []

    def count(text):
        calls.append(len(text))
        return text.split()

    padded = " " * 5000 + "one two"
    prefix, ids = long_prefix(padded, 3, count)
    assert prefix == padded and ids == ["one", "two"]
    prefix, ids = long_prefix("w " * 1000, 3, count)
    assert len(ids) > 3 and len(prefix) < 100


def test_truncated_token_ids_keep_the_closing_special_token(bundled_model_path):
    closing = TextTokenizer(str(bundled_model_path)).closing_ids
    assert closing == [102]
    ids = np.array([101] + [2773] * 300 + [102])
    assert truncate_ids(ids, 256, closing).tolist() == [101] + [2773] * 254 + [102]
    no_sep = np.array([101] + [2773] * 300)
    assert truncate_ids(no_sep, 256, closing).tolist() == no_sep[:256].tolist()


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_truncating_from_a_prefix_holds_where_the_vocabulary_merges_across_spaces(kind):
    """SentencePiece without whitespace splitting learns pieces that span a space; a prefix's last
    tokens can then differ from the whole text's (1 in 300 here without the margin), never the
    `limit` first ones."""
    if kind == "bpe":
        tok, trainer = Tokenizer(models.BPE(unk_token="[UNK]")), trainers.BpeTrainer(vocab_size=1500)
    else:
        tok, trainer = Tokenizer(models.Unigram()), trainers.UnigramTrainer(vocab_size=1500)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(split=False)
    rnd = random.Random(1)
    tok.train_from_iterator([random_text(rnd, 50) for _ in range(400)], trainer)
    assert any("▁" in piece[1:] for piece in tok.get_vocab())  # pieces across a space exist

    def encode(text: str) -> list[int]:
        return tok.encode(text).ids

    for _ in range(300):
        text, limit = random_text(rnd, rnd.randint(100, 400)), rnd.randint(20, 80)
        prefix, _ = long_prefix(text, limit, encode)
        assert encode(prefix)[:limit] == encode(text)[:limit], (text, limit)


def test_word_ends_match_their_definition_on_random_texts():
    def by_definition(text: str, end: int, search_on: bool) -> int:
        if end >= len(text):
            return len(text)
        ends = [p for p in range(1, len(text)) if text[p] == " " and text[p - 1] != " "]
        before = [p for p in ends if p <= end]
        if before:
            return max(before)
        return min(ends) if search_on and ends else len(text)

    rnd = random.Random(4)
    for _ in range(20_000):
        text = "".join(rnd.choice(" ab") for _ in range(rnd.randint(0, 30)))
        end, search_on = rnd.randint(0, 35), rnd.random() < 0.5
        assert word_end_before(text, end, search_on) == by_definition(text, end, search_on), (text, end)
