"""The eager reference path: explicit attention matrices from the model's own forward pass.

Slow and memory-hungry (every n x n matrix of every layer) but independent of any kernel:
the fast diagonal path is tested against it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sheafscope.errors import NonFiniteError, SheafscopeError
from sheafscope.sheaf import offdiag_mass


@dataclass
class PromptCapture:
    """What one forward pass yields for one prompt (numpy, float64)."""

    n_tokens: int
    offdiag_mass: np.ndarray  # (layers, heads): n - sum_i A_h[i,i]
    first_token_mass: np.ndarray  # (layers, heads): mean over i >= 1 of A_h[i, 0]
    max_abs_hidden: np.ndarray  # (layers + 1,): max |h| of each residual stream


def check_finite(name: str, t: torch.Tensor, dtype: torch.dtype) -> None:
    if not torch.isfinite(t).all():
        hint = (
            "float16 overflows in this model: rerun with --dtype bfloat16 or --dtype float32"
            if dtype == torch.float16
            else "the weights or inputs contain NaN/Inf; check the checkpoint, or rerun with --dtype float32"
        )
        raise NonFiniteError(f"the forward pass produced NaN/Inf in {name} (dtype {str(dtype).removeprefix('torch.')}): {hint}")


@torch.no_grad()
def capture_eager(model: torch.nn.Module, input_ids: torch.Tensor, n_layers: int) -> PromptCapture:
    """Run one prompt (input_ids of shape (1, n)) with explicit attentions and hidden states."""
    out = model(input_ids=input_ids, output_attentions=True, output_hidden_states=True, use_cache=False)
    attentions = out.attentions
    # D7: transformers >= 5 returns () rather than None when the attention kernel cannot
    # return weights (sdpa, flash): an empty tuple must fail loudly, not read as zero layers.
    if not attentions or len(attentions) != n_layers or any(a is None for a in attentions):
        impl = getattr(model.config, "_attn_implementation", "?")
        got = "nothing" if not attentions else f"{sum(a is not None for a in attentions)} of {n_layers} layers"
        raise SheafscopeError(
            f"the model returned attention weights for {got} (attn_implementation={impl!r}); "
            "the eager path needs attn_implementation='eager'"
        )
    dtype = attentions[0].dtype
    n = input_ids.shape[1]
    off, sink = [], []
    for layer, a in enumerate(attentions):
        check_finite(f"the attention of layer {layer}", a, dtype)
        a = a[0]  # (heads, n, n)
        off.append(offdiag_mass(a))
        sink.append(a[:, 1:, 0].double().mean(dim=-1) if n > 1 else torch.zeros(a.shape[0], dtype=torch.float64))
    hidden = out.hidden_states
    for layer, h in enumerate(hidden):
        check_finite(f"the hidden state after layer {layer - 1}" if layer else "the embeddings", h, h.dtype)
    max_abs = torch.stack([h[0].abs().max().double() for h in hidden]) if hidden else torch.zeros(0)
    return PromptCapture(
        n_tokens=n,
        offdiag_mass=torch.stack(off).cpu().numpy(),
        first_token_mass=torch.stack(sink).cpu().numpy(),
        max_abs_hidden=max_abs.cpu().numpy(),
    )
