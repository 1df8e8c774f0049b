"""The reference capture: explicit attention matrices from the model's own forward pass.

Slow and memory-hungry (every n x n matrix of every layer, one prompt at a time) but
independent of any kernel: the fast path is tested against it.
"""

from __future__ import annotations

import torch

from sheafscope.capture import BatchCapture, PromptCapture, Target, check_finite, stack_streams
from sheafscope.errors import SheafscopeError
from sheafscope.sheaf import offdiag_mass


class Done:
    """An eager batch: computed at once, so its result is ready."""

    def __init__(self, batch: BatchCapture):
        self.batch = batch

    def result(self) -> BatchCapture:
        return self.batch


def capture_each(target: Target, prompts: list[torch.Tensor]) -> Done:
    caps = [capture_one(target, p.reshape(1, -1)) for p in prompts]
    return Done(BatchCapture(caps, {"eager": len(caps)}))


@torch.no_grad()
def capture_one(target: Target, input_ids: torch.Tensor) -> PromptCapture:
    """One prompt (input_ids (1, n)) with every attention matrix and hidden state."""
    out = target.model(input_ids=input_ids, output_attentions=True, output_hidden_states=True)
    attentions, n_layers = out.attentions, target.n_layers
    # D7: transformers >= 5 returns () rather than None when the attention kernel cannot
    # return weights (sdpa, flash): an empty tuple must fail loudly, not read as zero layers.
    if not attentions or len(attentions) != n_layers or any(a is None for a in attentions):
        impl = getattr(target.model.config, "_attn_implementation", "?")
        got = "nothing" if not attentions else f"{sum(a is not None for a in attentions)} of {n_layers} layers"
        raise SheafscopeError(f"the model returned attention weights for {got} (attn_implementation={impl!r}); "
                              "the eager path needs attn_implementation='eager'")
    n = input_ids.shape[1]
    home = input_ids.device  # layers may sit on several devices (a device map): gather here
    off, sink = [], []
    for layer, a in enumerate(attentions):
        check_finite(f"the attention of layer {layer}", a, a.dtype)
        a = a[0]  # (heads, n, n)
        off.append(offdiag_mass(a).to(home))
        sink.append(a[:, 1:, 0].double().mean(dim=-1).to(home))
    for layer, h in enumerate(out.hidden_states):
        check_finite(f"the hidden state after layer {layer - 1}" if layer else "the embeddings", h, h.dtype)
    max_abs = torch.stack([h[0].abs().max().double().to(home) for h in out.hidden_states])
    # position 0 (the attention sink) is left out of the mean: its massive activations would dominate it
    pooled = stack_streams([h[0, 1:].to(torch.float32).mean(dim=0).to(home) for h in out.hidden_states])
    return PromptCapture(n, torch.stack(off).cpu().numpy(), torch.stack(sink).cpu().numpy(), max_abs.cpu().numpy(),
                         pooled.cpu().numpy())
