"""Per-row attention statistics of the fast path, from tensors the attention function holds.

For query row i of head h, with s_ij the pre-softmax scores exactly as the model's softmax sees
them (scaled, soft-capped, position-biased, masked) and lse_i = log sum_j exp(s_ij), a "rows"
tensor holds, float64, (batch, heads, n, 2):

    rows[..., i, 0] = 1 - A_ii = sum_{j != i} exp(s_ij - lse_i)
    rows[..., i, 1] = A_i0     = exp(s_i0 - lse_i)

The ways to get them, each a handful of tensor operations and none waiting for the device
(the callers in capture_fast.py choose):

  - `dense_rows`: exact, from one score product and a float64 softmax (1 - A_ii as the sum
    of the off-diagonal probabilities). For small problems, where the product is cheaper
    than anything.
  - `lse_rows`: from the fused kernel's lse and two row-wise dot products, O(n d) (on a GPU
    with half-precision inputs, batched products that accumulate float32). lse_i carries an
    absolute rounding of ~eps * |lse_i|, which is a large relative error of 1 - A_ii once
    A_ii is near 1; rows with 1 - A_ii < REFINE_BELOW are returned flagged.
  - `slot_rows`: the first few flagged rows of every head, recomputed from their scores
    against every key in fixed shapes (no host planning; the GPU route).
  - `exact_rows`: the (remaining) flagged rows, recomputed from float64 scores against their
    keys. Which rows those are is planned on the host (numpy) from a copy of the flags, so
    the caller can let the device run on and refine a layer later.

The score products of `dense_rows` and `slot_rows` are float64 (float64 copies of q and k),
except for half-precision models on a GPU (`half_products`): there they are the exact
products of the half-precision inputs summed in float32, as the lse route's s_ii. A score's
rounding, at most d * eps32 * scale * sum_j |q_j k_j| (typically ~1e-6), is then the
relative error of 1 - A_ii however small it is; everything after the product is float64.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

# Rows with 1 - A_ii below this get their row recomputed exactly (exact_rows): a few
# percent of rows on pretrained models. Above it, 1 - A_ii from the kernel's lse is accurate
# to about twice eps * |lse|, eager's own rounding.
REFINE_BELOW = 0.5
# Elements (rows x key columns, times batch and heads where they apply) of the largest block a
# chunked step may materialise. CPU: 2^24 float32 = 64 MiB; CUDA: 2^27 (a 7B model at 64k tokens
# keeps each mask block near 256 MiB).
CPU_BLOCK_ELEMENTS = 1 << 24
CUDA_BLOCK_ELEMENTS = 1 << 27
# (batch, row, KV head) products per batched call of the half-precision row scores: whole
# batch elements (stacked layers) up to this many, so that one call serves a short forward
# pass and the products' batch count stays moderate on long ones.
ROW_PRODUCTS = 1 << 22

_CONSTANTS: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def block_elements(device: torch.device) -> int:
    return CUDA_BLOCK_ELEMENTS if device.type == "cuda" else CPU_BLOCK_ELEMENTS


def rows_per_block(chunk_rows: int | None, per_row: int, n: int, device: torch.device) -> int:
    """Rows per block of a chunked step: `chunk_rows` if fixed, else what the element budget allows."""
    if chunk_rows:
        return max(1, min(n, chunk_rows))
    return max(16, min(n, block_elements(device) // max(per_row, 1)))


def grouped(q: torch.Tensor, n_kv: int) -> torch.Tensor:
    """(b, h, n, d) -> (b, h_kv, g, n, d): query head h reads key/value head h // g."""
    b, h, n, d = q.shape
    return q.view(b, n_kv, h // n_kv, n, d)


def stat_dtype(q: torch.Tensor) -> torch.dtype:
    """Scores and lse: float32 for float32 and half-precision models, float64 for float64."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(1, 0), (-1, 1) and the exact row of a query that sees only itself, (0, 1): float64
    on `device`, made once (a host-to-device copy per layer would cost more than the math)."""
    if device not in _CONSTANTS:
        t = torch.tensor([[1.0, 0.0], [-1.0, 1.0], [0.0, 1.0]], dtype=torch.float64, device=device)
        _CONSTANTS[device] = (t[0], t[1], t[2])
    return _CONSTANTS[device]


def _softcapped(s: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return s if softcap is None else torch.tanh(s / softcap) * softcap


def allowed(mask: torch.Tensor) -> torch.Tensor:
    """Which entries a mask lets through: a bool mask (True = attend) as it is, an additive
    one where it is above half its dtype's minimum (masked entries hold the minimum or -inf)."""
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


def _masked(s: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """float64 scores s with a bool or additive mask applied in place: -inf where masked."""
    if mask.dtype != torch.bool:
        s.add_(mask.double())
    return s.masked_fill_(~allowed(mask), -math.inf)


# ------------------------------------------------------------------------------------------------
# Exact, dense
# ------------------------------------------------------------------------------------------------
def dense_rows(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, scale: float,
               softcap: float | None, pbias: torch.Tensor | None) -> torch.Tensor:
    """Exact rows (b, h, n, 2) from float64 scores of every query against every key.

    `bias`: the mask as an additive float64 tensor (0 / -inf), broadcastable to (b, h, n, kv),
    or None for no mask; `pbias` a position bias likewise. 1 - A_ii is the sum of the row's
    off-diagonal probabilities (not 1 minus the diagonal), relative-accurate even where it is
    tiny. A row with no allowed key (padding) comes out NaN; callers never read it.

    Batch elements are taken a block at a time so that the float64 copies of queries and keys
    and the two (rows, h, n, kv) float64 tensors stay within `block_elements` (on a GPU the
    batch is 32 prompts times every layer, and queries alone, in float64, would be 4x the
    half-precision inputs held for it).
    """
    b, h, n, d = q.shape
    n_kv, kv = k.shape[1], k.shape[2]
    per_item = h * n * d + n_kv * kv * d + 2 * h * n * kv
    step = max(1, block_elements(q.device) // per_item)
    if step >= b:
        return _dense_rows_block(q, k, bias, scale, softcap, pbias)
    out = torch.empty(b, h, n, 2, dtype=torch.float64, device=q.device)
    part = lambda t, c0, c1: t if t is None or t.shape[0] == 1 else t[c0:c1]  # noqa: E731
    for c0 in range(0, b, step):
        c1 = min(b, c0 + step)
        out[c0:c1] = _dense_rows_block(q[c0:c1], k[c0:c1], part(bias, c0, c1), scale, softcap, part(pbias, c0, c1))
    return out


def _dense_rows_block(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, scale: float,
                      softcap: float | None, pbias: torch.Tensor | None) -> torch.Tensor:
    """`dense_rows` of one block. One (b, h, n, kv) float64 tensor is written by the product
    and updated in place, and one by the softmax: passes over them are what this costs."""
    n_kv, kv = k.shape[1], k.shape[2]
    b, h, n, d = q.shape
    bmm = half_products(q)
    if bmm is not None:  # float32 sums of exact products, as the slot route's scores
        qg = grouped(q, n_kv).reshape(b * n_kv, h // n_kv * n, d)
        s = bmm(qg, k.reshape(b * n_kv, kv, d).transpose(1, 2)).view(b, h, n, kv).double()
        s = _softcapped(s.mul_(scale), softcap)
    else:
        qg = grouped(q, n_kv).to(torch.float64, copy=True)  # a copy even of float64 queries: scaled in place
        if softcap is None:  # the scale on the queries: no pass over the scores for it
            qg.mul_(scale)
        s = torch.matmul(qg, k.double()[:, :, None].transpose(-1, -2)).view(b, h, n, -1)
        if softcap is not None:
            s = _softcapped(s.mul_(scale), softcap)
    if pbias is not None:
        s.add_(pbias.double())
    if bias is not None:
        s.add_(bias)
    p = torch.softmax(s, dim=-1)
    del s
    first = p[..., 0].clone()
    p.diagonal(dim1=-2, dim2=-1).zero_()
    return torch.stack((p.sum(-1), first), dim=-1)


# ------------------------------------------------------------------------------------------------
# From the kernel's lse
# ------------------------------------------------------------------------------------------------
def _row_scores(q: torch.Tensor, k: torch.Tensor, step: int) -> torch.Tensor:
    """(b, h, n, 2) unscaled s_ii and s_i0 in stat_dtype, by blocks of `step` rows."""
    b, h, n, d = q.shape
    n_kv = k.shape[1]
    dt = stat_dtype(q)
    scores = torch.empty(b, n_kv, h // n_kv, n, 2, dtype=dt, device=q.device)
    k_first = k[:, :, None, :1].to(dt).transpose(-1, -2)  # (b, h_kv, 1, d, 1)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        qg = grouped(q[:, :, r0:r1], n_kv).to(dt)
        scores[..., r0:r1, 0] = (qg * k[:, :, None, r0:r1].to(dt)).sum(-1)
        scores[..., r0:r1, 1] = torch.matmul(qg, k_first)[..., 0]
    return scores.view(b, h, n, 2)


def _row_scores_half(q: torch.Tensor, k: torch.Tensor, bmm) -> torch.Tensor:
    """`_row_scores` as batched products `bmm(a, b)` that return float32, (b, h, n, 2).

    The products read q and k in the layout the model makes them, (b, n, h, d) memory (as
    `capture_fast` stacks held layers; other layouts are copied to it first): there, for
    each (batch, row, KV head), the g query heads sharing the KV head are one contiguous
    (g, d) matrix, so s_ii is one batched (g x d) @ (d x 1) product with no permuted copy
    of q; s_i0 is one (n h x d) @ (d x h_kv) product per batch element (every query against
    key 0 of every KV head, which costs what one does: the product reads q once), of which
    each head keeps its own KV head's column. Batch elements go ROW_PRODUCTS rows at a time.
    """
    b, h, n, d = q.shape
    n_kv = k.shape[1]
    g = h // n_kv
    qn, kn = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous()  # no copy in the model's layout
    out = torch.empty(b, n, h, 2, dtype=torch.float32, device=q.device)
    per = max(1, ROW_PRODUCTS // (n * n_kv))
    for c0 in range(0, b, per):
        c1 = min(b, c0 + per)
        c, qc, kc = c1 - c0, qn[c0:c1], kn[c0:c1]
        out[c0:c1, ..., 0] = bmm(qc.reshape(c * n * n_kv, g, d), kc.reshape(c * n * n_kv, d, 1)).view(c, n, h)
        first = bmm(qc.reshape(c, n * h, d), kc[:, 0].transpose(1, 2)).view(c, n, n_kv, g, n_kv)
        out[c0:c1, ..., 1] = first.diagonal(dim1=2, dim2=4).transpose(-1, -2).reshape(c, n, h)
    return out.transpose(1, 2)


def _bmm_float32_out(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.bmm(a, b, out_dtype=torch.float32)


_HALF_BMM_OK: dict[tuple[torch.device, torch.dtype], bool] = {}


def _half_bmm_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `bmm(..., out_dtype=float32)` exists here for `dtype` and gives the float32
    path's numbers (to float32 accumulation) on a probe: checked once per device and dtype,
    so that a kernel that rounded its output to half precision could never reach the results."""
    key = (device, dtype)
    if key not in _HALF_BMM_OK:
        try:
            gen = torch.Generator(device=device).manual_seed(0)
            q = (torch.randn(2, 4, 96, 64, device=device, generator=gen) * 3).to(dtype)
            k = (torch.randn(2, 2, 96, 64, device=device, generator=gen) * 3).to(dtype)
            got = _row_scores_half(q, k, _bmm_float32_out).double()
            qd, kd = q.double(), k.double().repeat_interleave(2, dim=1)
            terms = torch.stack((qd * kd, qd * kd[:, :, :1]), dim=-2)
            bound = 64 * 2.0**-24 * terms.abs().sum(-1)
            _HALF_BMM_OK[key] = bool(((got - terms.sum(-1)).abs() <= bound).all())
        except (RuntimeError, TypeError):
            _HALF_BMM_OK[key] = False
    return _HALF_BMM_OK[key]


def half_products(q: torch.Tensor) -> Any:
    """`bmm(a, b)` returning float32 for half-precision tensors on a GPU (it reads the half
    precision inputs once, multiplies exactly and sums in float32), where it exists and passes
    its probe (`_half_bmm_ok`); else None. The score products of the lse and slot routes use it
    instead of float32 or float64 copies of q and k: the same float32 numbers as the float32
    path for s_ii and s_i0, and for the slot route scores whose rounding (d * eps32 * sum of
    |q_j k_j|, relative) is that of the lse route's unflagged rows."""
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16) or not _half_bmm_ok(q.device, q.dtype):
        return None
    return _bmm_float32_out


def _row_scores_half_cuda(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """`_row_scores` for half-precision queries on a GPU, from `half_products`: the same float32
    numbers, without `_row_scores`' float32 copies of q and k and its elementwise product
    (which made the statistics cost a fifth of a 7B forward pass at 2k tokens). None where
    that product is not available."""
    bmm = half_products(q)
    if bmm is None or k.shape[2] != q.shape[2]:
        return None
    return _row_scores_half(q, k, bmm)


def lse_rows(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, point_bias: torch.Tensor | None,
             scale: float, softcap: float | None, pbias: torch.Tensor | None, chunk_rows: int | None,
             first_row_alone: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (b, h, n, 2) from the kernel's lse (b, h, n), and the flags (b, h, n) of rows whose
    1 - A_ii must be recomputed (both their columns are set to 0 here: the recomputation gives
    A_i0 too, which from lse carries the same absolute error).

    s_ii and s_i0 are row-wise dot products in float32 (float64 for float64 models), by blocks
    of rows so that temporaries stay O(block x d); on a GPU, half-precision inputs go through
    float32-accumulating batched products instead (`_row_scores_half_cuda`). `point_bias`
    (b | 1, 1, n, 2) float64: the mask's additive value at (i, i) and (i, 0), or None. `first_row_alone`: row 0 sees only
    key 0 (causal attention), so its row is exactly (0, 1).
    """
    b, h, n, d = q.shape
    step = rows_per_block(chunk_rows, b * h * d, n, q.device)
    scores = _row_scores_half_cuda(q, k)
    if scores is None:
        scores = _row_scores(q, k, step)
    x = _softcapped(scores.mul_(scale), softcap).to(torch.float64, memory_format=torch.contiguous_format)
    if pbias is not None:
        x[..., 0] += pbias.diagonal(dim1=-2, dim2=-1).double()
        x[..., 1] += pbias[..., :, 0].double()
    if point_bias is not None:
        x += point_bias
    x -= lse.double()[..., None]
    base, sign, alone = _constants(q.device)
    rows = torch.addcmul(base, x.exp_(), sign)
    flag = rows[..., 0] < REFINE_BELOW
    rows.masked_fill_(flag[..., None], 0.0)
    if first_row_alone:
        rows[:, :, 0] = alone
        flag[:, :, 0] = False
    return rows, flag


# ------------------------------------------------------------------------------------------------
# Exact, for flagged rows
# ------------------------------------------------------------------------------------------------
def slot_rows(q: torch.Tensor, k: torch.Tensor, flags: torch.Tensor, width: int, mask: torch.Tensor | None,
              causal: bool, scale: float, softcap: float | None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact rows for the first `width` flagged rows of every head, in fixed shapes: no host
    planning, nothing that waits for the device (the GPU route of the refinement).

    q (B, h, n, d), k (B, h_kv, kv, d), flags (B, h, n) bool. `mask`: bool (True = attend) or
    additive, (m, 1, n, kv) with B a multiple of m (layers stacked along the batch repeat the
    mask), or None with `causal` for a causal mask, or neither. Returns rows (B, h, width): the
    row index of each slot; used (B, h, width): whether the slot holds a flagged row; exact
    (B, h, width, 2): (1 - A_ii, A_i0) of each slot's row (meaningless where not used); and
    rest (B, h, n): the flagged rows beyond the first `width` of their head, left for
    `exact_rows`. The products cost B x h x width x kv float64 scores, and float64 keys
    (half precision on a GPU: float32 scores from `half_products`, no float64 keys).
    """
    b, h, n, d = q.shape
    kv = k.shape[2]
    width = min(width, n)
    # The earliest flagged rows rank highest; unflagged rows rank 0 (topk returns distinct rows).
    rank = torch.where(flags, torch.arange(n, 0, -1, device=q.device), 0)
    top, rows = rank.topk(width, dim=-1, sorted=False)
    used = top > 0
    rest = flags & (flags.cumsum(-1, dtype=torch.int32) > width)
    qs = q.gather(2, rows[..., None].expand(b, h, width, d))
    s = _slot_scores(qs, k, half_products(q)).mul_(scale)
    s = _softcapped(s, softcap)
    cols = torch.arange(kv, device=q.device)
    if mask is not None:
        per_batch = (torch.arange(b, device=q.device) % mask.shape[0])[:, None, None]
        _masked(s, mask[per_batch, 0, rows])  # the mask rows: (B, h, width, kv)
    elif causal:
        s.masked_fill_(cols > rows[..., None], -math.inf)
    # Probabilities up to the row's normaliser: 1 - A_ii is the sum of the off-diagonal ones
    # over the sum of all, both sums of positive terms (no cancellation however small).
    p = s.sub_(s.amax(-1, keepdim=True)).exp_()
    first = p[..., 0].clone()
    diag = p.gather(-1, rows[..., None])[..., 0]
    off = p.scatter_(-1, rows[..., None], 0.0).sum(-1)
    total = off + diag
    return rows, used, torch.stack((off / total, first / total), dim=-1), rest


def _slot_scores(qs: torch.Tensor, k: torch.Tensor, bmm) -> torch.Tensor:
    """Unscaled float64 scores (B, h, width, kv) of the slot rows qs (B, h, width, d) against
    every key: a float64 product, or with `bmm` (`half_products`) float32 sums of the exact
    products of half-precision inputs (no float64 copy of the keys, and no float64 product:
    together most of this route's time on a GPU)."""
    b, h, width, d = qs.shape
    n_kv, kv = k.shape[1], k.shape[2]
    if bmm is None:
        return torch.matmul(grouped(qs.double(), n_kv), k.double()[:, :, None].transpose(-1, -2)).view(b, h, width, kv)
    s = bmm(grouped(qs, n_kv).reshape(b * n_kv, h // n_kv * width, d), k.reshape(b * n_kv, kv, d).transpose(1, 2))
    return s.view(b, h, width, kv).double()


def plan_pieces(hits: np.ndarray, n_kv: int, groups: int, keys: int, d: int, budget: int) -> list[dict[str, np.ndarray]]:
    """Group flagged rows for batched products, on the host.

    hits (F, 3): batch, head, row. Rows are grouped by the (batch, KV head) whose keys they
    read; a piece is a run of consecutive groups (a group with very many rows split) padded to
    its largest group, so that one float64 product (groups, width, d) x (groups, d, keys)
    serves it, within `budget` elements for the scores and the keys.
    """
    pair = hits[:, 0] * n_kv + hits[:, 1] // groups
    order = np.argsort(pair, kind="stable")
    hits, pair = hits[order], pair[order]
    rows_cap = max(1, budget // keys)
    groups_cap = max(1, budget // (keys * d))
    starts = np.flatnonzero(np.r_[True, pair[1:] != pair[:-1]])
    ends = np.r_[starts[1:], len(pair)]
    segments = [(s0, min(e, s0 + rows_cap)) for s, e in zip(starts, ends) for s0 in range(s, e, rows_cap)]
    # Longest first, so that a piece pads its groups to similar widths: the product costs
    # groups x width x keys however few rows the narrow groups hold.
    segments.sort(key=lambda seg: seg[0] - seg[1])
    pieces, cur, width = [], [], 0
    for seg in segments:
        rows = seg[1] - seg[0]
        if cur and ((len(cur) + 1) * max(width, rows) * keys > budget or len(cur) >= groups_cap):
            pieces.append(cur)
            cur, width = [], 0
        cur.append(seg)
        width = max(width, rows)
    if cur:
        pieces.append(cur)
    out = []
    for piece in pieces:
        lens = np.array([e - s for s, e in piece])
        gid = np.repeat(np.arange(len(piece)), lens)
        slot = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
        group_pair = pair[[s for s, _ in piece]]
        piece_hits = np.concatenate([hits[s:e] for s, e in piece])
        out.append({"hits": piece_hits, "gid": gid, "slot": slot, "width": int(lens.max()),
                    "kv_batch": group_pair // n_kv, "kv_head": group_pair % n_kv})
    return out


def to_device(a: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor (or an int64 host array) on `device`, without making the host wait for
    the device: a copy from pageable memory would wait for the work queued there first."""
    t = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def exact_rows(q: torch.Tensor, k: torch.Tensor, hits: np.ndarray, q0: int, k0: int, k1: int,
                  block: torch.Tensor | None, causal: bool, scale: float, softcap: float | None,
                  pbias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact rows (1 - A_ii, A_i0) for the rows `hits` (F, 3: batch, head, row; rows in a block
    starting at q0 whose keys are k0..k1-1), from float64 scores: returns (batch, head, row)
    index tensors (3, F) and the rows (F, 2) on q's device, in the order of the planned pieces.

    `block`: the mask of the block's rows over keys k0..k1-1 (bool, True = attend, or
    additive), (b | 1, 1, rows, keys); or None with `causal` for a causal mask, or neither.
    """
    _, h, _, d = q.shape
    n_kv = k.shape[1]
    keys = k1 - k0
    pieces = plan_pieces(hits, n_kv, h // n_kv, keys, d, block_elements(q.device) // 4)
    idx_out, vals = [], []
    for piece in pieces:
        f = len(piece["gid"])
        packed = to_device(np.concatenate([piece["hits"].T.ravel(), piece["gid"], piece["slot"],
                                           piece["kv_batch"], piece["kv_head"]]), q.device)
        bb, hh, ii, gid, slot = packed[: 5 * f].view(5, f)
        kb, kh = packed[5 * f:].view(2, -1)
        qs = torch.zeros(len(piece["kv_batch"]), piece["width"], d, dtype=torch.float64, device=q.device)
        qs[gid, slot] = q[bb, hh, ii].double()
        sc = torch.bmm(qs, k[kb, kh, k0:k1].double().transpose(1, 2))[gid, slot].mul_(scale)  # (F, keys)
        sc = _softcapped(sc, softcap)
        if pbias is not None:
            sc = sc + pbias[bb % pbias.shape[0], hh if pbias.shape[1] > 1 else 0, ii, k0:k1].double()
        cols = torch.arange(k0, k1, device=q.device)
        if block is not None:
            sc = _masked(sc, block[bb % block.shape[0], 0, ii - q0])  # bb may index layers stacked along the batch
        elif causal:
            sc = sc.masked_fill_(cols > ii[:, None], -math.inf)
        lse = torch.logsumexp(sc, dim=-1)
        first = sc[:, 0] - lse if k0 == 0 else torch.full_like(lse, -math.inf)  # key 0 outside the window: A_i0 = 0
        off = torch.logsumexp(sc.masked_fill_(cols == ii[:, None], -math.inf), dim=-1).sub_(lse)
        idx_out.append(torch.stack((bb, hh, ii)))
        vals.append(torch.stack((off, first), dim=-1).exp_())
    if len(vals) == 1:
        return idx_out[0], vals[0]
    return torch.cat(idx_out, dim=1), torch.cat(vals)
