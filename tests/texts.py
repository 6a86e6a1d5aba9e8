"""Seeded English-like texts of mixed length, for parity tests (one word up to ~250 tokens)."""

from __future__ import annotations

import random

_WORDS = (
    "the a model server embedding vector search query passage document retrieval index chunk token "
    "language city river mountain history science music quick brown fox jumps over lazy dog cat "
    "because however therefore while during before after between under above system network data "
    "learning neural graph memory cache batch latency throughput request response client kernel "
    "Paris London Tokyo 2024 42 3.14 café naïve über résumé GPU CPU open-source self-hosted"
).split()


def mixed_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        length = rng.randint(1, 12) if i % 2 == 0 else rng.randint(40, 200)
        words = [rng.choice(_WORDS) for _ in range(length)]
        texts.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ""]))
    return texts
