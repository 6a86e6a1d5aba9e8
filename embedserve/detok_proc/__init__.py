"""The output process ("detokenizer"): assembles each request's embeddings and encodes its response."""
