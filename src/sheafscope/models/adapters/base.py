"""The adapter interface: where one architecture family keeps its attention weights.

An adapter answers, for layer l of a loaded transformers model: the value projection of
every KV head (d_head x d_model, float32, dequantized), which KV head each query head reads,
the output projection of each head, and the gain of the norm that precedes attention.
Everything else in sheafscope is architecture-agnostic.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import ClassVar, Iterator

import torch
from torch import nn

from sheafscope.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class Geometry:
    """Attention shape of a model. head_dim is read from the model, never hidden/heads (D4)."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_model: int
    causal: bool

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 without grouped-query attention)."""
        return self.n_heads // self.n_kv_heads

    def kv_head(self, head: int) -> int:
        """The KV head that query head `head` reads (D3: grouped-query attention)."""
        return head // self.group_size


def dense_weight(module: nn.Module) -> torch.Tensor:
    """A linear layer's weight as float32 (out, in), dequantized where it is quantized (D5).

    A bitsandbytes 4-bit weight is stored as packed uint8 bytes of shape (n*m/2, 1): reading
    `.data.float()` gives byte values, not weights, so it must go through dequantize_4bit.
    An 8-bit weight (Linear8bitLt, LLM.int8()) is int8 codes CB, one row per output, with the
    rows' absmax SCB: the weight is CB * SCB / 127 (see int8_weight).
    """
    w = module.weight
    cls = type(w).__name__
    if cls == "Params4bit":
        import bitsandbytes.functional as bnbf

        if getattr(w.quant_state, "packing_format_for_cpu", False):
            return _dequantize_cpu_packed_4bit(w.data, w.quant_state)
        return bnbf.dequantize_4bit(w.data, w.quant_state).float()
    if cls == "Int8Params":
        return int8_weight(module)
    if w.dtype in (torch.uint8, torch.int8):
        raise UnsupportedArchitectureError(
            f"weight of {type(module).__name__} is stored as {w.dtype} with no known dequantizer; "
            "load the model without quantization or with bitsandbytes 4/8-bit"
        )
    return w.detach().float()


def int8_weight(module: nn.Module) -> torch.Tensor:
    """Dequantize a bitsandbytes Linear8bitLt weight: float32 (out, in) = CB * SCB / 127.

    bitsandbytes (0.45 to 0.50 at least, CPU and CUDA alike) keeps the int8 codes in
    weight.data (= weight.CB) and the per-row absmax in weight.SCB until the layer's first
    forward pass; that pass moves CB and SCB to module.state and sets weight.CB/SCB to None,
    and weight.data stays the int8 codes. Its kernels multiply by exactly CB * SCB / 127
    (int8_mm_dequant scales the int32 product by SCA * SCB / 127^2). A weight still held in
    floating point (has_fp16_weights, or not yet moved to a device) is returned as it is.
    """
    w = module.weight
    if w.dtype != torch.int8:
        return w.detach().float()
    scb = getattr(w, "SCB", None)
    if scb is None:
        state = getattr(module, "state", None)
        scb = getattr(state, "SCB", None) if state is not None else None
    if scb is None:
        raise UnsupportedArchitectureError(
            f"{type(module).__name__}: 8-bit weight without its SCB row scales (neither weight.SCB nor state.SCB); "
            "cannot dequantize it. Load the model without --quantize or with --quantize 4bit"
        )
    codes = w.detach()
    if scb.numel() != codes.shape[0]:
        raise UnsupportedArchitectureError(
            f"{type(module).__name__}: 8-bit weight {tuple(codes.shape)} with {scb.numel()} row scales; "
            "unrecognised bitsandbytes layout. Load the model without --quantize or with --quantize 4bit"
        )
    return codes.float() * (scb.detach().float().reshape(-1, 1) / 127.0)


def _dequantize_cpu_packed_4bit(packed: torch.Tensor, state) -> torch.Tensor:
    """Dequantize a 4-bit weight in bitsandbytes' AVX512-BF16 CPU layout.

    bitsandbytes >= 0.48 repacks a 4-bit weight on its first CPU forward pass: (N, K/2) bytes in
    tiles of 32 output rows, each 64-index run stored as 32 low and 32 high nibbles, with absmax
    as a bfloat16 (K/blocksize, N) matrix. dequantize_4bit does not read that layout, and
    bitsandbytes' own inverse (0.50.2) does not restore the weights, so unpack it here: these are
    exactly the values the CPU kernel multiplies by.
    """
    tile = 32
    n_out, half_k = packed.shape
    n_in = 2 * half_k
    if n_out % tile or tuple(state.shape) != (n_out, n_in):
        raise UnsupportedArchitectureError(
            f"unrecognised bitsandbytes CPU 4-bit layout {tuple(packed.shape)} for a "
            f"{tuple(state.shape)} weight; load the model without quantization"
        )
    runs = packed.reshape(-1, tile)
    codes = torch.cat([runs & 0xF, runs >> 4], dim=-1)
    codes = codes.reshape(n_out // tile, half_k, tile, 2).transpose(1, 2).reshape(n_out, n_in)
    scale = state.absmax.float().T.repeat_interleave(state.blocksize, dim=1)
    return state.code.float()[codes.long()] * scale


def resolve_path(root: nn.Module, dotted: str) -> nn.Module | None:
    obj = root
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


class Adapter:
    """Base class: one subclass per architecture family, registered by config.model_type.

    Subclasses set the class attributes and implement `value_weight` and `output_weight`.
    """

    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    causal: ClassVar[bool] = True
    auto_class: ClassVar[str] = "AutoModelForCausalLM"
    blocks_paths: ClassVar[tuple[str, ...]]  # dotted paths to the list of transformer blocks
    attention_path: ClassVar[str]  # dotted path from a block to its attention module
    norm_path: ClassVar[str | None] = None  # dotted path from a block to the pre-attention norm
    norm_gain_offset: ClassVar[float] = 0.0  # Gemma's RMSNorm scales by (1 + weight)
    # Whether attention runs through transformers' AttentionInterface, so that the fast path
    # (capture/fast.py) can capture it; if not, fast_path_note says why and the family runs eager.
    fast_path_supported: ClassVar[bool] = True
    fast_path_note: ClassVar[str] = ""

    def __init__(self, model: nn.Module):
        self.model = model
        blocks = None
        for path in self.blocks_paths:
            blocks = resolve_path(model, path)
            if blocks is not None:
                break
        if blocks is None:
            raise UnsupportedArchitectureError(
                f"{type(model).__name__}: none of {self.blocks_paths} found; "
                f"the {self.family} adapter does not know this model class"
            )
        self.blocks = list(blocks)
        self.geometry = self._geometry()

    # -- per family -------------------------------------------------------------------------
    def value_weight(self, layer: int) -> torch.Tensor:
        """Value projection per KV head: (n_kv_heads, head_dim, d_model), float32."""
        raise NotImplementedError

    def value_bias(self, layer: int) -> torch.Tensor | None:
        """Value bias per KV head: (n_kv_heads, head_dim), or None."""
        return None

    def output_weight(self, layer: int) -> torch.Tensor:
        """Output projection per query head: (n_heads, d_model, head_dim), float32."""
        raise NotImplementedError

    def value_input_module(self, layer: int) -> nn.Module:
        """The module whose forward input is the hidden state that values are computed from."""
        raise NotImplementedError

    def output_module(self, layer: int) -> nn.Module:
        """The module whose forward input is the heads' concatenated attention output."""
        raise NotImplementedError

    def _head_dim(self, attn: nn.Module) -> int:
        cfg = self.model.config
        hd = getattr(attn, "head_dim", None) or getattr(attn, "attention_head_size", None)
        return int(hd or getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)

    # -- shared ------------------------------------------------------------------------------
    def _geometry(self) -> Geometry:
        cfg = self.model.config
        cfg = getattr(cfg, "text_config", None) or cfg
        n_heads = int(cfg.num_attention_heads)
        n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_heads)
        attn = self.attention(0)
        return Geometry(
            n_layers=len(self.blocks),
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=self._head_dim(attn),
            d_model=int(cfg.hidden_size),
            causal=self.causal,
        )

    @contextmanager
    def onloaded(self, layer: int) -> Iterator[None]:
        """Layer `layer`'s weights readable while open: modules whose weights accelerate
        offloaded to the CPU or disk (on the meta device in between) have them loaded through
        their offload hooks, and put back afterwards. A no-op for a model on its devices."""
        with ExitStack() as stack:
            modules = [m for m in self.blocks[layer].modules() if hasattr(m, "_hf_hook")]
            if modules:
                from accelerate.utils import align_module_device, has_offloaded_params

                for m in modules:
                    if has_offloaded_params(m):
                        stack.enter_context(align_module_device(m))
            yield

    def attention(self, layer: int) -> nn.Module:
        """The attention module of a layer."""
        return resolve_path(self.blocks[layer], self.attention_path)

    def kv_head_index(self) -> list[int]:
        """For each query head, the index of the KV head it reads."""
        return [self.geometry.kv_head(h) for h in range(self.geometry.n_heads)]

    def head_value_weights(self, layer: int) -> torch.Tensor:
        """W_V^h for every query head: (n_heads, head_dim, d_model), float32."""
        w = self.value_weight(layer)
        g = self.geometry
        expected = (g.n_kv_heads, g.head_dim, g.d_model)
        if tuple(w.shape) != expected:
            raise UnsupportedArchitectureError(
                f"{self.family} adapter: value weight of layer {layer} has shape {tuple(w.shape)}, "
                f"expected {expected}"
            )
        return w[self.kv_head_index()]

    def head_value_bias(self, layer: int) -> torch.Tensor | None:
        b = self.value_bias(layer)
        return None if b is None else b[self.kv_head_index()]

    def norm_gain(self, layer: int) -> torch.Tensor | None:
        """Gain of the norm applied right before attention, (d_model,), or None (post-norm)."""
        if self.norm_path is None:
            return None
        norm = resolve_path(self.blocks[layer], self.norm_path)
        if norm is None or getattr(norm, "weight", None) is None:
            return None
        return norm.weight.detach().float() + self.norm_gain_offset


