"""A batch text tokenizer that adds the model's own special tokens and never pads or truncates silently."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Protocol

from embedserve.startup_error import StartupError, one_line
from embedserve.tokenizer_proc.long_text import cut_to_max_chars, is_long, long_prefix

logger = logging.getLogger(__name__)


class _Backend(Protocol):
    def encode_batch(self, texts: list[str], max_length: int | None) -> list[list[int]]: ...


class TextTokenizer:
    """Encodes texts exactly as the model's Hugging Face tokenizer does, special tokens included.

    With `max_length` the tokenizer truncates (keeping the closing special tokens, as
    sentence-transformers does); without it, inputs come back whole for the caller to check.
    """

    def __init__(self, path: str):
        tokenizer_json = Path(path) / "tokenizer.json"
        try:
            self._backend: _Backend = (
                _FastBackend(str(tokenizer_json)) if tokenizer_json.is_file() else _TransformersBackend(path)
            )
        except Exception as exc:
            raise StartupError(
                f"cannot load a tokenizer from {path} (check --tokenizer-path): {type(exc).__name__}: "
                f"{one_line(exc)}"
            ) from exc
        if isinstance(self._backend, _FastBackend):
            self._backend = _prefer_transformers_if_different(self._backend, path)
        probes = self._backend.encode_batch(["a", "b", "1", "hello world"], None)
        if not all(probes):
            # NOTE: transformers builds an empty-vocabulary tokenizer for a folder without its files;
            # every text would then be refused as having no tokens, the warm-up request first.
            raise StartupError(
                f"the tokenizer loaded from {path} gives no token ids for plain words ('hello world'): "
                "is the folder missing its tokenizer files (tokenizer.json, or vocab and merges)? "
                "Point --tokenizer-path at a folder that has them"
            )
        self.closing_ids = _common_suffix(probes[:3])
        """The special ids the tokenizer ends every text with (BERT's [SEP], a decoder's EOS), if any."""

    def encode_batch(
        self,
        texts: list[str],
        max_length: int | None = None,
        stop_above: int | None = None,
        counted_in_part: set[int] | None = None,
    ) -> list[list[int]]:
        """Each text's ids. With `max_length` or `stop_above`, a text that `long_text.is_long` calls
        long is tokenized from a prefix (see long_text.py). With `max_length`, its ids are still
        those of the whole text truncated, the text first cut to `long_text.max_chars`; with
        `stop_above` alone, a text of more tokens than that may come back as only its first ones,
        more than `stop_above` of them (the caller refuses texts over `max_chars` beforehand), and
        its index goes into `counted_in_part`."""
        limit = max_length or stop_above
        if not texts or limit is None:
            return self._backend.encode_batch(texts, max_length) if texts else []
        if max_length is not None:
            texts = [cut_to_max_chars(text, max_length) for text in texts]
        out: list[list[int]] = [[] for _ in texts]
        long = [is_long(text, limit) for text in texts]
        short = [i for i, cut in enumerate(long) if not cut]
        encoded = self._backend.encode_batch([texts[i] for i in short], max_length) if short else []
        for i, ids in zip(short, encoded, strict=True):
            out[i] = ids
        for i in (i for i, cut in enumerate(long) if cut):
            prefix, ids = long_prefix(texts[i], limit, self._whole_ids)
            if counted_in_part is not None and len(prefix) < len(texts[i]):
                counted_in_part.add(i)
            cut_to_fit = max_length is not None and len(ids) > max_length
            out[i] = self._backend.encode_batch([prefix], max_length)[0] if cut_to_fit else ids
        return out

    def _whole_ids(self, text: str) -> list[int]:
        return self._backend.encode_batch([text], None)[0]


def _common_suffix(sequences: list[list[int]]) -> list[int]:
    n = 0
    while all(len(seq) > n for seq in sequences) and len({seq[-1 - n] for seq in sequences}) == 1:
        n += 1
    return sequences[0][len(sequences[0]) - n :]


_PROBE = ["Special tokens decide embeddings.", "a"]


def _prefer_transformers_if_different(fast: _FastBackend, path: str) -> _Backend:
    """The Hugging Face tokenizer is the reference: tokenizer_config.json can add tokens that
    tokenizer.json alone does not (e.g. `add_eos_token`, which decoder embedders rely on for their
    last-token pooling). If the two disagree on a probe, use the reference; a dropped EOS is silent."""
    try:
        reference = _TransformersBackend(path)
    except Exception:  # no usable transformers tokenizer: tokenizer.json is all there is
        return fast
    if reference.encode_batch(_PROBE, None) != fast.encode_batch(_PROBE, None):
        logger.info("tokenizer.json alone differs from the model's tokenizer settings; using transformers.")
        return reference
    return fast


class _FastBackend:
    """The `tokenizers` library straight from tokenizer.json: no transformers import, no Python loop."""

    def __init__(self, tokenizer_json: str):
        from tokenizers import Tokenizer

        # NOTE: some checkpoints (the bundled MiniLM among them) bake padding and truncation to 128
        # into tokenizer.json; both would silently change embeddings, so they are turned off here.
        self._whole = Tokenizer.from_file(tokenizer_json)
        self._whole.no_padding()
        self._whole.no_truncation()
        self._truncating: dict[int, object] = {}
        self._path = tokenizer_json

    def _truncating_tokenizer(self, max_length: int):
        from tokenizers import Tokenizer

        if max_length not in self._truncating:
            tok = Tokenizer.from_file(self._path)
            tok.no_padding()
            tok.enable_truncation(max_length=max_length)
            self._truncating[max_length] = tok
        return self._truncating[max_length]

    def encode_batch(self, texts: list[str], max_length: int | None) -> list[list[int]]:
        tok = self._whole if max_length is None else self._truncating_tokenizer(max_length)
        return [enc.ids for enc in tok.encode_batch(texts, add_special_tokens=True)]


class _TransformersBackend:
    """Fallback for folders without tokenizer.json (sentencepiece or vocab files only)."""

    def __init__(self, path: str):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(path)

    def encode_batch(self, texts: list[str], max_length: int | None) -> list[list[int]]:
        out = self._tok(
            texts, add_special_tokens=True, truncation=max_length is not None, max_length=max_length
        )
        return [list(ids) for ids in out["input_ids"]]
