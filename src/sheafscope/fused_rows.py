"""Exact per-row attention statistics from one fused Triton kernel (the GPU route for
half-precision models).

For query row i of head h it computes, with s_ij = scale * q_i . k_j over the keys the row
may attend to (causal, and a boolean mask where one is given),

    rows[..., i, 0] = 1 - A_ii = sum_{j != i} exp(s_ij - m_i) / sum_j exp(s_ij - m_i)
    rows[..., i, 1] = A_i0     = exp(s_i0 - m_i) / sum_j exp(s_ij - m_i)

in one pass over the keys, as flash attention walks them (a running maximum m_i and running
sums rescaled when it grows), and never forms 1 - A_ii as 1 minus something: the off-diagonal
sum is its own accumulator, so it is relative-accurate however close A_ii is to 1. That is
what lets this route replace both the lse route's two products and its refinement of flagged
rows (`diag_stats`): every row is exact here, so nothing is flagged, planned or synchronised.

Precision (half-precision q and k): the scores are the exact products of the inputs summed in
float32 (tensor-core products, as `diag_stats.half_products`), the exponentials and sums
float32, the two divisions float64. A row's relative error is about twice a score's rounding
(d * eps32 * scale * sum_j |q_j k_j|) plus a few eps32 times |s_ij - m_i|.

The kernel runs on CUDA tensors; on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1
before Triton is imported; tests only: it is slow). Without Triton, `available` is False and callers use the torch routes.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Any

import torch

# Rows and keys per program tile. 64 x 64 with d up to 256 keeps q, k and the score tile in
# registers and shared memory on every GPU Triton supports.
BLOCK_M = 64
BLOCK_N = 64
# Head dimensions the kernel takes (tl.dot needs a power of two of at least 16; others pad).
MAX_HEAD_DIM = 256
# Tensors of up to this many elements are indexed with 32-bit offsets; larger stacks go through
# the kernel in batch chunks below it.
INT32_ELEMENTS = 1 << 31


triton: Any = None  # imported by _kernel() (importing Triton costs a CLI run ~0.2 s; most runs never need it)
tl: Any = None


# Why the kernel failed in this process (a GPU or Triton install it does not compile for), or
# None: after a failure every later call takes the torch routes (capture_fast falls back).
disabled: str | None = None


@functools.cache
def has_triton() -> bool:
    """Whether Triton is installed (CPU-only installs usually lack it: the torch routes serve)."""
    return importlib.util.find_spec("triton") is not None


def runs_on(device: torch.device) -> bool:
    """Whether the kernel can run on tensors of `device`: CUDA with Triton installed, or any
    device under Triton's interpreter (TRITON_INTERPRET=1)."""
    if not has_triton() or disabled is not None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available(q: torch.Tensor) -> bool:
    """Whether the fused kernel serves q by default: half precision on a CUDA device, Triton
    installed, a head dimension it takes."""
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= MAX_HEAD_DIM
            and has_triton() and disabled is None)


