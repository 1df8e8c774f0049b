"""Capture: what runs inside the forward pass, behind one interface.

`capture(target, prompts, attention)` runs one batch of token-id prompts through the model and
returns, per prompt, layer and head, the off-diagonal attention mass n - sum_i A[i,i] and the
first-token mass, with the residual streams' maxima and means over positions 1..n-1, and what
ran. Two implementations: "fast" (fast.py: statistics from the fused kernels' log-sum-exp,
inside the forward pass) and "eager" (eager.py: every attention matrix explicit, the
reference). batching.py runs many prompts through either.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
from torch import nn

from sheafscope.errors import ConfigError, NonFiniteError

ATTENTION_PATHS = ("fast", "eager")


@dataclass
class PromptCapture:
    """What one forward pass yields for one prompt (numpy, float64)."""

    n_tokens: int
    offdiag_mass: np.ndarray  # (layers, heads): n - sum_i A_h[i,i]
    first_token_mass: np.ndarray  # (layers, heads): mean over i >= 1 of A_h[i, 0]
    max_abs_hidden: np.ndarray  # (layers + 1,): max |h| of each residual stream
    # (layers + 1, d) float32: each residual stream's mean over positions 1..n-1 (position 0, the
    # attention sink, carries massive activations that would dominate the mean); a narrower stream
    # zero-padded to d (stack_streams)
    pooled: np.ndarray | None = None


@dataclass
class BatchCapture:
    """One batch's captures, in the order of its prompts, and what ran (kernel and route counts,
    the reasons for any fallback)."""

    prompts: list[PromptCapture]
    ran: Counter = field(default_factory=Counter)
    fallbacks: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Target:
    """What the capture needs to know about a model; `model` is the trunk (base model) whose
    forward pass is captured, `blocks` its transformer blocks and `attention_modules` their
    attention modules, in layer order."""

    model: nn.Module
    blocks: list[nn.Module]
    attention_modules: list[nn.Module]
    causal: bool
    fast_supported: bool = True
    pad_id: int = 0

    @property
    def n_layers(self) -> int:
        return len(self.blocks)


def path_for(target: Target, attention: str) -> str:
    """The path a model takes: `attention` where the family allows it (BLOOM's attention sits
    outside transformers' attention interface, so it always runs eager)."""
    if attention not in ATTENTION_PATHS:
        raise ConfigError(f"unknown attention path '{attention}'; choose one of {', '.join(ATTENTION_PATHS)}")
    return attention if target.fast_supported else "eager"


@contextmanager
def installed(target: Target, attention: str) -> Iterator[None]:
    """The model with the attention implementation `attention` needs, restored afterwards."""
    from sheafscope.capture.fast import register

    name = register() if attention == "fast" else "eager"
    config = target.model.config
    before = config._attn_implementation
    switch = before != name and target.fast_supported
    if switch:
        target.model.set_attn_implementation(name)
    try:
        yield
    finally:
        if switch:
            target.model.set_attn_implementation(before)


def capture(target: Target, prompts: list[torch.Tensor], attention: str = "fast") -> BatchCapture:
    """Capture one batch of prompts (1-D token-id tensors of at least 2 tokens)."""
    return launch(target, prompts, attention).result()


def launch(target: Target, prompts: list[torch.Tensor], attention: str = "fast"):
    """Run the batch's forward pass; `.result()` of what it returns reads the numbers, so that
    the next batch can be launched before this one is read."""
    from sheafscope.capture import eager, fast_batch

    with installed(target, attention):
        if path_for(target, attention) == "eager":
            return eager.capture_each(target, prompts)
        return fast_batch.launch(target, prompts)


def stack_streams(streams: list[torch.Tensor], stack: bool = True) -> torch.Tensor:
    """Per-stream tensors (..., d_s) stacked on a new first axis (or, `stack=False`, joined along
    their first), the narrower ones zero-padded to the widest d: a stream may be narrower (OPT
    projects its last hidden state down), and zero columns leave every distance between points,
    and so their intrinsic dimension, unchanged."""
    width = max(s.shape[-1] for s in streams)
    padded = [torch.nn.functional.pad(s, (0, width - s.shape[-1])) if s.shape[-1] < width else s for s in streams]
    return torch.stack(padded) if stack else joined(padded)


def stacked(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The tensors on a new first axis; one tensor as a view, not a copy."""
    return tensors[0][None] if len(tensors) == 1 else torch.stack(tensors)


def joined(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The tensors concatenated along their first axis; one tensor as it is, not a copy."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def moved(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """The tensors on `device` (layers may live on several), moved only where they are not."""
    return [t if t.device == device else t.to(device) for t in tensors]


def check_finite(what: str, values: torch.Tensor | np.ndarray, dtype: torch.dtype) -> None:
    """NaN/Inf from the forward pass fails with the likely cause and the fix."""
    ok = torch.isfinite(values).all() if isinstance(values, torch.Tensor) else np.isfinite(values).all()
    if not ok:
        hint = ("float16 overflows in this model: rerun with --dtype bfloat16 or --dtype float32"
                if dtype == torch.float16 else
                "the weights or inputs contain NaN/Inf; check the checkpoint, or rerun with --dtype float32")
        raise NonFiniteError(f"the forward pass produced NaN/Inf in {what} "
                             f"(dtype {str(dtype).removeprefix('torch.')}): {hint}")
