"""Llama-style decoders: v_proj (n_kv_heads * head_dim, D), o_proj; grouped-query heads (D3)."""

from __future__ import annotations

from sheafscope.models.adapters.base import SeparateProjectionsAdapter


class LlamaAdapter(SeparateProjectionsAdapter):
    family = "llama"
    model_types = ("llama",)
    blocks_paths = ("model.layers", "layers")
    attention_path = "self_attn"
    norm_path = "input_layernorm"


class MistralAdapter(LlamaAdapter):
    family = "mistral"
    model_types = ("mistral",)


class Qwen2Adapter(LlamaAdapter):
    family = "qwen2"
    model_types = ("qwen2",)
