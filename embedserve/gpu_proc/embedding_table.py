"""The executor's half of the whole-input cache: a fixed table of embeddings, indexed by slot.

The scheduler decides which slot holds which token sequence (scheduler_proc/embedding_cache.py);
this table only stores and returns rows.
"""

from __future__ import annotations

import numpy as np


class EmbeddingTable:
    def __init__(self, slots: int, dim: int):
        # NOTE: float32 whatever the model dtype: rows are final embeddings, as the client receives them.
        self.rows = np.zeros((slots, dim), dtype=np.float32)

    def store(self, slot: int, row: np.ndarray) -> None:
        self.rows[slot] = row

    def read(self, slot: int) -> np.ndarray:
        return self.rows[slot]
