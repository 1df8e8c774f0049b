"""The fast path: attention statistics recorded inside the model's own forward pass.

For query row i, with s_ij the scores exactly as the model's softmax sees them and lse_i their
log-sum-exp, 1 - A[i,i] = -expm1(s_ii - lse_i) and A[i,0] = exp(s_i0 - lse_i) (sheaf.py). The
fused kernels return lse_i beside their output, so a layer's statistics cost two row-wise dot
products and no n x n matrix. They are computed when the held layers settle, after the forward
pass (or mid-way, past HOLD_BYTES), with the rows the lse cannot be trusted with (A_ii > 1/2)
recomputed exactly; small problems and what no kernel computes (soft-capping, a position bias)
get exact statistics for every row from blocks of scores at once (kernels.py).

`attention` below is registered in transformers' AttentionInterface as FAST_ATTENTION. It
records only inside a `Recorder` (found through a ContextVar, so nothing leaks between models
or threads); elsewhere it is transformers' sdpa.
"""

from __future__ import annotations

from collections import Counter
from contextvars import ContextVar
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from sheafscope.capture import joined, moved, stacked
from sheafscope.capture.kernels import BLOCK_ELEMENTS, attention_with_lse, block_statistics
from sheafscope.capture.scores import Scores
from sheafscope.errors import SheafscopeError
from sheafscope.sheaf import LSE_TRUSTED_FROM, row_stats_from_lse

FAST_ATTENTION = "sheafscope"
# Up to this many keys per row, every row is computed exactly from its scores (layer by layer,
# or where layers settle together, all at once if their scores fit one block): that costs less
# than finding and recomputing the rows the lse cannot be trusted with.
EXACT_KEYS = {"cpu": 128, "cuda": 128}
# Held layers settle mid-forward once their queries and keys pass this many bytes, so that long
# prompts do not keep every layer's q and k alive.
HOLD_BYTES = {"cpu": 1 << 28, "cuda": 1 << 30}
# Whether held layers are settled together (stacked, flagged rows of every key head in one padded
# product): on a GPU launches, not arithmetic, bound this step; on a CPU the copies and the
# padding cost more than a loop over layers and heads.
TOGETHER = {"cpu": False, "cuda": True}

_ACTIVE: ContextVar["Recorder | None"] = ContextVar("sheafscope_recorder", default=None)


