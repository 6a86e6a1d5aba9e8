"""embedserve: a self-hosted, OpenAI-compatible embedding server."""

__version__ = "0.1.0"
