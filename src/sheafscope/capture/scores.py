"""What one attention call's softmax sees, and the exact statistics of its rows.

`Scores` holds how a call turns queries and keys into scores (scale, soft-capping, position
bias, causal flag, mask), so that any row can be recomputed exactly after the call: the
chunked route computes blocks of rows, the refinement single rows the log-sum-exp route
cannot be trusted with. Shapes: q (b, h, n, d), k (b, h_kv, kv, d); heads are grouped as
transformers groups them (query head h reads key head h // (h / h_kv)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sheafscope.sheaf import row_stats_from_scores

# Scores per step of an exact recomputation (rows x keys): bounds its memory.
ROW_STEP_ELEMENTS = 1 << 22


def stat_dtype(q: torch.Tensor) -> torch.dtype:
    """Scores for statistics: float64, except half-precision models on a GPU (float32 there:
    float64 arithmetic would cost more than the forward pass)."""
    if q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return torch.float64


@dataclass(frozen=True)
class Scores:
    """One attention call's score rule. `mask` is transformers' (b|1, 1|h, n, kv) boolean
    (True: attend) or additive mask; `bias` an additive position bias (b|1, h, n, kv)."""

    scale: float
    causal: bool
    mask: torch.Tensor | None = None
    softcap: float | None = None
    bias: torch.Tensor | None = None

    def _finish(self, s: torch.Tensor, rows: torch.Tensor, keys: torch.Tensor,
                select: tuple) -> torch.Tensor:
        """Soft-cap, bias and mask scores s (..., kv) of query rows `rows` against `keys`;
        `select` indexes the mask and bias (b, h, rows) to the same leading shape."""
        if self.softcap is not None:
            s = torch.tanh(s / self.softcap) * self.softcap
        if self.bias is not None:
            s = s + _take(self.bias, select).to(s.dtype)
        if self.causal:  # in place: s is always a fresh product here
            s = s.masked_fill_(keys[None, :] > rows[:, None], -torch.inf)
        return s if self.mask is None else masked(s, _take(self.mask, select))

    def block(self, q: torch.Tensor, k: torch.Tensor, q0: int, q1: int, dtype: torch.dtype) -> torch.Tensor:
        """Scores (b, h, q1 - q0, kv) of query rows q0..q1-1 against every key."""
        b, h, _, d = q.shape
        g = h // k.shape[1]
        qb = q[:, :, q0:q1].to(dtype).reshape(b, k.shape[1], g * (q1 - q0), d)
        s = (qb @ k.to(dtype).transpose(-1, -2)).reshape(b, h, q1 - q0, -1).mul_(self.scale)
        rows = torch.arange(q0, q1, device=q.device)
        keys = torch.arange(k.shape[2], device=q.device)
        full = (slice(None), slice(None), slice(q0, q1))
        return self._finish(s, rows, keys, full)

    def exact_rows(self, q: torch.Tensor, k: torch.Tensor, bi: torch.Tensor, hi: torch.Tensor,
                   ii: torch.Tensor, mask_b: torch.Tensor | None = None,
                   padded: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(1 - A_ii, A_i0) of the m query rows (bi, hi, ii), exactly; `mask_b` is each row's
        batch index into the mask where q's batch axis holds more than the mask's (default bi).
        Rows are grouped by the key head they read, so each group is one product against that
        head's keys (no per-row copy of the keys), in steps of bounded memory: a loop over the
        groups, or (`padded`) a few batched products over all of them."""
        mask_b = bi if mask_b is None else mask_b
        if padded:
            return self._padded_rows(q, k, bi, hi, ii, mask_b)
        dtype = stat_dtype(q)
        n_kv, kv = k.shape[1], k.shape[2]
        group = bi * n_kv + hi // (q.shape[1] // n_kv)
        order = torch.argsort(group)
        counts = torch.bincount(group[order], minlength=k.shape[0] * n_kv).tolist()
        off = torch.empty(len(ii), dtype=dtype, device=q.device)
        first = torch.empty_like(off)
        keys = torch.arange(kv, device=q.device)
        step = max(1, ROW_STEP_ELEMENTS // max(1, kv))
        start = 0
        for index, count in enumerate(counts):
            if count == 0:
                continue
            keys_t = k[index // n_kv, index % n_kv].to(dtype).T  # (d, kv)
            for r0 in range(start, start + count, step):
                sel = order[r0 : min(start + count, r0 + step)]
                b, h, i = bi[sel], hi[sel], ii[sel]
                s = self._finish((q[b, h, i].to(dtype) @ keys_t) * self.scale, i, keys, (mask_b[sel], h, i))
                off[sel], first[sel] = row_stats_from_scores(s, i)
            start += count
        return off, first

    def _padded_rows(self, q: torch.Tensor, k: torch.Tensor, bi: torch.Tensor, hi: torch.Tensor,
                     ii: torch.Tensor, mask_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """exact_rows as a few batched products over every key head at once, each head's rows
        padded to the longest group (padding rows are computed and dropped); the rows must come
        in (b, h) order, as nonzero() gives them."""
        dtype = stat_dtype(q)
        n_kv, kv, d = k.shape[1], k.shape[2], k.shape[3]
        n_groups = k.shape[0] * n_kv
        group = bi * n_kv + hi // (q.shape[1] // n_kv)  # non-decreasing
        slot = torch.arange(len(group), device=q.device) - torch.searchsorted(group, group)
        width = int(slot.max()) + 1
        queries = torch.zeros(n_groups, width, d, dtype=dtype, device=q.device)
        queries[group, slot] = q[bi, hi, ii].to(dtype)
        index = torch.zeros(3, n_groups, width, dtype=ii.dtype, device=q.device)  # padding rows: row 0
        index[:, group, slot] = torch.stack((ii, hi, mask_b))
        rows, heads, batch = index.flatten(1).unbind()
        keys_all = k.reshape(n_groups, kv, d)
        keys = torch.arange(kv, device=q.device)
        step = max(1, ROW_STEP_ELEMENTS // max(1, width * kv))
        parts = []
        for g0 in range(0, n_groups, step):
            g1 = min(n_groups, g0 + step)
            r = slice(g0 * width, g1 * width)
            s = (queries[g0:g1] @ keys_all[g0:g1].to(dtype).transpose(1, 2)).mul_(self.scale).flatten(0, 1)
            s = self._finish(s, rows[r], keys, (batch[r], heads[r], rows[r]))
            parts.append(row_stats_from_scores(s, rows[r]))
        off, first = (p[0] if len(parts) == 1 else torch.cat(p) for p in zip(*parts))
        at = group * width + slot
        return off[at], first[at]

    def own_and_first(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row's score (..., b, h, n) against its own key and against key 0, for the
        log-sum-exp route (which applies neither soft-capping nor a position bias); q and k may
        carry leading axes (layers) before their batch axis."""
        *lead, h, n, d = q.shape
        n_kv = k.shape[-3]
        # float32 at least, not float64: the log-sum-exp these scores meet is the kernel's float32,
        # and the rows where its rounding matters (A_ii > 1/2) are recomputed exactly anyway
        dtype = torch.promote_types(q.dtype, torch.float32)
        qg = q.to(dtype).view(*lead, n_kv, h // n_kv, n, d)
        kd = k.to(dtype)[..., None, :, :]
        own = torch.linalg.vecdot(qg, kd).reshape(*lead, h, n)
        first = (qg @ kd[..., :1, :].transpose(-1, -2)).reshape(*lead, h, n)
        own, first = own.to(stat_dtype(q)) * self.scale, first.to(stat_dtype(q)) * self.scale
        if self.mask is not None:
            own = masked(own, self.mask.diagonal(dim1=-2, dim2=-1))
            first = masked(first, self.mask[..., 0])
        return own, first


def masked(s: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scores s with transformers' mask applied: boolean (True: attend) or additive."""
    return s.masked_fill(~mask, -torch.inf) if mask.dtype == torch.bool else s + mask.to(s.dtype)


def _take(t: torch.Tensor, select: tuple) -> torch.Tensor:
    """t (b|1, h|1, n, kv) indexed by select (over b, h, rows), broadcasting its size-1 axes."""
    bi, hi, ii = select
    if isinstance(bi, slice):
        return t[:, :, ii]
    return t[bi if t.shape[0] > 1 else 0, hi if t.shape[1] > 1 else 0, ii]
