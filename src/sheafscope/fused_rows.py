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
With a causal mask and no other, the key tiles wholly below a row tile's first row (after the
first tile, which holds key 0) take a short path: no masking, and one sum for both
accumulators. With two pipelining stages that takes a third off the device time at 2,048 rows
(H200, benchmarks/README.md, eleventh round).

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
import operator
import os
from dataclasses import dataclass
from typing import Any, Iterable

import torch

from sheafscope.diag_stats import to_device

# Rows and keys per program tile. 64 x 64 with d up to 256 keeps q, k and the score tile in
# registers and shared memory on every GPU Triton supports.
BLOCK_M = 64
BLOCK_N = 64
# Head dimensions the kernel takes (tl.dot needs a power of two of at least 16; others pad).
MAX_HEAD_DIM = 256
# Tensors of up to this many elements are indexed with 32-bit offsets; larger layers go through
# the kernel one at a time, in batch chunks below it.
INT32_ELEMENTS = 1 << 31
# Warps per program (Triton's default) and software-pipelining stages (None: Triton's default).
# Two stages were the fastest, or as fast as any, of the settings `benchmarks/stats_kernels.py
# --tiles` timed on an H200 (Mistral-7B heads, 512 and 2,048 rows; 32-row tiles, 8 warps slower).
NUM_WARPS = 4
NUM_STAGES: int | None = 2


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


