"""Many prompts through one capture: batches formed by a token budget, prompts of like length
together, halved on out-of-memory, and the next batch launched before the last is read."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Callable

import torch

from sheafscope.capture import PromptCapture, Target, installed, launch, path_for
from sheafscope.errors import ConfigError, SheafscopeError

log = logging.getLogger(__name__)

# Padded tokens per forward pass by default, and the largest share of them that may be padding.
BATCH_TOKENS = {"cuda": 65536, "cpu": 4096}
MAX_PADDING = 0.2


def token_batches(lengths: list[int], budget: int, max_padding: float = MAX_PADDING) -> list[list[int]]:
    """Indices of `lengths` grouped longest first, each group's padded size (count x longest)
    within `budget` (a longer prompt goes alone) and its padding at most `max_padding` of it."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches:
            group = batches[-1]
            padded = lengths[group[0]] * (len(group) + 1)
            real = sum(lengths[j] for j in group) + lengths[i]
            if padded <= budget and padded - real <= max_padding * padded:
                group.append(i)
                continue
        batches.append([i])
    return batches


def capture_all(target: Target, prompts: list[torch.Tensor], attention: str = "fast",
                batch_tokens: int | None = None,
                progress: Callable[[int], None] | None = None) -> tuple[list[PromptCapture], dict]:
    """Captures of every prompt (1-D token ids), in their order, and what ran."""
    if batch_tokens is not None and batch_tokens < 1:
        raise ConfigError(f"the batch token budget must be at least 1, not {batch_tokens}")
    path = path_for(target, attention)
    device = prompts[0].device.type
    lengths = [int(p.shape[-1]) for p in prompts]
    budget = 1 if path == "eager" else batch_tokens or BATCH_TOKENS.get(device, BATCH_TOKENS["cpu"])
    queue = token_batches(lengths, budget)
    out: list[PromptCapture | None] = [None] * len(prompts)
    ran: Counter = Counter()
    fallbacks: list[str] = []
    backoffs, largest, padded_tokens = 0, 0, 0
    pending = None

    def collect() -> None:
        indices, launched = pending
        batch = launched.result()
        for i, cap in zip(indices, batch.prompts):
            out[i] = cap
        ran.update(batch.ran)
        fallbacks.extend(f for f in batch.fallbacks if f not in fallbacks)
        if progress:
            progress(len(indices))

    with installed(target, path):
        while queue:
            indices = queue.pop(0)
            try:
                launched = launch(target, [prompts[i] for i in indices], path)
            except torch.OutOfMemoryError:
                if len(indices) == 1:
                    raise SheafscopeError(
                        f"out of {device} memory on one prompt of {lengths[indices[0]]} tokens: pass --max-tokens "
                        "to truncate long prompts, or use a smaller --dtype") from None
                half = len(indices) // 2
                queue[:0] = [indices[:half], indices[half:]]
                backoffs += 1
                log.warning("out of memory with %d prompts; retrying in halves", len(indices))
                if device == "cuda":
                    torch.cuda.empty_cache()
                continue
            if pending is not None:
                collect()
            pending = (indices, launched)
            largest = max(largest, len(indices))
            padded_tokens += len(indices) * max(lengths[i] for i in indices)
        if pending is not None:
            collect()
    info = {
        "batch_size": largest,
        "batch_tokens": budget,
        "tokens": sum(lengths),
        "padded_tokens": padded_tokens,
        "padding_share": 1 - sum(lengths) / padded_tokens,
        "oom_backoffs": backoffs,
        "kernels": dict(ran),
        "fallbacks": fallbacks,
    }
    return out, info
