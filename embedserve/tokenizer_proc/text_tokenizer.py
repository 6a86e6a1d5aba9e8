"""A batch text tokenizer that adds the model's own special tokens and never pads or truncates silently."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Protocol

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
        self._backend: _Backend = (
            _FastBackend(str(tokenizer_json)) if tokenizer_json.is_file() else _TransformersBackend(path)
        )
        if isinstance(self._backend, _FastBackend):
            self._backend = _prefer_transformers_if_different(self._backend, path)

    def encode_batch(self, texts: list[str], max_length: int | None = None) -> list[list[int]]:
        if not texts:
            return []
        return self._backend.encode_batch(texts, max_length)


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
