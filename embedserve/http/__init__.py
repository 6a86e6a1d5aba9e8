"""The HTTP process: OpenAI's /v1/embeddings and SGLang's /encode in front of the pipeline."""
