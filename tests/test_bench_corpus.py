"""The benchmark corpus is reproducible and has the promised RAG-like length mix."""

import pytest

from embedserve.bench.corpus import (
    PASSAGE_TOKENS,
    QUERY_TOKENS,
    bundled_model_path,
    count_tokens,
    load_corpus_file,
    load_tokenizer,
    make_corpus,
    make_fixed_length_corpus,
)


@pytest.fixture(scope="module")
def model_path() -> str:
    return bundled_model_path()


def test_same_seed_same_corpus(model_path):
    assert make_corpus(200, 7, model_path) == make_corpus(200, 7, model_path)
    assert make_corpus(200, 7, model_path) != make_corpus(200, 8, model_path)


@pytest.mark.parametrize("n", [1, 2, 301])
def test_half_queries_half_passages_by_token_count(model_path, n):
    texts = make_corpus(n, 0, model_path)
    lengths = count_tokens(load_tokenizer(model_path), texts)
    queries = [t for t in lengths if QUERY_TOKENS[0] <= t <= QUERY_TOKENS[1]]
    passages = [t for t in lengths if PASSAGE_TOKENS[0] <= t <= PASSAGE_TOKENS[1]]
    assert len(texts) == n
    assert len(queries) == n // 2
    assert len(passages) == n - n // 2


def test_lengths_spread_over_the_ranges(model_path):
    lengths = count_tokens(load_tokenizer(model_path), make_corpus(400, 0, model_path))
    assert min(lengths) <= 7 and max(lengths) >= 240  # reaches both ends of the mix
    assert len(set(lengths)) > 100


def test_tokenizer_does_not_truncate_or_pad(model_path):
    # The bundled tokenizer.json pads and truncates to 128 unless told not to.
    tok = load_tokenizer(model_path)
    assert count_tokens(tok, ["word " * 300, "hi"]) == [302, 3]


def test_corpus_file_plain_and_jsonl(tmp_path):
    plain = tmp_path / "c.txt"
    plain.write_text("first text\n\nsecond text\n")
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"text": "a"}\n{"text": "b", "id": 2}\n')
    assert load_corpus_file(plain) == ["first text", "second text"]
    assert load_corpus_file(jsonl) == ["a", "b"]


@pytest.mark.parametrize(
    ("second_line", "says"),
    [
        ('{"txt": "b"}', 'line 3 has no "text"'),
        ('{"text": 5}', 'line 3 has no "text"'),
        ("{oops", "line 3 is not JSON"),
    ],
)
def test_corpus_file_names_the_bad_jsonl_line(tmp_path, second_line, says):
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"text": "a"}\n\n' + second_line + "\n")
    with pytest.raises(ValueError, match=says):
        load_corpus_file(jsonl)


@pytest.mark.parametrize("length", [16, 64, 256])
def test_fixed_length_corpus_is_exactly_that_long(model_path, length):
    texts = make_fixed_length_corpus(30, length, seed=2, tokenizer_path=model_path)
    assert len(set(texts)) > 1
    assert set(count_tokens(load_tokenizer(model_path), texts)) == {length}
