"""GPT-2: fused `c_attn` is a Conv1D with weight (in, out) = (D, 3D), columns [Q | K | V].

Quantized with bitsandbytes, transformers replaces each Conv1D by a Linear4bit/Linear8bitLt
holding the transposed weight (out, in), quantized (D5): read it through dense_weight.
"""

from __future__ import annotations

import torch
from torch import nn

from sheafscope.models.adapters.base import Adapter, dense_weight


def _in_out(module: nn.Module) -> torch.Tensor:
    """The layer's weight as float32 (in, out), whether a Conv1D or a bitsandbytes Linear."""
    if type(module.weight).__name__ in ("Params4bit", "Int8Params"):
        return dense_weight(module).T
    return module.weight.detach().float()


class GPT2Adapter(Adapter):
    family = "gpt2"
    model_types = ("gpt2",)
    blocks_paths = ("transformer.h", "h")
    attention_path = "attn"
    norm_path = "ln_1"

    def value_weight(self, layer: int) -> torch.Tensor:
        g = self.geometry
        d = g.n_heads * g.head_dim
        w = _in_out(self.attention(layer).c_attn)  # Conv1D: (in, out)
        return w[:, 2 * d : 3 * d].T.reshape(g.n_heads, g.head_dim, g.d_model)

    def value_bias(self, layer: int) -> torch.Tensor | None:
        g = self.geometry
        d = g.n_heads * g.head_dim
        return self.attention(layer).c_attn.bias.detach().float()[2 * d : 3 * d].view(g.n_heads, g.head_dim)

    def output_weight(self, layer: int) -> torch.Tensor:
        g = self.geometry
        w = _in_out(self.attention(layer).c_proj).T  # Conv1D (in, out) -> (out, in)
        return w.reshape(g.d_model, g.n_heads, g.head_dim).permute(1, 0, 2)

    def value_input_module(self, layer: int) -> nn.Module:
        return self.attention(layer).c_attn

    def output_module(self, layer: int) -> nn.Module:
        return self.attention(layer).c_proj
