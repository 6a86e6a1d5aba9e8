"""The model executor process: token ids in, pooled embeddings out (PyTorch; CPU or CUDA)."""
