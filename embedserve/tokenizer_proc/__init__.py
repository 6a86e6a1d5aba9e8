"""The tokenizer process: text -> token ids in the shared-memory token ring."""
