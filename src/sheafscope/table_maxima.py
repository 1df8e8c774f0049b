"""max |h| of many equally shaped tensors in one Triton launch, read through a table of their
places in memory (the residual streams of a forward pass, for tail_graphs).

`capture_fast._max_abs` reduces one stream per operation. A CUDA graph of those operations
reads each stream at the address it was captured with; this kernel reads every stream at an
offset that a device table gives, so a graph of it serves any forward pass of the shape once
the table is refilled. The maxima are exact (a maximum rounds nothing), so they equal
`_max_abs`'s bit for bit; NaN anywhere in a tensor makes its maximum NaN, as there.

The kernel runs on CUDA tensors, and on CPU tensors under Triton's interpreter
(TRITON_INTERPRET=1 before Triton is imported; tests only), as fused_rows' does.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

BLOCK = 4096  # elements per program

triton: Any = None  # imported by _kernel() (as in fused_rows: most runs never need Triton)
tl: Any = None


def partial_kernel(H, T, OUT, NUMEL, CHUNKS, B, ALIGN: tl.constexpr, BLOCK: tl.constexpr):
    # Program (chunk, tensor, element): max |x| of one BLOCK of one batch element of one
    # tensor (elements adjacent, NUMEL per element), NaN if any of them is NaN.
    c = tl.program_id(0)
    t = tl.program_id(1)
    e = tl.program_id(2)
    base = H + tl.multiple_of(tl.load(T + t), ALIGN) + e * NUMEL
    offs = c * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(base + offs, mask=offs < NUMEL, other=0.0).to(tl.float32)
    bad = x != x
    m = tl.max(tl.where(bad, 0.0, tl.abs(x)), 0)
    m = tl.where(tl.max(bad.to(tl.int32), 0) > 0, float("nan"), m)
    tl.store(OUT + (t * B + e) * CHUNKS + c, m)


@functools.cache
def _kernel() -> Any:
    global triton, tl, partial_kernel
    import triton
    import triton.language as tl

    return triton.jit(partial_kernel)


def table_maxima(h: torch.Tensor, base: torch.Tensor, table: torch.Tensor, count: int, align: int) -> torch.Tensor:
    """(count, b) max |x| over each batch element of `count` tensors shaped as h (b, ...) and
    contiguous, whose offsets in elements from `base` (a tensor of h's dtype) `table` (int64, on
    their device) holds, every one a multiple of `align`; in h's dtype."""
    b = h.shape[0]
    per = h[0].numel()
    chunks = -(-per // BLOCK)
    partial = torch.empty((count, b, chunks), dtype=torch.float32, device=h.device)
    _kernel()[(chunks, count, b)](base, table, partial, per, chunks, b, ALIGN=align, BLOCK=BLOCK, num_warps=4)
    return partial.amax(dim=-1).to(h.dtype)  # amax keeps NaN
