"""Which model class serves each `architectures[0]` of a checkpoint's config.json."""

from __future__ import annotations

from torch import nn

from embedserve.gpu_proc.models.bert import BertModel

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "BertModel": BertModel,
}


def get_model_class(architecture: str) -> type[nn.Module]:
    if architecture not in MODEL_REGISTRY:
        raise ValueError(
            f"unsupported model architecture {architecture!r}; supported: {', '.join(sorted(MODEL_REGISTRY))}"
        )
    return MODEL_REGISTRY[architecture]
