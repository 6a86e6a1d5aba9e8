"""One file per architecture family; `registry` maps config.json's architecture name to its class."""

from embedserve.gpu_proc.models.registry import MODEL_REGISTRY, get_model_class

__all__ = ["MODEL_REGISTRY", "get_model_class"]