class SeparateProjectionsAdapter(Adapter):
    """Families with a separate value projection `v_path` and output projection `o_path`
    (nn.Linear, weight (out, in)): OPT, Llama, Mistral, Qwen2, Gemma, BERT."""

    v_path: ClassVar[str] = "v_proj"
    o_path: ClassVar[str] = "o_proj"
    o_from_block: ClassVar[bool] = False  # BERT keeps its output projection outside `attention`

    def _v(self, layer: int) -> nn.Module:
        return resolve_path(self.attention(layer), self.v_path)

    def _o(self, layer: int) -> nn.Module:
        root = self.blocks[layer] if self.o_from_block else self.attention(layer)
        return resolve_path(root, self.o_path)

    def value_weight(self, layer: int) -> torch.Tensor:
        g = self.geometry
        return dense_weight(self._v(layer)).view(g.n_kv_heads, g.head_dim, g.d_model)

    def value_bias(self, layer: int) -> torch.Tensor | None:
        b = getattr(self._v(layer), "bias", None)
        g = self.geometry
        return None if b is None else b.detach().float().view(g.n_kv_heads, g.head_dim)

    def output_weight(self, layer: int) -> torch.Tensor:
        g = self.geometry
        return dense_weight(self._o(layer)).view(g.d_model, g.n_heads, g.head_dim).permute(1, 0, 2)

    def value_input_module(self, layer: int) -> nn.Module:
        return self._v(layer)

    def output_module(self, layer: int) -> nn.Module:
        return self._o(layer)


