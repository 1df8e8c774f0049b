"""One right-padded batch through the fast path: the forward pass, then its numbers per prompt.

Right padding with no mask is exact for causal models: a real token's row sees only earlier
keys, all real, so no padding mask is built and the fused kernels run as on one prompt.
Bidirectional models (BERT) get the padding mask. Rows at padded positions are never counted,
nor pooled into a residual stream's mean.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from sheafscope.capture import BatchCapture, PromptCapture, Target, check_finite, joined, moved, stack_streams, stacked
from sheafscope.capture.fast import HOLD_BYTES, TOGETHER, Recorder
from sheafscope.errors import SheafscopeError


class Streams:
    """The residual streams entering each block (and leaving the last) of one batch, held until
    `reduce`: per position max |h| (b, n) and the float32 sum over each prompt's positions 1..n-1
    (b, d), summed with `where` so that nothing at a padded position can reach it. Where
    TOGETHER holds, consecutive streams of one shape are reduced stacked (launches, not
    arithmetic, cost there); past HOLD_BYTES held, they are reduced mid-forward."""

    def __init__(self, keep: torch.Tensor, zero: torch.Tensor):
        self.keep, self.zero = keep, zero  # (b, n, 1) bool: real positions 1..n-1; the 0 the others take
        self.held: list[torch.Tensor] = []
        self.held_bytes = 0
        self.maxima: list[torch.Tensor] = []  # (k, b, n) per reduced run of k streams
        self.sums: list[torch.Tensor] = []  # (k, b, d)

    def hook(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        """Forward pre-hook on a block."""
        self.hold(args[0] if args else kwargs["hidden_states"])

    def hold(self, h: torch.Tensor) -> None:
        """Keep h (b, n, d) for `reduce`."""
        self.held.append(h)
        self.held_bytes += h.nbytes
        if self.held_bytes > HOLD_BYTES.get(h.device.type, 0):
            self.reduce()

    def reduce(self) -> None:
        """The statistics of every held stream, in order."""
        held, self.held, self.held_bytes = self.held, [], 0
        runs: list[list[torch.Tensor]] = []
        for h in held:
            last = runs[-1][-1] if runs else None
            if last is not None and (last.device, last.shape) == (h.device, h.shape) and TOGETHER.get(h.device.type):
                runs[-1].append(h)
            else:
                runs.append([h])
        for run in runs:
            h = stacked(run)  # (k, b, n, d)
            keep, zero = moved([self.keep, self.zero], h.device)  # a model may span several devices
            self.maxima.append(torch.linalg.vector_norm(h, ord=torch.inf, dim=-1))  # max |h|, NaN kept
            self.sums.append(torch.where(keep, h, zero).sum(dim=2, dtype=torch.float32))

    def statistics(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """max |h| (streams, b, n) and the sums (streams, b, d) of every stream, in order, on `device`."""
        self.reduce()
        return joined(moved(self.maxima, device)), stack_streams(moved(self.sums, device), stack=False)


def _host(t: torch.Tensor) -> np.ndarray:
    """t as a numpy array; from a GPU through page-locked memory, then copied by torch (in
    parallel) into ordinary memory, so that the page-locked block is reused: copying to
    pageable memory directly, or on from page-locked memory with numpy, runs several times slower
    (benchmarks/host_copies.py)."""
    if t.device.type == "cpu":
        return t.numpy()
    staged = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    staged.copy_(t)
    return torch.empty(t.shape, dtype=t.dtype).copy_(staged).numpy()


class Pending:
    """A batch whose forward pass has run (or is queued on the device); `result` reads it."""

    def __init__(self, target: Target, recorder: Recorder, streams: Streams, lengths: list[int], dtype: torch.dtype):
        self.target, self.recorder, self.streams = target, recorder, streams
        self.lengths, self.dtype = lengths, dtype

    def result(self) -> BatchCapture:
        rec, layers = self.recorder, self.target.n_layers
        if len(rec.seen) != layers:
            raise SheafscopeError(
                f"the fast path saw the attention of {len(rec.seen)} of {layers} layers: this model's attention "
                "does not run through transformers' attention interface; analyze it with attention='eager'")
        valid = rec.valid  # (b, n), on the device the prompts came in on
        off, first = rec.statistics(valid.device)  # (L, b, h, n)
        streams, sums = self.streams.statistics(valid.device)  # (L + 1, b, n), (L + 1, b, d)
        later = self.streams.keep.transpose(1, 2)  # (b, 1, n): the real rows i >= 1
        counts = later.sum(-1, dtype=torch.float32)  # (b, 1)
        off_mass = torch.where(valid[:, None], off, 0.0).sum(-1)  # (L, b, h)
        first_mass = torch.where(later, first, 0.0).sum(-1) / counts
        maxima = torch.where(valid, streams, -torch.inf).amax(-1).double()
        pooled = (sums / counts).transpose(0, 1).contiguous()  # one (L + 1, d) block per prompt
        off_mass, first_mass, maxima, pooled = (_host(t) for t in (off_mass, first_mass, maxima, pooled))
        check_finite("the residual stream or attention", maxima, self.dtype)
        check_finite("the attention statistics", off_mass, self.dtype)
        prompts = [PromptCapture(n, off_mass[:, b], first_mass[:, b], maxima[:, b], pooled[b])
                   for b, n in enumerate(self.lengths)]
        return BatchCapture(prompts, rec.ran, rec.fallbacks)


@torch.no_grad()
def launch(target: Target, prompts: list[torch.Tensor]) -> Pending:
    """Run one right-padded forward pass of `prompts` (1-D token ids) under a Recorder."""
    lengths = [int(p.shape[-1]) for p in prompts]
    device = prompts[0].device
    n = max(lengths)
    ids = torch.full((len(prompts), n), target.pad_id, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        ids[b, : lengths[b]] = p.reshape(-1)
    valid = torch.arange(n, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
    padded = min(lengths) < n
    mask = valid.long() if padded and not target.causal else None
    layer_of = {id(m): layer for layer, m in enumerate(target.attention_modules)}
    recorder = Recorder(layer_of, valid)
    keep = valid[..., None].clone()
    keep[:, 0] = False  # the residual streams are pooled over positions 1..n-1
    dtype = next(target.model.parameters()).dtype
    streams = Streams(keep, torch.zeros((), dtype=dtype, device=device))
    hooks = [block.register_forward_pre_hook(streams.hook, with_kwargs=True) for block in target.blocks]
    try:
        with recorder:
            out = target.model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    streams.hold(out[0] if isinstance(out, tuple) else out.last_hidden_state)
    return Pending(target, recorder, streams, lengths, dtype)
