"""OPT: separate v_proj / out_proj. opt-350m is post-norm (do_layer_norm_before=False)."""

from __future__ import annotations

import torch

from sheafscope.models.adapters.base import SeparateProjectionsAdapter


class OPTAdapter(SeparateProjectionsAdapter):
    family = "opt"
    model_types = ("opt",)
    blocks_paths = ("model.decoder.layers", "decoder.layers")
    attention_path = "self_attn"
    o_path = "out_proj"
    norm_path = "self_attn_layer_norm"

    def norm_gain(self, layer: int) -> torch.Tensor | None:
        # In post-norm OPT the layer norm follows attention, so no gain precedes W_V.
        if not getattr(self.model.config, "do_layer_norm_before", True):
            return None
        return super().norm_gain(layer)