def tile_stats(Q, K, QT, KT, M, bi, h, row0, sqb, sqh, sqn, sqd, skb, skh, skn, skd, smb, smn, smk,
               H, G, N, KV, NB, MB, scale,
               TABLE: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr,
               ALIGN: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    # Rows row0..row0 + BM - 1 of head h of stacked batch element bi = layer * NB + element:
    # per row, float32 (off-diagonal sum, first-key term, total), all scaled by exp(-m_i).
    hk = h // G
    bb = bi % NB  # the element within its layer
    if TABLE:
        # QT and KT hold each layer's offset in elements from Q and K (layer 0's tensors: the
        # layers are not stacked in memory). ALIGN: what every offset is a multiple of, so that
        # the loads stay as wide as from Q itself.
        layer = bi // NB
        q_base = Q + tl.multiple_of(tl.load(QT + layer), ALIGN) + bb * sqb + h * sqh
        k_base = K + tl.multiple_of(tl.load(KT + layer), ALIGN) + bb * skb + hk * skh
    else:
        q_base = Q + bi * sqb + h * sqh
        k_base = K + bi * skb + hk * skh
    rows = row0 + tl.arange(0, BM)
    dims = tl.arange(0, DP)
    row_ok = rows < N
    q = tl.load(q_base + rows[:, None] * sqn + dims[None, :] * sqd, mask=row_ok[:, None] & (dims[None, :] < D), other=0.0)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    total = tl.zeros([BM], tl.float32)
    off = tl.zeros([BM], tl.float32)
    s_first = tl.full([BM], float("-inf"), tl.float32)
    if CAUSAL and not HAS_MASK:
        # Keys below the tile's first row (and within KV): every row of the tile attends to
        # all of them, and none of them is a row's own key. Past the first tile (key 0), such
        # tiles need no mask and add one sum to both accumulators: the long prompts' bulk.
        plain_hi = tl.minimum(row0, KV) // BN * BN
        m_i, total, off, s_first = key_tile(q, k_base, 0, rows, dims, row_ok, m_i, total, off, s_first, skn, skd,
                                            smb, smn, smk, M, bb, N, KV, MB, scale, HAS_MASK, CAUSAL, IEEE, D, BN)
        for start in range(BN, plain_hi, BN):
            s = key_scores(q, k_base, start + tl.arange(0, BN), dims, skn, skd, KV, scale, False, IEEE, D)
            # m_i is finite for every row < N (key 0 came first); a row past N reads q = 0, s = 0
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            part = tl.sum(tl.exp(s - m_new[:, None]), 1)
            total = total * alpha + part
            off = off * alpha + part
            m_i = m_new
        # the tiles that reach the diagonal (the keys up to the tile's last row; loads past KV are masked)
        for start in range(tl.maximum(plain_hi, BN), row0 + BM, BN):
            m_i, total, off, s_first = key_tile(q, k_base, start, rows, dims, row_ok, m_i, total, off, s_first, skn,
                                                skd, smb, smn, smk, M, bb, N, KV, MB, scale, HAS_MASK, CAUSAL, IEEE,
                                                D, BN)
    else:
        hi = KV
        if CAUSAL:
            hi = row0 + BM
        for start in range(0, hi, BN):
            m_i, total, off, s_first = key_tile(q, k_base, start, rows, dims, row_ok, m_i, total, off, s_first, skn,
                                                skd, smb, smn, smk, M, bb, N, KV, MB, scale, HAS_MASK, CAUSAL, IEEE,
                                                D, BN)
    m_ref = tl.where(m_i == float("-inf"), 0.0, m_i)
    first = tl.exp(s_first - m_ref)
    return off, first, total


def key_tile(q, k_base, start, rows, dims, row_ok, m_i, total, off, s_first, skn, skd, smb, smn, smk, M, bb, N, KV,
             MB, scale, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr, D: tl.constexpr,
             BN: tl.constexpr):
    # Keys start..start + BN - 1 for the tile's rows, every case: keys past KV, the causal
    # limit, the mask, each row's own key (kept out of off) and key 0 (its score into s_first).
    cols = start + tl.arange(0, BN)
    col_ok = cols < KV
    s = key_scores(q, k_base, cols, dims, skn, skd, KV, scale, True, IEEE, D)
    ok = row_ok[:, None] & col_ok[None, :]
    if CAUSAL:
        ok = ok & (cols[None, :] <= rows[:, None])
    if HAS_MASK:
        mv = tl.load(M + (bb % MB) * smb + rows[:, None] * smn + cols[None, :] * smk, mask=ok, other=0)
        ok = ok & (mv != 0)
    s = tl.where(ok, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key yet: keep sums at 0, not NaN
    alpha = tl.exp(m_i - m_ref)
    p = tl.exp(s - m_ref[:, None])
    total = total * alpha + tl.sum(p, 1)
    off = off * alpha + tl.sum(tl.where(cols[None, :] == rows[:, None], 0.0, p), 1)
    s_first = tl.maximum(s_first, tl.max(tl.where(cols[None, :] == 0, s, float("-inf")), 1))
    return m_new, total, off, s_first


def key_scores(q, k_base, cols, dims, skn, skd, KV, scale, CHECK_KV: tl.constexpr, IEEE: tl.constexpr,
               D: tl.constexpr):
    # Scores (rows, keys) of the tile's rows against keys `cols`: the keys' loads pad the head
    # dimension to DP with zeros, and with CHECK_KV keys past KV read as zeros too.
    kmask = dims[None, :] < D
    if CHECK_KV:
        kmask = kmask & (cols[:, None] < KV)
    k = tl.load(k_base + cols[:, None] * skn + dims[None, :] * skd, mask=kmask, other=0.0)
    if IEEE:  # float32 inputs: full float32 products, not TF32
        s = tl.dot(q, tl.trans(k), input_precision="ieee", out_dtype=tl.float32)
    else:
        s = tl.dot(q, tl.trans(k), out_dtype=tl.float32)
    return s * scale


def rows_kernel(Q, K, QT, KT, M, OUT, sqb, sqh, sqn, sqd, skb, skh, skn, skd, smb, smn, smk, sob, soh, son,
                H, G, N, KV, NB, MB, scale,
                TABLE: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr,
                ALIGN: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    # Program (row tile, bi * H + h): the tile's rows of head h of stacked batch element bi.
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    bi = bh // H
    h = bh % H
    off, first, total = tile_stats(Q, K, QT, KT, M, bi, h, pid_m * BM, sqb, sqh, sqn, sqd, skb, skh, skn, skd,
                                   smb, smn, smk, H, G, N, KV, NB, MB, scale, TABLE, HAS_MASK, CAUSAL, IEEE,
                                   ALIGN, D, DP, BM, BN)
    rows = pid_m * BM + tl.arange(0, BM)
    total64 = total.to(tl.float64)
    base = OUT + bi * sob + h * soh + rows * son
    tl.store(base, off.to(tl.float64) / total64, mask=rows < N)
    tl.store(base + 1, first.to(tl.float64) / total64, mask=rows < N)


def sums_kernel(Q, K, QT, KT, M, OUT, W, sqb, sqh, sqn, sqd, skb, skh, skn, skd, smb, smn, smk, sob, soh, swb,
                H, G, N, KV, NB, MB, scale,
                TABLE: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr,
                ALIGN: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                HAS_VALID: tl.constexpr):
    # Program (0, bi * H + h): every row tile of head h of stacked batch element bi, in order
    # (one program per head: no atomics, the same sums on every run), summed over the rows
    # that count: OUT[bi, h] = (sum of 1 - A_ii over valid rows, sum of A_i0 over valid rows >= 1).
    bh = tl.program_id(1)
    bi = bh // H
    h = bh % H
    off_sum = tl.zeros([BM], tl.float64)
    first_sum = tl.zeros([BM], tl.float64)
    for row0 in range(0, N, BM):
        off, first, total = tile_stats(Q, K, QT, KT, M, bi, h, row0, sqb, sqh, sqn, sqd, skb, skh, skn, skd,
                                       smb, smn, smk, H, G, N, KV, NB, MB, scale, TABLE, HAS_MASK, CAUSAL, IEEE,
                                       ALIGN, D, DP, BM, BN)
        rows = row0 + tl.arange(0, BM)
        counted = rows < N
        if HAS_VALID:
            counted = counted & (tl.load(W + (bi % NB) * swb + rows, mask=counted, other=0) != 0)
        total64 = total.to(tl.float64)
        # where, not a product: a row that sees no key (padding) is NaN and must not count
        off_sum += tl.where(counted, off.to(tl.float64) / total64, 0.0)
        first_sum += tl.where(counted & (rows > 0), first.to(tl.float64) / total64, 0.0)
    base = OUT + bi * sob + h * soh
    tl.store(base, tl.sum(off_sum, 0))
    tl.store(base + 1, tl.sum(first_sum, 0))


@functools.cache
def _kernels() -> tuple[Any, Any]:
    """The compiled (rows, sums) kernels (under TRITON_INTERPRET=1, set before Triton is
    imported, Triton's interpreter runs them on CPU tensors: the tests' way to run them without
    a GPU). The kernels call tile_stats (it key_tile, both key_scores) by their global names, which must then be JIT
    functions."""
    global triton, tl, tile_stats, key_tile, key_scores
    import triton
    import triton.language as tl

    tile_stats, key_tile, key_scores = triton.jit(tile_stats), triton.jit(key_tile), triton.jit(key_scores)
    return triton.jit(rows_kernel), triton.jit(sums_kernel)


def _kernel(sums: bool = False) -> Any:
    """The compiled rows kernel, or with `sums` the sums kernel."""
    return _kernels()[int(sums)]


def fused_rows(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, causal: bool,
               scale: float) -> torch.Tensor:
    """Exact rows (B, h, n, 2) float64 of q (B, h, n, d) against k (B, h_kv, kv, d), any strides.

    `mask`: bool (m, 1, n, kv), True = attend, with B a multiple of m (layers stacked along the
    batch repeat it), or None; `causal` adds key j <= i. A row with no allowed key is NaN.
    """
    return fused_stats([q], [k], mask, causal, scale)


def fused_stats(qs: list[torch.Tensor], ks: list[torch.Tensor], mask: torch.Tensor | None, causal: bool,
                scale: float, sums: bool = False, valid: torch.Tensor | None = None) -> torch.Tensor:
    """`fused_rows` of several layers' attention calls of one shape, in one launch and without
    stacking them: qs[i] (b, h, n, d) and ks[i] (b, h_kv, kv, d) are layer i's queries and keys
    (any strides; layers of equal strides are read through a table of their places in memory),
    `mask` (m, 1, n, kv) with m dividing b. Returns (L * b, h, n, 2): layer i's rows at
    [i * b:(i + 1) * b], as `fused_rows` of the stacked layers.

    `sums`: return (L * b, h, 2) instead, each head's sums over the rows that count, as the
    rows' `torch.where(counted, rows, 0).sum(-2)` would give them (summed in another order):
    1 - A_ii over every counted row, A_i0 over the counted rows after the first. The rows that
    count are those `valid` (b, n) bool marks, or all of them. One program walks all of a
    head's row tiles in order (no atomics: the same sums on every run), so this is for short
    sequences, where it saves the two operations that would sum the rows.
    """
    L, (b, h, n, d) = len(qs), qs[0].shape
    if d > MAX_HEAD_DIM:
        raise ValueError(f"fused_rows takes head dimensions up to {MAX_HEAD_DIM}, not {d}")
    if mask is not None and mask.dtype != torch.bool:
        raise ValueError("fused_rows takes a boolean mask (True = attend)")
    if valid is not None and (not sums or valid.shape != (b, n)):
        raise ValueError(f"valid rows go with sums=True, shaped (batch, rows) = {(b, n)}")
    # map() over the tensors' methods: no Python frame per layer (a short forward pass on a GPU
    # is bound by the host, and these run over every held layer)
    Tensor = torch.Tensor
    if (len(set(map(Tensor.size, qs))) > 1 or len(set(map(Tensor.size, ks))) > 1
            or len({*map(_dtype, qs), *map(_dtype, ks)}) > 1):
        raise ValueError("fused_stats takes layers of one shape and dtype")
    out = torch.empty((L * b, h, 2) if sums else (L * b, h, n, 2), dtype=torch.float64, device=qs[0].device)
    if out.numel() == 0:
        return out
    if valid is not None:
        valid = valid.contiguous()  # read as (element * stride + row): rows adjacent
    args = _Launch(mask, causal, scale, b, sums)
    per_layer = max(qs[0].numel(), ks[0].numel())
    uniform = len(set(map(Tensor.stride, qs))) == 1 and len(set(map(Tensor.stride, ks))) == 1
    if L > 1 and uniform and max(per_layer, out.numel()) < INT32_ELEMENTS:
        q_table, k_table, align = _offset_table(qs, ks)
        args.launch(qs[0], ks[0], out, valid, q_table, k_table, align)
    else:
        # One layer at a time (a single layer, layers of different strides, or beyond 32-bit
        # offsets), each in batch chunks of whole mask periods below them.
        period = 1 if mask is None else mask.shape[0]
        per_item = max(qs[0][:1].numel(), ks[0][:1].numel(), out[:1].numel())
        step = b if max(per_layer, out[:b].numel()) < INT32_ELEMENTS else max(period, (INT32_ELEMENTS // per_item - 1) // period * period)
        for i, (q, k) in enumerate(zip(qs, ks)):
            for c0 in range(0, b, step):
                args.launch(q[c0:c0 + step], k[c0:c0 + step], out[i * b + c0:i * b + min(b, c0 + step)],
                            None if valid is None else valid[c0:c0 + step])
    return out


def table_sums(q: torch.Tensor, k: torch.Tensor, base: torch.Tensor, table: torch.Tensor, layers: int, align: int,
               causal: bool, scale: float) -> torch.Tensor:
    """`fused_stats(..., sums=True)` with no mask of `layers` layers shaped and strided as q
    (b, h, n, d) and k (b, h_kv, n, d), wherever they lie: `table` (int64 on their device) holds
    the queries' offsets in elements from `base` (a tensor of their dtype), then the keys'; every
    offset a multiple of `align`. Only the table's values say where the layers are, so a CUDA
    graph of this launch serves any forward pass of the shape once its table is refilled
    (tail_graphs). (L * b, h, 2) float64, as fused_stats."""
    b, h = q.shape[0], q.shape[1]
    out = torch.empty((layers * b, h, 2), dtype=torch.float64, device=q.device)
    _Launch(None, causal, scale, b, sums=True).launch(q, k, out, None, table[:layers], table[layers:2 * layers],
                                                       align, base=base)
    return out


_dtype = operator.attrgetter("dtype")


def _offset_table(qs: list[torch.Tensor], ks: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """int64 offsets in elements of every layer's q from qs[0] and of its k from ks[0], on their
    device (two views of one table), and the largest 16-byte alignment all of them keep (in
    elements; 1 if some do not).

    Tables are kept by their values: forward passes of one shape allocate their layers at the
    same places, so after the first one the table is found here, and no copy to the device
    (more host time than the kernel's launch) is queued."""
    size = qs[0].element_size()
    q0, k0 = qs[0].data_ptr(), ks[0].data_ptr()
    offsets = tuple([(p - q0) // size for p in map(torch.Tensor.data_ptr, qs)]
                    + [(p - k0) // size for p in map(torch.Tensor.data_ptr, ks)])
    device = qs[0].device
    key = (device, offsets)
    found = _TABLES.get(key)
    if found is None:
        if len(_TABLES) >= 64:
            _TABLES.clear()
        align = offset_alignment(offsets, size)
        table = to_device(torch.tensor(offsets, dtype=torch.int64), device)
        found = _TABLES[key] = (table[:len(qs)], table[len(qs):], align)  # the views too: slicing is an op call
    return found


_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor, int]] = {}


def offset_alignment(offsets: Iterable[int], element_size: int) -> int:
    """The largest 16-byte alignment, in elements, that every offset keeps (1 if some do not):
    what a table launch may promise the kernel (ALIGN), so that its loads stay wide."""
    align = max(1, 16 // element_size)
    return align if all(o % align == 0 for o in offsets) else 1


def _options() -> dict[str, int]:
    """Triton's launch options: warps per program, and stages where NUM_STAGES sets them."""
    return {"num_warps": NUM_WARPS} if NUM_STAGES is None else {"num_warps": NUM_WARPS, "num_stages": NUM_STAGES}


@dataclass
class _Launch:
    """What every launch of one fused_stats call shares."""

    mask: torch.Tensor | None
    causal: bool
    scale: float
    nb: int  # elements per layer (the mask's index is the element's modulo its batch)
    sums: bool = False  # sums_kernel (per head, over the counted rows) rather than rows_kernel

    def launch(self, q: torch.Tensor, k: torch.Tensor, out: torch.Tensor, valid: torch.Tensor | None = None,
               q_table: torch.Tensor | None = None, k_table: torch.Tensor | None = None, align: int = 1,
               base: torch.Tensor | None = None) -> None:
        """One kernel launch: q and k stacked, or (with the tables) layer 0 of layers shaped
        and strided alike, at the tables' offsets from it (from `base` where given: then q and k
        only give the layers' shape and strides). `valid`: bool (elements, n), rows adjacent,
        the rows that count (sums only)."""
        table = q_table is not None
        B, h = out.shape[0], out.shape[1]
        _, _, n, d = q.shape
        n_kv, kv = k.shape[1], k.shape[2]
        if self.mask is None:
            m, m_strides, mb = out, (0, 0, 0), 1  # an unused pointer
        else:
            m, mb = self.mask.view(torch.uint8), self.mask.shape[0]
            m_strides = (m.stride(0), m.stride(2), m.stride(3))
        dp = max(16, 1 << (d - 1).bit_length())
        common = dict(TABLE=table, HAS_MASK=self.mask is not None, CAUSAL=bool(self.causal),
                      IEEE=q.dtype == torch.float32, ALIGN=align, D=d, DP=dp, BM=BLOCK_M, BN=BLOCK_N)
        inputs = (q if base is None else base, k if base is None else base, q_table if table else q,
                  k_table if table else k, m, out)
        strides = (*q.stride(), *k.stride(), *m_strides, out.stride(0), out.stride(1))
        sizes = (h, h // n_kv, n, kv, self.nb, mb, float(self.scale))
        if self.sums:
            _kernel(sums=True)[(1, B * h)](*inputs, out if valid is None else valid, *strides,
                                           0 if valid is None else valid.stride(0), *sizes,
                                           HAS_VALID=valid is not None, **_options(), **common)
        else:
            _kernel()[(-(-n // BLOCK_M), B * h)](*inputs, *strides, out.stride(2), *sizes, **_options(),
                                                 **common)
