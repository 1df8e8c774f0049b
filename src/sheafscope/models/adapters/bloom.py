"""BLOOM: fused query_key_value with the same per-head interleave as GPT-NeoX (D2); ALiBi."""

from __future__ import annotations

from sheafscope.models.adapters.base import FusedInterleavedQKVAdapter


class BloomAdapter(FusedInterleavedQKVAdapter):
    family = "bloom"
    model_types = ("bloom",)
    blocks_paths = ("transformer.h", "h")
    attention_path = "self_attention"
    norm_path = "input_layernorm"
    fast_path_supported = False
    fast_path_note = "bloom uses ALiBi outside the attention interface"
