"""On the CPU a batch runs at a token count rounded up to one of a few sizes, so oneDNN reuses its GEMMs.

oneDNN builds (JIT-compiles) a GEMM for every new row count and caches it by shape, and a batch's
row count is its token count, which the scheduler's batches rarely repeat. Measured on 2 cores of an
Intel Xeon with AMX, all-MiniLM-L6-v2 bf16, batches of 8 mixed inputs (~450-800 tokens): 43-61 ms
for a token count not seen before, 16-33 ms for the same batch again; the four linear shapes alone
take 10-15 ms longer on a new row count. At 16 clients x 1 input nearly every batch was a new one.

Rounded up to a multiple of 1/16 of its power of two, a batch carries under 6.25 % dummy tokens
(none under 32 tokens), and a 4,096-token budget meets 144 sizes in all: 576 GEMMs for a BERT's four
linear shapes, which oneDNN's primitive cache (1,024 entries by default) keeps.

NOTE: no coarser floor for small batches. Every size built, one sequence of M tokens against M rounded
up to a multiple of 16 (as this module first did), MiniLM on 2 AMX cores: fp32 M = 5 3.8 against
5.0 ms, M = 10 4.3 against 4.8, M = 17 5.0 against 6.3, M = 100 13.7 against 14.6; bf16 2-9 % apart
the same way. A short query is the most common small batch, and what it pays for padding is latency.
"""

from __future__ import annotations

import numpy as np

STEPS_PER_OCTAVE = 16  # NOTE: a power of two: the step is the count's power of two over this
# Dummy tokens come in sequences of at most this many, so their attention (quadratic in a sequence's
# length) stays negligible however large the batch budget: 1,023 dummies in one sequence would be a
# quarter more attention on a 16k-token batch of 256-token inputs.
DUMMY_SEQUENCE_TOKENS = 64


def padded_token_count(tokens: int) -> int:
    """`tokens` rounded up to the next size a batch runs at."""
    step = 1 << max(0, tokens.bit_length() - STEPS_PER_OCTAVE.bit_length())
    return -(-tokens // step) * step


def pad_batch(
    input_ids: np.ndarray, lens: np.ndarray, positions: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The batch with dummy sequences appended that bring it to `padded_token_count` tokens
    (unchanged when it is already there). A dummy is token 0 at position 0 throughout, so it fits
    any vocabulary and context; attention runs within each sequence, so the real ones never see it.
    The caller keeps only the first `len(lens)` pooled rows."""
    pad = padded_token_count(len(input_ids)) - len(input_ids)
    if pad == 0:
        return input_ids, lens, positions
    whole, rest = divmod(pad, DUMMY_SEQUENCE_TOKENS)
    dummies = [DUMMY_SEQUENCE_TOKENS] * whole + ([rest] if rest else [])
    return (
        np.concatenate([input_ids, np.zeros(pad, dtype=input_ids.dtype)]),
        np.concatenate([lens, np.asarray(dummies, dtype=lens.dtype)]),
        np.concatenate([positions, np.zeros(pad, dtype=positions.dtype)]),
    )
