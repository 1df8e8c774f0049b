"""Gemma 1/2/3: Llama layout, but head_dim is not hidden/heads (D4) and RMSNorm scales by (1 + w)."""

from __future__ import annotations

from sheafscope.models.adapters.llama import LlamaAdapter


class GemmaAdapter(LlamaAdapter):
    family = "gemma"
    model_types = ("gemma",)
    norm_gain_offset = 1.0


class Gemma2Adapter(GemmaAdapter):
    family = "gemma2"
    model_types = ("gemma2",)


class Gemma3Adapter(GemmaAdapter):
    family = "gemma3"
    model_types = ("gemma3", "gemma3_text")
    blocks_paths = ("model.language_model.layers", "model.layers", "language_model.layers", "layers")
