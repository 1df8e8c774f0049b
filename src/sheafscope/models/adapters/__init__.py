"""Registry of architecture adapters, keyed by transformers' config.model_type.

Adding a family is adding a file with one Adapter subclass and listing it here.
"""

from __future__ import annotations

from torch import nn

from sheafscope.models.adapters.base import Adapter, Geometry, dense_weight
from sheafscope.models.adapters.bert import BertAdapter
from sheafscope.models.adapters.bloom import BloomAdapter
from sheafscope.models.adapters.gemma import Gemma2Adapter, Gemma3Adapter, GemmaAdapter
from sheafscope.models.adapters.gpt2 import GPT2Adapter
from sheafscope.models.adapters.llama import LlamaAdapter, MistralAdapter, Qwen2Adapter
from sheafscope.models.adapters.neox import GPTNeoXAdapter
from sheafscope.models.adapters.opt import OPTAdapter
from sheafscope.errors import UnsupportedArchitectureError

ADAPTERS: dict[str, type[Adapter]] = {
    mt: cls
    for cls in (
        GPT2Adapter, OPTAdapter, GPTNeoXAdapter, BloomAdapter, LlamaAdapter, MistralAdapter,
        Qwen2Adapter, GemmaAdapter, Gemma2Adapter, Gemma3Adapter, BertAdapter,
    )
    for mt in cls.model_types
}


def supported_model_types() -> list[str]:
    return sorted(ADAPTERS)


def adapter_class(model_type: str) -> type[Adapter]:
    """The adapter class for a config.model_type, or a clear error listing the supported ones."""
    try:
        return ADAPTERS[model_type]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"architecture '{model_type}' is not supported: sheafscope does not know where it keeps "
            f"its value weights. Supported: {', '.join(supported_model_types())}. "
            "Adding one is one adapter file in sheafscope/adapters/ (see ARCHITECTURE.md)."
        ) from None


def adapter_for(model: nn.Module) -> Adapter:
    """Instantiate the adapter for a loaded transformers model."""
    cfg = model.config
    model_type = getattr(cfg, "model_type", None) or type(model).__name__
    return adapter_class(model_type)(model)


__all__ = ["Adapter", "Geometry", "ADAPTERS", "adapter_for", "adapter_class", "dense_weight", "supported_model_types"]
