"""GPT-NeoX / Pythia: fused query_key_value interleaved per head as [q_h, k_h, v_h] (D1)."""

from __future__ import annotations

from sheafscope.models.adapters.base import FusedInterleavedQKVAdapter


class GPTNeoXAdapter(FusedInterleavedQKVAdapter):
    family = "gpt_neox"
    model_types = ("gpt_neox",)
    blocks_paths = ("gpt_neox.layers", "layers")
    attention_path = "attention"
    norm_path = "input_layernorm"