def rows_kernel(Q, K, M, OUT, sqb, sqh, sqn, sqd, skb, skh, skn, skd, smb, smn, smk, sob, soh, son,
                H, G, N, KV, MB, scale,
                HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // G
    rows = pid_m * BM + tl.arange(0, BM)
    dims = tl.arange(0, DP)
    row_ok = rows < N
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqn + dims[None, :] * sqd,
                mask=row_ok[:, None] & (dims[None, :] < D), other=0.0)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    total = tl.zeros([BM], tl.float32)
    off = tl.zeros([BM], tl.float32)
    s_first = tl.full([BM], float("-inf"), tl.float32)
    hi = KV
    if CAUSAL:
        hi = (pid_m + 1) * BM  # the keys up to the block's last row (loads past KV are masked)
    for start in range(0, hi, BN):
        cols = start + tl.arange(0, BN)
        col_ok = cols < KV
        k = tl.load(K + b * skb + hk * skh + cols[:, None] * skn + dims[None, :] * skd,
                    mask=col_ok[:, None] & (dims[None, :] < D), other=0.0)
        if IEEE:  # float32 inputs: full float32 products, not TF32
            s = tl.dot(q, tl.trans(k), input_precision="ieee", out_dtype=tl.float32) * scale
        else:
            s = tl.dot(q, tl.trans(k), out_dtype=tl.float32) * scale
        ok = row_ok[:, None] & col_ok[None, :]
        if CAUSAL:
            ok = ok & (cols[None, :] <= rows[:, None])
        if HAS_MASK:
            mv = tl.load(M + (b % MB) * smb + rows[:, None] * smn + cols[None, :] * smk, mask=ok, other=0)
            ok = ok & (mv != 0)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key yet: keep sums at 0, not NaN
        alpha = tl.exp(m_i - m_ref)
        p = tl.exp(s - m_ref[:, None])
        total = total * alpha + tl.sum(p, 1)
        off = off * alpha + tl.sum(tl.where(cols[None, :] == rows[:, None], 0.0, p), 1)
        s_first = tl.maximum(s_first, tl.max(tl.where(cols[None, :] == 0, s, float("-inf")), 1))
        m_i = m_new
    m_ref = tl.where(m_i == float("-inf"), 0.0, m_i)
    first = tl.exp(s_first - m_ref)
    total64 = total.to(tl.float64)
    base = OUT + b * sob + h * soh + rows * son
    tl.store(base, off.to(tl.float64) / total64, mask=row_ok)
    tl.store(base + 1, first.to(tl.float64) / total64, mask=row_ok)


@functools.cache
def _kernel() -> Any:
    """The compiled kernel (under TRITON_INTERPRET=1, set before Triton is imported, Triton's
    interpreter runs it on CPU tensors: the tests' way to run it without a GPU)."""
    global triton, tl
    import triton
    import triton.language as tl

    return triton.jit(rows_kernel)


def fused_rows(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, causal: bool,
               scale: float) -> torch.Tensor:
    """Exact rows (B, h, n, 2) float64 of q (B, h, n, d) against k (B, h_kv, kv, d), any strides.

    `mask`: bool (m, 1, n, kv), True = attend, with B a multiple of m (layers stacked along the
    batch repeat it), or None; `causal` adds key j <= i. A row with no allowed key is NaN.
    """
    B, h, n, d = q.shape
    if d > MAX_HEAD_DIM:
        raise ValueError(f"fused_rows takes head dimensions up to {MAX_HEAD_DIM}, not {d}")
    if mask is not None and mask.dtype != torch.bool:
        raise ValueError("fused_rows takes a boolean mask (True = attend)")
    out = torch.empty(B, h, n, 2, dtype=torch.float64, device=q.device)
    if out.numel() == 0:
        return out
    # The kernel's offsets are 32-bit: larger stacks go through it in chunks of whole mask
    # periods, so that a chunk's batch index modulo m is the global one's.
    mb = 1 if mask is None else mask.shape[0]
    per_item = max(q[:1].numel(), k[:1].numel())
    step = B if max(q.numel(), k.numel()) < INT32_ELEMENTS else max(mb, (INT32_ELEMENTS // per_item - 1) // mb * mb)
    for c0 in range(0, B, step):
        _launch(q[c0:c0 + step], k[c0:c0 + step], mask, out[c0:c0 + step], causal, scale)
    return out


def _launch(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, out: torch.Tensor, causal: bool,
            scale: float) -> None:
    B, h, n, d = q.shape
    n_kv, kv = k.shape[1], k.shape[2]
    if mask is None:
        m, strides, mb = out, (0, 0, 0), 1  # an unused pointer
    else:
        m, mb = mask.view(torch.uint8), mask.shape[0]
        strides = (m.stride(0), m.stride(2), m.stride(3))
    dp = max(16, 1 << (d - 1).bit_length())
    grid = (-(-n // BLOCK_M), B * h)
    _kernel()[grid](
        q, k, m, out, *q.stride(), *k.stride(), *strides, out.stride(0), out.stride(1), out.stride(2),
        h, h // n_kv, n, kv, mb, float(scale),
        HAS_MASK=mask is not None, CAUSAL=bool(causal), IEEE=q.dtype == torch.float32, D=d, DP=dp, BM=BLOCK_M, BN=BLOCK_N)