class FusedInterleavedQKVAdapter(Adapter):
    """Fused `query_key_value` laid out per head as [q_h, k_h, v_h] (GPT-NeoX, BLOOM).

    Taking rows 2*hidden: as W_V (the notebooks) mixes keys and values of several heads (D1, D2).
    """

    qkv_path: ClassVar[str] = "query_key_value"
    o_path: ClassVar[str] = "dense"

    def _qkv(self, layer: int) -> nn.Module:
        return resolve_path(self.attention(layer), self.qkv_path)

    def value_weight(self, layer: int) -> torch.Tensor:
        g = self.geometry
        return dense_weight(self._qkv(layer)).view(g.n_heads, 3, g.head_dim, g.d_model)[:, 2]

    def value_bias(self, layer: int) -> torch.Tensor | None:
        b = getattr(self._qkv(layer), "bias", None)
        g = self.geometry
        return None if b is None else b.detach().float().view(g.n_heads, 3, g.head_dim)[:, 2]

    def output_weight(self, layer: int) -> torch.Tensor:
        g = self.geometry
        o = dense_weight(resolve_path(self.attention(layer), self.o_path))
        return o.view(g.d_model, g.n_heads, g.head_dim).permute(1, 0, 2)

    def value_input_module(self, layer: int) -> nn.Module:
        return self._qkv(layer)

    def output_module(self, layer: int) -> nn.Module:
        return resolve_path(self.attention(layer), self.o_path)
