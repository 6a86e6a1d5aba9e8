"""Which model class serves each `architectures[0]` of a checkpoint's config.json.

NOTE: `*ForCausalLM` checkpoints are served by their bare model: an embedding is a hidden state, so
the `lm_head` is never built and the weight loader skips it.
"""

from __future__ import annotations

from torch import nn

from embedserve.gpu_proc.models.bert import BertModel, XLMRobertaModel
from embedserve.gpu_proc.models.llama import LlamaModel
from embedserve.gpu_proc.models.qwen2 import Qwen2Model
from embedserve.gpu_proc.models.qwen3 import Qwen3Model

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "BertModel": BertModel,
    "XLMRobertaModel": XLMRobertaModel,
    "LlamaModel": LlamaModel,
    "LlamaForCausalLM": LlamaModel,
    # NOTE: Mistral is Llama's layer; its sliding window is checked against the context length.
    "MistralModel": LlamaModel,
    "MistralForCausalLM": LlamaModel,
    "Qwen2Model": Qwen2Model,
    "Qwen2ForCausalLM": Qwen2Model,
    "Qwen3Model": Qwen3Model,
    "Qwen3ForCausalLM": Qwen3Model,
}


def get_model_class(architecture: str) -> type[nn.Module]:
    if architecture not in MODEL_REGISTRY:
        raise ValueError(
            f"unsupported model architecture {architecture!r}; supported: {', '.join(sorted(MODEL_REGISTRY))}"
        )
    return MODEL_REGISTRY[architecture]