class Recorder:
    """The statistics of one forward pass: per layer, (b, h, n) tensors on the layer's device,
    kept as the stacks of layers that settled together."""

    def __init__(self, layer_of: dict[int, int], valid: torch.Tensor):
        self.layer_of = layer_of  # id(attention module) -> layer index
        self.valid = valid  # (b, n) bool: rows that are real tokens
        # (layers, 1 - A_ii, A_i0): statistics (len(layers), b, h, n) settled together
        self.settled: list[tuple[list[int], torch.Tensor, torch.Tensor]] = []
        self.seen: set[int] = set()
        # (layer, q, k, log-sum-exp, score rule) of layers whose statistics wait for `settle`
        self.held: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, Scores]] = []
        self.held_bytes = 0  # of the held queries and keys
        self.ran: Counter = Counter()
        self.fallbacks: list[str] = []

    def __enter__(self) -> "Recorder":
        self._token = _ACTIVE.set(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        _ACTIVE.reset(self._token)

    def record(self, module: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               scores: Scores) -> torch.Tensor:
        """The attention output (b, h, n, d_v); what the layer's statistics are computed from is
        held until `settle` (where no kernel ran, the statistics themselves are kept)."""
        layer = self.layer_of.get(id(module))
        if layer is None:
            raise SheafscopeError(f"attention module {type(module).__name__} is not one of the model's layers")
        if layer in self.seen:
            raise SheafscopeError("one capture saw two forward passes; capture one batch per forward pass")
        self.seen.add(layer)
        out = None
        if scores.softcap is None and scores.bias is None:
            try:
                out, lse, kernel = attention_with_lse(q, k, v, scores)
                self.ran[kernel] += 1
            except RuntimeError as e:
                self._fallback(f"fused kernel failed on {q.device.type}: {str(e).splitlines()[0][:160]}")
        else:
            self._fallback("logit soft-capping" if scores.softcap is not None else "a position bias")
        if out is None:  # no kernel: output and exact statistics from blocks of scores
            out, off, first = block_statistics(q, k, v, scores)
            self.settled.append(([layer], off[None], first[None]))
        else:
            self.held.append((layer, q, k, lse, scores))
            self.held_bytes += q.nbytes + k.nbytes
            if self.held_bytes > HOLD_BYTES.get(q.device.type, 0):
                self.settle()
        return out

    def _fallback(self, why: str) -> None:
        self.ran["chunked"] += 1
        if why not in self.fallbacks:
            self.fallbacks.append(why)

    def settle(self) -> None:
        """The statistics of the held layers from their log-sum-exp, with the valid rows it cannot
        be trusted with recomputed exactly (or, for few keys, every row exactly); layer by layer
        or, where TOGETHER holds, all layers sharing a score rule at once."""
        held, self.held, self.held_bytes = self.held, [], 0
        groups: dict[tuple, list] = {}
        for entry in held:
            layer, q, *_, scores = entry
            alone = None if TOGETHER.get(q.device.type, False) else layer
            groups.setdefault((q.device, id(scores.mask), scores.scale, scores.causal, alone), []).append(entry)
        for entries in groups.values():
            layers, scores = [e[0] for e in entries], entries[0][4]
            q, k, lse = (stacked([e[i] for e in entries]) for i in (1, 2, 3))  # (layers, b, ...)
            together = TOGETHER.get(q.device.type, False)
            # settled together, layers go exact only within one block: more blocks cost launches
            one_block = not together or q.numel() // q.shape[-1] * k.shape[-2] <= BLOCK_ELEMENTS
            if k.shape[-2] <= EXACT_KEYS.get(q.device.type, 0) and one_block:
                self.settled.append((layers, *self._exact(q, k, scores)))
                self.ran["exact-rows"] += len(layers)
                continue
            own, first = scores.own_and_first(q, k)
            off, first = row_stats_from_lse(own, first, lse.to(own.dtype))
            flags = (off < LSE_TRUSTED_FROM) & self.valid.to(off.device)[:, None]
            li, bi, hi, ii = flags.nonzero().unbind(1)
            if len(li):  # in (layer, b, h, i) order, as exact_rows' padded route needs
                o, f = scores.exact_rows(q.flatten(0, 1), k.flatten(0, 1), li * q.shape[1] + bi, hi, ii, mask_b=bi,
                                         padded=together)
                off[li, bi, hi, ii], first[li, bi, hi, ii] = o.to(off.dtype), f.to(first.dtype)
                self.ran["rows-recomputed"] += len(li)
            self.settled.append((layers, off, first))

    @staticmethod
    def _exact(q: torch.Tensor, k: torch.Tensor, scores: Scores) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact statistics (layers, b, h, n) of every row of stacked layers, in one block of scores."""
        layers = q.shape[0]
        if layers > 1 and scores.mask is not None and scores.mask.shape[0] > 1:  # a mask per prompt, per layer
            scores = replace(scores, mask=scores.mask.repeat(layers, 1, 1, 1))
        _, off, first = block_statistics(q.flatten(0, 1), k.flatten(0, 1), None, scores)
        return off.unflatten(0, (layers, -1)), first.unflatten(0, (layers, -1))

    def statistics(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(1 - A_ii, A_i0) of every layer seen, (layers, b, h, n) in layer order, on `device`."""
        self.settle()
        layers = [layer for settled in self.settled for layer in settled[0]]
        off, first = (joined(moved([s[i] for s in self.settled], device)) for i in (1, 2))
        if layers != sorted(layers):  # layers with different score rules settle apart
            order = torch.tensor(sorted(range(len(layers)), key=layers.__getitem__), device=device)
            off, first = off[order], first[order]
        return off, first


def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
              is_causal: bool | None = None, softcap: float | None = None,
              position_bias: torch.Tensor | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function: query (b, h, n, d), key and value
    (b, h_kv, n_kv, d) in, output (b, n, h, d) out, as sdpa; no weights."""
    for sink in ("s_aux", "sinks"):
        if kwargs.get(sink) is not None:
            raise SheafscopeError(f"{FAST_ATTENTION} attention does not implement attention sinks ({sink}); "
                                  "analyze this model with attention='eager'")
    recorder = _ACTIVE.get()
    if recorder is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if dropout and module.training:
        raise SheafscopeError("attention statistics are measured in eval mode: call model.eval()")
    n, kv = query.shape[2], key.shape[2]
    if n != kv:
        raise SheafscopeError(f"attention statistics need one full forward pass (queries {n} != keys {kv}); "
                              "pass use_cache=False")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # sdpa's rule: a mask says everything; without one, is_causal applies.
    causal = bool(n > 1 and attention_mask is None and causal)
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    scores = Scores(scale, causal, attention_mask, softcap, position_bias)
    out = recorder.record(module, query, key, value, scores)
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Register the attention function and its mask builder (sdpa's) with transformers."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(FAST_ATTENTION, attention)
    AttentionMaskInterface.register(FAST_ATTENTION, sdpa_mask)
    return FAST_ATTENTION
