"""The tokenizer adds the model's own special tokens, never pads, and truncates only when asked."""

from __future__ import annotations

from transformers import AutoTokenizer

from embedserve.tokenizer_proc.text_tokenizer import TextTokenizer


def test_matches_the_hf_tokenizer_without_the_baked_in_128_truncation(bundled_model_path):
    ours = TextTokenizer(str(bundled_model_path))
    reference = AutoTokenizer.from_pretrained(str(bundled_model_path))
    long_text = "word " * 300
    texts = ["Once upon a time", "", long_text]
    assert ours.encode_batch(texts) == [reference.encode(t) for t in texts]
    assert len(ours.encode_batch([long_text])[0]) == 302  # no truncation to 128 unless asked
    truncated = ours.encode_batch([long_text], max_length=256)[0]
    assert len(truncated) == 256 and truncated[-1] == reference.sep_token_id  # closing [SEP] kept


def test_the_hf_tokenizer_wins_when_its_settings_add_tokens(bundled_model_path, monkeypatch):
    """If tokenizer_config.json makes the HF tokenizer add a token that tokenizer.json alone does not
    (gte-Qwen2's add_eos_token), the server must tokenize like the HF tokenizer: a dropped EOS is silent."""
    from embedserve.tokenizer_proc import text_tokenizer

    class AppendsEos:
        def __init__(self, path: str):
            self._tok = AutoTokenizer.from_pretrained(path)

        def encode_batch(self, texts, max_length):
            return [[*self._tok.encode(t), 999] for t in texts]

    monkeypatch.setattr(text_tokenizer, "_TransformersBackend", AppendsEos)
    assert TextTokenizer(str(bundled_model_path)).encode_batch(["hello"])[0][-1] == 999
