"""BERT encoders: bidirectional attention, post-norm; value in attention.self.value."""

from __future__ import annotations

from sheafscope.models.adapters.base import SeparateProjectionsAdapter


class BertAdapter(SeparateProjectionsAdapter):
    family = "bert"
    model_types = ("bert",)
    causal = False
    auto_class = "AutoModel"
    blocks_paths = ("encoder.layer", "bert.encoder.layer")
    attention_path = "attention.self"
    v_path = "value"
    o_path = "attention.output.dense"
    o_from_block = True
    norm_path = None  # post-norm: the LayerNorm follows attention
