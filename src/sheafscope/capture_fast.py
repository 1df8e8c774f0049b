"""The fast path: attention diagonals captured inside the model's own forward pass.

For query row i of head h, with s_ij the pre-softmax scores exactly as the model's softmax sees
them (scaled, soft-capped, position-biased, masked) and lse_i = log sum_j exp(s_ij):

    1 - A_h[i,i] = -expm1(s_ii - lse_i),        A_h[i,0] = exp(s_i0 - lse_i).

So the statistics need s_ii and s_i0 (row-wise dot products, O(n d)) and lse_i, which the fused
attention kernels return next to their output for free ("the lse route"). No n x n matrix is
ever built:

  - CPU: torch's flash kernel for CPU (`_scaled_dot_product_flash_attention_for_cpu`, the one
    `scaled_dot_product_attention` runs) returns (output, lse) in one pass;
  - CUDA: flash (`_scaled_dot_product_flash_attention`, half precision, no mask) or
    memory-efficient attention (`_scaled_dot_product_efficient_attention`, any mask as an
    additive bias) with compute_log_sumexp;
  - anywhere else, and for what no kernel does (logit soft-capping, a position bias): a chunked
    torch computation over blocks of query rows, memory O(rows x n).

Precision. lse_i carries an absolute rounding of about eps * |lse_i|, so -expm1(s_ii - lse_i)
has a relative error of eps * |lse_i| / (1 - A_ii): fine where A_ii <= 1/2 (eager's own float
error is eps * |s|), noise where a head attends to itself and 1 - A_ii is tiny. Rows with
A_ii > 1/2 (a few percent on pretrained models) are therefore recomputed exactly from float64
scores (`_refine_rows`), summing their off-diagonal terms. Small problems (short prompts, a
batch of them) skip the lse route and get exact float64 statistics for every row from one
dense product (`DENSE_EXACT_ELEMENTS`), cheaper there than the route's bookkeeping.

Masks are registered as a `LazyMask`: the recipe of the boolean mask transformers would build
for sdpa, materialised one block of query rows at a time (with the key range that block can
see), so that sliding windows and padded batches never cost an n x n mask either.

Registration (on import): the attention function under the name FAST_ATTENTION in
transformers' AttentionInterface, the LazyMask builder under the same name in
AttentionMaskInterface. A model loaded with attn_implementation=FAST_ATTENTION computes the
same attention outputs as with sdpa; statistics are recorded only inside a `DiagonalCapture`
(looked up through a ContextVar, so nothing leaks between models or threads).
"""

from __future__ import annotations

import math
from collections import Counter
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sheafscope.errors import SheafscopeError

FAST_ATTENTION = "sheafscope"

# Elements (rows x key columns, times batch and heads where they apply) of the largest block a
# chunked step may materialise. CPU: 2^24 float32 = 64 MiB; CUDA: 2^27 (a 7B model at 64k tokens
# keeps each mask block near 256 MiB).
CPU_BLOCK_ELEMENTS = 1 << 24
CUDA_BLOCK_ELEMENTS = 1 << 27
# A LazyMask no larger than this (batch x q x kv booleans) is materialised once and reused by
# every layer: cheaper than rebuilding small masks 30 times per forward.
SMALL_MASK_ELEMENTS = 1 << 22
# Rows with 1 - A_ii below this get their statistics recomputed from float64 scores (see
# _refine_rows): a few percent of rows on pretrained models.
REFINE_BELOW = 0.5
# Rows per fused call when a mask is given (see _attention_with_lse).
FUSED_MASK_ROWS = 2048
# A block of query rows this small (batch x heads x rows x keys) gets exact float64 statistics
# for all its rows in one dense product: short prompts never take the lse route at all.
DENSE_EXACT_ELEMENTS = 1 << 18
# On a GPU float64 products are cheap next to the launches and host syncs of the lse route:
# a batch of 32 short prompts of a 7B model (32 x 32 heads x 64 x 64) stays dense.
DENSE_EXACT_ELEMENTS_CUDA = 1 << 24

_ACTIVE: ContextVar["DiagonalCapture | None"] = ContextVar("sheafscope_diagonal_capture", default=None)


# ------------------------------------------------------------------------------------------------
# Masks
# ------------------------------------------------------------------------------------------------
class LazyMask:
    """The boolean mask (True = attend) that transformers' `sdpa_mask` would build, kept as its
    recipe and built one block of query rows at a time.

    Block rows are built by `sdpa_mask` itself with a query offset, so every mask pattern
    transformers knows (causal, sliding window, chunked, padding, bidirectional, custom
    overlays) means here exactly what it means for sdpa and eager.
    """

    def __init__(self, recipe: dict[str, Any]):
        self.recipe = recipe
        self.batch_size = int(recipe["batch_size"])
        self.q_length = int(recipe["q_length"])
        self.kv_length = int(recipe["kv_length"])
        self._full: torch.Tensor | None = None
        self._ranges: dict[tuple[int, int], tuple[int, int]] = {}

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.batch_size, 1, self.q_length, self.kv_length)

    @property
    def ndim(self) -> int:
        return 4

    def rows(self, q0: int, q1: int) -> torch.Tensor:
        """Mask rows q0..q1-1: bool (batch, 1, q1 - q0, kv_length)."""
        if self._full is None and self.batch_size * self.q_length * self.kv_length <= SMALL_MASK_ELEMENTS:
            self._full = self._build(0, self.q_length)
        if self._full is not None:
            return self._full[:, :, q0:q1]
        return self._build(q0, q1)

    def _build(self, q0: int, q1: int) -> torch.Tensor:
        from transformers.masking_utils import sdpa_mask

        r = dict(self.recipe)
        r["q_length"] = q1 - q0
        r["q_offset"] = r.get("q_offset", 0) + q0
        m = sdpa_mask(**r, allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
        return m.expand(self.batch_size, 1, q1 - q0, self.kv_length)

    def key_range(self, q0: int, q1: int, rows: torch.Tensor) -> tuple[int, int]:
        """The smallest [k0, k1) holding every key that rows q0..q1-1 attend to (cached: all
        layers share one mask). A block with no allowed key at all keeps the full range."""
        key = (q0, q1)
        if key not in self._ranges:
            cols = rows.any(dim=2).any(dim=1).any(dim=0)
            idx = cols.nonzero()
            self._ranges[key] = (int(idx[0]), int(idx[-1]) + 1) if idx.numel() else (0, self.kv_length)
        return self._ranges[key]

    def materialize(self) -> torch.Tensor:
        """The whole (batch, 1, q, kv) boolean mask: only for small masks and sdpa fallbacks."""
        return self.rows(0, self.q_length)


def _mask_skippable(recipe: dict[str, Any]) -> bool:
    """Whether sdpa would pass no mask at all (rely on is_causal, or full attention)."""
    try:
        from transformers.masking_utils import (
            _ignore_bidirectional_mask_sdpa,
            _ignore_causal_mask_sdpa,
            prepare_padding_mask,
        )
    except ImportError:  # private helpers moved: materialise blocks (correct, a little slower)
        return False
    padding = prepare_padding_mask(recipe.get("attention_mask"), recipe["kv_length"], recipe.get("kv_offset", 0))
    local = recipe.get("local_size")
    if recipe.get("allow_is_causal_skip", True) and _ignore_causal_mask_sdpa(
        padding, recipe["q_length"], recipe["kv_length"], recipe.get("q_offset", 0), recipe.get("kv_offset", 0), local
    ):
        return True
    if recipe.get("allow_is_bidirectional_skip", False) and _ignore_bidirectional_mask_sdpa(padding, recipe["kv_length"], local):
        return True
    return False


def lazy_sdpa_mask(batch_size: int, q_length: int, kv_length: int, **kwargs: Any) -> LazyMask | None:
    """Mask builder registered for FAST_ATTENTION: None where sdpa would use no mask, else a LazyMask."""
    recipe = dict(batch_size=batch_size, q_length=q_length, kv_length=kv_length, **kwargs)
    if _mask_skippable(recipe):
        return None
    recipe.pop("allow_is_causal_skip", None)
    recipe.pop("allow_is_bidirectional_skip", None)
    return LazyMask(recipe)


def _mask_block(mask: Any, q0: int, q1: int) -> torch.Tensor:
    """Rows q0..q1-1 of a mask the attention function was given: bool (True = attend) or an
    additive float tensor, shape (batch | 1, 1, rows, kv)."""
    if isinstance(mask, LazyMask):
        return mask.rows(q0, q1)
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise SheafscopeError(f"{FAST_ATTENTION} attention expects a (batch, 1, q, kv) mask, got shape {tuple(mask.shape)}")
    return mask[:, :, q0:q1]


def _allowed(block: torch.Tensor) -> torch.Tensor:
    return block if block.dtype == torch.bool else block > torch.finfo(block.dtype).min / 2


def _key_range(mask: Any, q0: int, q1: int, block: torch.Tensor) -> tuple[int, int]:
    if isinstance(mask, LazyMask):
        return mask.key_range(q0, q1, block)
    idx = _allowed(block).any(dim=2).any(dim=1).any(dim=0).nonzero()
    return (int(idx[0]), int(idx[-1]) + 1) if idx.numel() else (0, block.shape[-1])


def _as_bias(block: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive bias of a mask block. Masked entries get the dtype's finite minimum (as eager
    masks do), not -inf: a fully masked row (padding under a sliding window) then stays finite
    instead of NaN, and a NaN there would leak into valid rows through 0 * NaN in P @ V."""
    if block.dtype != torch.bool:
        return block.to(dtype)
    return torch.zeros(block.shape, dtype=dtype, device=block.device).masked_fill_(~block, torch.finfo(dtype).min)


def _point_bias(block: torch.Tensor, q0: int, key: int | None) -> torch.Tensor:
    """The mask's additive value (0 or -inf for boolean masks) at (row i, key i) for key None,
    else at (row i, key `key`), for the block's rows q0..: (batch | 1, 1, rows) float64."""
    r = block.shape[2]
    cols = torch.arange(q0, q0 + r, device=block.device) if key is None else torch.full((r,), key, device=block.device)
    vals = block[:, 0, torch.arange(r, device=block.device), cols]
    if block.dtype == torch.bool:
        vals = torch.zeros(vals.shape, dtype=torch.float64, device=vals.device).masked_fill_(~vals, -math.inf)
    return vals.double()[:, None]


# ------------------------------------------------------------------------------------------------
# Capture
# ------------------------------------------------------------------------------------------------
@dataclass
class _LayerRecord:
    off: torch.Tensor  # (b, h, n) float64 per position, or (b, h) sums over valid rows
    sink: torch.Tensor  # likewise, A_i0 (sums over valid rows i >= 1)


@dataclass(eq=False)
class DiagonalCapture:
    """Records, during forward passes of a model loaded with attn_implementation=FAST_ATTENTION,
    each layer's 1 - A_h[i,i] and A_h[i,0] for every batch element, head and query position.

        with DiagonalCapture(model) as cap:
            model(input_ids)
        cap.off[layer]   # (batch, heads, n) float64: 1 - A_ii
        cap.sink[layer]  # (batch, heads, n) float64: A_i0

    With `valid` (batch, n) bool and keep_positions=False, each layer keeps only its sums over
    valid rows (`masses` then gives per-prompt numbers), so memory stays O(layers x heads).
    `kernel`: "auto" (fused kernels where they apply), or "chunked" (the torch fallback
    everywhere, for tests). `chunk_rows` fixes the rows per block of chunked steps.
    `exact_below`: problems (batch x heads x rows x keys) up to this size get exact float64
    statistics from one dense product instead of the lse route (0: always the lse route;
    None: DENSE_EXACT_ELEMENTS, or DENSE_EXACT_ELEMENTS_CUDA on a GPU).
    """

    model: nn.Module
    valid: torch.Tensor | None = None
    keep_positions: bool = True
    kernel: str = "auto"
    chunk_rows: int | None = None
    exact_below: int | None = None
    layer_of: dict[int, int] = field(default_factory=dict)
    records: dict[int, _LayerRecord] = field(default_factory=dict)
    kernels: Counter = field(default_factory=Counter)  # which computation ran, per attention call
    fallbacks: list[str] = field(default_factory=list)  # why a fused kernel was not used
    max_block: tuple[int, int] = (0, 0)  # largest (rows, key columns) block any chunked step built
    _token: Any = None

    def __post_init__(self) -> None:
        if self.kernel not in ("auto", "chunked"):
            raise ValueError(f"kernel must be 'auto' or 'chunked', not {self.kernel!r}")
        if not self.layer_of:
            self.layer_of = attention_layer_indices(self.model)

    def __enter__(self) -> "DiagonalCapture":
        impl = getattr(getattr(self.model, "config", None), "_attn_implementation", None)
        if impl != FAST_ATTENTION:
            raise SheafscopeError(
                f"DiagonalCapture needs a model loaded with attn_implementation={FAST_ATTENTION!r} (got {impl!r})"
            )
        self.records.clear()
        self._token = _ACTIVE.set(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        _ACTIVE.reset(self._token)
        self._token = None

    # -- results ------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.records)

    @property
    def off(self) -> list[torch.Tensor]:
        return [self.records[k].off for k in sorted(self.records)]

    @property
    def sink(self) -> list[torch.Tensor]:
        return [self.records[k].sink for k in sorted(self.records)]

    def masses(self, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per batch element: offdiag mass (b, layers, heads) = sum over its valid rows of
        1 - A_ii, and first-token mass (b, layers, heads) = mean over its rows 1..n-1 of A_i0."""
        layers = sorted(self.records)
        if layers != list(range(len(layers))):
            raise SheafscopeError(f"attention statistics were recorded for layers {layers}, not 0..{len(layers) - 1}")
        if self.keep_positions:
            n = self.records[layers[0]].off.shape[-1]
            dev = self.records[layers[0]].off.device
            valid = torch.arange(n, device=dev)[None, :] < torch.tensor(lengths, device=dev)[:, None]
            after_first = valid.clone()
            after_first[:, 0] = False
            off = torch.stack([(self.records[k].off * valid[:, None]).sum(-1) for k in layers], dim=1)
            sink = torch.stack([(self.records[k].sink * after_first[:, None]).sum(-1) for k in layers], dim=1)
        else:
            off = torch.stack([self.records[k].off for k in layers], dim=1)
            sink = torch.stack([self.records[k].sink for k in layers], dim=1)
        denom = (torch.tensor(lengths, dtype=torch.float64, device=sink.device) - 1).clamp(min=1)
        return off.cpu(), (sink / denom[:, None, None]).cpu()

    # -- called by the attention function -----------------------------------------------------------
    def _layer(self, module: nn.Module) -> int:
        idx = self.layer_of.get(id(module))
        if idx is None:
            idx = getattr(module, "layer_idx", None)
        if idx is None:  # a family without layer indices: number the calls in order
            idx = len(self.records)
            self.layer_of[id(module)] = idx
        return int(idx)

    def _note_block(self, rows: int, cols: int) -> None:
        if rows * cols > self.max_block[0] * self.max_block[1]:
            self.max_block = (rows, cols)

    def _record(self, module: nn.Module, off: torch.Tensor, sink: torch.Tensor) -> None:
        layer = self._layer(module)
        if not self.keep_positions:
            n = off.shape[-1]
            valid = self.valid if self.valid is not None else torch.ones(off.shape[0], n, dtype=torch.bool, device=off.device)
            valid = valid.to(off.device)
            after_first = valid.clone()
            after_first[:, 0] = False
            # where(), not a product: a NaN in a padded row must not poison the sum (check_finite
            # then reports only what valid rows produced).
            off = torch.where(valid[:, None], off, 0.0).sum(-1)
            sink = torch.where(after_first[:, None], sink, 0.0).sum(-1)
        if layer in self.records:
            raise SheafscopeError(f"layer {layer} ran twice inside one DiagonalCapture; use one capture per forward pass")
        self.records[layer] = _LayerRecord(off, sink)


def attention_layer_indices(model: nn.Module) -> dict[int, int]:
    """id(attention module) -> layer index, from the model's adapter (the layer numbering the
    rest of sheafscope uses); empty if no adapter knows the model."""
    try:
        from sheafscope.adapters import adapter_for

        adapter = adapter_for(model)
    except Exception:
        return {}
    return {id(adapter.attention(layer)): layer for layer in range(adapter.geometry.n_layers)}


# ------------------------------------------------------------------------------------------------
# The attention function
# ------------------------------------------------------------------------------------------------
def _block_elements(device: torch.device) -> int:
    return CUDA_BLOCK_ELEMENTS if device.type == "cuda" else CPU_BLOCK_ELEMENTS


def _rows_per_block(capture: DiagonalCapture | None, per_row: int, n: int, device: torch.device) -> int:
    if capture is not None and capture.chunk_rows:
        return max(1, min(n, capture.chunk_rows))
    return max(16, min(n, _block_elements(device) // max(per_row, 1)))


def _grouped(q: torch.Tensor, n_kv: int) -> torch.Tensor:
    """(b, h, n, d) -> (b, h_kv, g, n, d): query head h reads key/value head h // g."""
    b, h, n, d = q.shape
    return q.view(b, n_kv, h // n_kv, n, d)


def _stat_dtype(q: torch.Tensor) -> torch.dtype:
    """Scores and lse: float32 for float32 and half-precision models, float64 for float64."""
    return torch.promote_types(q.dtype, torch.float32)


def _row_scores(q: torch.Tensor, k: torch.Tensor, scale: float, softcap: float | None,
                capture: DiagonalCapture | None) -> tuple[torch.Tensor, torch.Tensor]:
    """s_ii and s_i0 (in _stat_dtype), (b, h, n) each, as row-wise dot products: O(n d), never
    a score matrix. Row blocks bound the temporaries to O(block x d)."""
    b, h, n, d = q.shape
    n_kv = k.shape[1]
    dt = _stat_dtype(q)
    diag = torch.empty(b, h, n, dtype=dt, device=q.device)
    first = torch.empty(b, h, n, dtype=dt, device=q.device)
    k0 = k[:, :, :1].to(dt)[:, :, None]  # (b, h_kv, 1, 1, d)
    step = _rows_per_block(capture, b * h * d, n, q.device)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        qg = _grouped(q[:, :, r0:r1], n_kv).to(dt)
        diag[:, :, r0:r1] = (qg * k[:, :, r0:r1].to(dt)[:, :, None]).sum(-1).reshape(b, h, r1 - r0)
        first[:, :, r0:r1] = (qg * k0).sum(-1).reshape(b, h, r1 - r0)
    diag, first = diag * scale, first * scale
    if softcap is not None:
        diag, first = torch.tanh(diag / softcap) * softcap, torch.tanh(first / softcap) * softcap
    return diag, first


def _fused_cpu(q, k, v, bias, causal, scale):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, causal, attn_mask=bias, scale=scale
    )
    return out, lse


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return x
    b, h, n, d = x.shape
    return x[:, :, None].expand(b, h, groups, n, d).reshape(b, h * groups, n, d)


def _fused_cuda(q, k, v, bias, causal, scale):
    groups = q.shape[1] // k.shape[1]
    if bias is None and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256:
        try:
            res = torch.ops.aten._scaled_dot_product_flash_attention(
                q, _repeat_kv(k, groups), _repeat_kv(v, groups), 0.0, causal, False, scale=scale
            )
            return res[0], res[1]
        except RuntimeError:
            pass  # flash unavailable for this shape/GPU: memory-efficient attention below
    k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
    if bias is not None:
        # Memory-efficient attention wants the bias's row stride aligned to 16 elements (what
        # scaled_dot_product_attention does internally): allocate padded, use a view.
        b_, _, rows, kv = bias.shape
        padded = torch.empty(b_, 1, rows, (kv + 15) // 16 * 16, dtype=q.dtype, device=q.device)
        padded[..., :kv] = bias
        bias = padded[..., :kv].expand(q.shape[0], q.shape[1], rows, kv)
    res = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, 0.0, causal, scale=scale)
    return res[0], res[1][..., : q.shape[2]]


def _fused(q, k, v, bias, causal, scale):
    if q.device.type == "cpu":
        return _fused_cpu(q, k, v, bias, causal, scale)
    if q.device.type == "cuda":
        return _fused_cuda(q, k, v, bias, causal, scale)
    raise RuntimeError(f"no fused attention kernel with log-sum-exp for device {q.device.type}")


def _chunk_attention(q, k, v, block, causal_from, scale, softcap, pbias):
    """Attention output and lse of one block of query rows, in torch (the fallback).

    q (b, h, r, d) holds rows q0..; k, v (b, h_kv, c, d) key columns k0..; `block` the mask over
    those rows and columns, or None with `causal_from` = (q0, k0) for a causal mask, or neither.
    Scores are at least float32 (_stat_dtype) even for half-precision models, so that lse
    agrees with the diagonal scores of _row_scores to float32 rounding.
    """
    b, h, r, d = q.shape
    n_kv = k.shape[1]
    dt = _stat_dtype(q)
    s = torch.matmul(_grouped(q, n_kv).to(dt), k.to(dt)[:, :, None].transpose(-1, -2)).reshape(b, h, r, -1) * scale
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    if pbias is not None:
        s = s + pbias.to(dt)
    if causal_from is not None:
        q0, k0 = causal_from
        future = torch.arange(k0, k0 + s.shape[-1], device=q.device)[None, :] > torch.arange(q0, q0 + r, device=q.device)[:, None]
        s = s.masked_fill(future, torch.finfo(s.dtype).min)
    if block is not None:
        s = s.masked_fill(~block, torch.finfo(s.dtype).min) if block.dtype == torch.bool else s + block.to(dt)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None]).to(v.dtype)
    out = torch.matmul(p.view(b, n_kv, h // n_kv, r, -1), v[:, :, None]).reshape(b, h, r, -1)
    return out, lse


def _attention_with_lse(q, k, v, mask, causal, scale, softcap, pbias, capture, point_bias=True):
    """Attention output (b, h, n, d_v) in v's dtype and lse (b, h, n) in _stat_dtype, plus the
    mask's additive value at each row's diagonal and first key ((b|1, 1, n) float64; None: 0;
    also None when not `point_bias`)."""
    b, h, n, _ = q.shape
    kv_len = k.shape[2]
    dev = q.device.type
    want_fused = capture is None or capture.kernel == "auto"
    reason = ("logit soft-capping" if softcap is not None else "a position bias" if pbias is not None
              else None if want_fused else "kernel='chunked' requested")
    fused_ok = reason is None

    def note(kind: str, why: str | None = None) -> None:
        if capture is not None:
            capture.kernels[kind] += 1
            if why and why not in capture.fallbacks:
                capture.fallbacks.append(why)

    if mask is None and fused_ok:
        # One fused call for the whole sequence: the kernel applies is_causal itself.
        try:
            out, lse = _fused(q, k, v, None, causal, scale)
            note(f"fused-{dev}")
            return out, lse.to(_stat_dtype(q)), None, None
        except RuntimeError as e:
            fused_ok, reason = False, f"fused kernel failed on {dev} ({str(e).splitlines()[0][:160]})"

    out = torch.empty(b, h, n, v.shape[-1], dtype=v.dtype, device=q.device)
    lse = torch.empty(b, h, n, dtype=_stat_dtype(q), device=q.device)
    diag_bias = first_bias = None
    if mask is not None and point_bias:
        diag_bias = torch.empty(b, 1, n, dtype=torch.float64, device=q.device)
        first_bias = torch.empty(b, 1, n, dtype=torch.float64, device=q.device)
    # Rows per block: every block builds a (b, rows, kv) mask; the torch fallback also holds
    # (b, h, rows, kv) float32 scores and their exponentials.
    step = _rows_per_block(capture, b * kv_len * (1 if fused_ok else 3 * h), n, q.device)
    if fused_ok and not (capture is not None and capture.chunk_rows):
        # Row blocks of at most FUSED_MASK_ROWS: each block attends only to its key range
        # (causal and sliding-window structure skipped), which a whole-matrix masked call
        # cannot do.
        step = min(step, FUSED_MASK_ROWS)
    for q0 in range(0, n, step):
        q1 = min(n, q0 + step)
        if mask is not None:
            block = _mask_block(mask, q0, q1)
            k0, k1 = (0, kv_len) if step >= n else _key_range(mask, q0, q1, block)
            if point_bias:
                diag_bias[:, :, q0:q1] = _point_bias(block, q0, None)
                first_bias[:, :, q0:q1] = _point_bias(block, q0, 0)
            block, causal_from = block[..., k0:k1], None
        else:
            block = None
            k0, k1 = 0, (min(kv_len, q1) if causal else kv_len)
            causal_from = (q0, k0) if causal else None
        if capture is not None:
            capture._note_block(q1 - q0, k1 - k0)
        qb, kb, vb = q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1]
        if fused_ok:  # here always with a mask block: fused calls never see a shifted causal block
            try:
                o, l = _fused(qb, kb, vb, _as_bias(block, q.dtype), False, scale)
                out[:, :, q0:q1] = o
                lse[:, :, q0:q1] = l
                note(f"fused-{dev}")
                continue
            except RuntimeError as e:
                fused_ok, reason = False, f"fused kernel failed on {dev} ({str(e).splitlines()[0][:160]})"
        pb = None if pbias is None else pbias[:, :, q0:q1, k0:k1]
        o, l = _chunk_attention(qb, kb, vb, block, causal_from, scale, softcap, pb)
        out[:, :, q0:q1] = o
        lse[:, :, q0:q1] = l
        note("chunked", reason)
    return out, lse, diag_bias, first_bias


def sheafscope_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    softcap: float | None = None,
    position_bias: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function (registered as FAST_ATTENTION).

    query (b, h, n, d), key/value (b, h_kv, n_kv, d); returns the attention output (b, n, h, d)
    as sdpa would, and no weights. Inside a DiagonalCapture it also records 1 - A_ii and A_i0.
    """
    for name in ("s_aux", "sinks"):
        if kwargs.get(name) is not None:
            raise SheafscopeError(f"{FAST_ATTENTION} attention does not implement attention sinks ({name}); "
                                  "load the model with attention='eager'")
    capture = _ACTIVE.get()
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    q_len, kv_len = query.shape[2], key.shape[2]
    # sdpa semantics: a mask says everything; without one, is_causal (aligned top-left).
    causal = bool(q_len > 1 and attention_mask is None and causal)
    if causal and kv_len > q_len:
        key, value = key[:, :, :q_len], value[:, :, :q_len]
        position_bias = None if position_bias is None else position_bias[..., :q_len]
        kv_len = q_len
    if capture is None:
        if softcap is None and position_bias is None:
            from transformers.integrations.sdpa_attention import sdpa_attention_forward

            mask = attention_mask.materialize() if isinstance(attention_mask, LazyMask) else attention_mask
            return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scale,
                                          is_causal=causal, **kwargs)
        out, _, _, _ = _attention_with_lse(query, key, value, attention_mask, causal, scale, softcap, position_bias, None)
        return out.transpose(1, 2).contiguous(), None

    if dropout and module.training:
        raise SheafscopeError("attention statistics are measured in eval mode: call model.eval()")
    if q_len != kv_len:
        raise SheafscopeError(f"attention statistics need one full forward pass (queries {q_len} != keys {kv_len}); "
                              "pass use_cache=False")
    b, h, n, _ = query.shape
    small = b * h * n * kv_len <= _exact_limit(capture, query.device)
    out, lse, diag_bias, first_bias = _attention_with_lse(query, key, value, attention_mask, causal, scale, softcap,
                                                          position_bias, capture, point_bias=not small)
    if small:
        # Small problems (short prompts): exact statistics for every row in one float64
        # product, cheaper than the per-row bookkeeping of the lse route.
        off, sink = _exact_stats(query, key, attention_mask, causal, scale, softcap, position_bias, capture)
        bad = torch.isnan(off)  # fully masked rows (padding rows): any finite value, never read
        capture._record(module, off.masked_fill(bad, 1.0), sink.masked_fill(bad, 0.0))
        return out.transpose(1, 2).contiguous(), None
    s_diag, s_first = (t.double() for t in _row_scores(query, key, scale, softcap, capture))
    if position_bias is not None:
        s_diag = s_diag + position_bias.diagonal(dim1=-2, dim2=-1).double()
        s_first = s_first + position_bias[..., :, 0].double()
    if diag_bias is not None:
        s_diag, s_first = s_diag + diag_bias, s_first + first_bias
    lse64 = lse.double()
    # Clamp: rounding can put s_ii a hair above lse where A_ii = 1 (row 0 under a causal mask).
    off = -torch.expm1((s_diag - lse64).clamp(max=0.0))
    sink = torch.exp((s_first - lse64).clamp(max=0.0))
    if attention_mask is None and causal and position_bias is None:
        off[:, :, 0], sink[:, :, 0] = 0.0, 1.0  # row 0 sees key 0 alone: A_00 = 1 exactly
    _refine_rows(query, key, attention_mask, causal, scale, softcap, position_bias, off, sink, capture)
    capture._record(module, off, sink)
    return out.transpose(1, 2).contiguous(), None


def _block_keys(mask, q0: int, q1: int, n: int, kv_len: int, causal: bool, step: int):
    """The mask block of rows q0..q1-1 cut to the keys they can see: (block | None, k0, k1)."""
    if mask is not None:
        block = _mask_block(mask, q0, q1)
        k0, k1 = (0, kv_len) if step >= n else _key_range(mask, q0, q1, block)
        return block[..., k0:k1], k0, k1
    return None, 0, (min(kv_len, q1) if causal else kv_len)


def _exact_from_scores(s, i, k0, block_rows, causal):
    """1 - A_ii and A_i0 from float64 scores s (..., rows, keys k0..) of query rows i (rows,).

    Sums the off-diagonal terms themselves (sum - e_ii would cancel where A_ii is near 1).
    A fully masked row (padding) gives NaN; callers keep the kernel's numbers there.
    """
    cols = torch.arange(k0, k0 + s.shape[-1], device=s.device)
    if block_rows is not None:
        if block_rows.dtype != torch.bool:
            s, block_rows = s + block_rows.double(), block_rows > torch.finfo(block_rows.dtype).min / 2
        s = s.masked_fill(~block_rows, -math.inf)
    elif causal:
        s = s.masked_fill(cols > i[:, None], -math.inf)
    e = torch.exp(s - s.amax(dim=-1, keepdim=True))
    total = e.sum(-1)
    first = e[..., 0] / total if k0 == 0 else torch.zeros_like(total)
    off = e.masked_fill(cols == i[:, None], 0.0).sum(-1) / total
    return off, first


def _exact_dense(q, k, q0, q1, k0, k1, block, causal, scale, softcap, pbias):
    """Exact (float64) statistics of every head and batch row for query rows q0..q1-1."""
    b, h, _, d = q.shape
    n_kv = k.shape[1]
    r = q1 - q0
    s = torch.matmul(_grouped(q[:, :, q0:q1], n_kv).double(),
                     k[:, :, k0:k1].double()[:, :, None].transpose(-1, -2)).reshape(b, h, r, k1 - k0) * scale
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    if pbias is not None:
        s = s + pbias[:, :, q0:q1, k0:k1].double()
    return _exact_from_scores(s, torch.arange(q0, q1, device=q.device), k0, block, causal)


def _exact_sparse(q, k, flagged, q0, k0, k1, block, causal, scale, softcap, pbias, off, sink) -> None:
    """Exact statistics of the flagged rows (flagged: (b, h, rows) for rows q0..) of one block,
    written into off and sink.

    Rows are grouped by the (batch, KV head) whose keys they read; pieces of consecutive groups
    (a group with very many rows is split) are padded to their largest group, so that one
    batched product serves a whole piece. Pieces keep the float64 keys, scores and their
    exponentials within a block's element budget; planning needs two host syncs per block.
    """
    _, h, _, d = q.shape
    n_kv = k.shape[1]
    groups = h // n_kv
    keys = k1 - k0
    hit = flagged.nonzero()  # (F, 3): batch, head, row in block
    pair, order = torch.sort(hit[:, 0] * n_kv + hit[:, 1] // groups, stable=True)
    hit = hit[order]
    uniq, counts = torch.unique_consecutive(pair, return_counts=True)
    # Host plan: (group, first row, end row) segments of at most rows_cap rows, gathered into
    # pieces of at most rows_cap rows and groups_cap groups.
    budget = _block_elements(q.device) // 4
    rows_cap = max(1, budget // keys)
    groups_cap = max(1, budget // (keys * d))
    segments, start = [], 0
    for gi, c in enumerate(counts.tolist()):
        for s0 in range(start, start + c, rows_cap):
            segments.append((gi, s0, min(start + c, s0 + rows_cap)))
        start += c
    pieces, cur = [], []
    for seg in segments:
        if cur and (sum(e - s for _, s, e in cur) + seg[2] - seg[1] > rows_cap or len(cur) >= groups_cap):
            pieces.append(cur)
            cur = []
        cur.append(seg)
    if cur:
        pieces.append(cur)
    pair_of = uniq.tolist()
    for piece in pieces:
        r0, r1 = piece[0][1], piece[-1][2]
        width = max(e - s for _, s, e in piece)
        lens = torch.tensor([e - s for _, s, e in piece], device=q.device)
        gid = torch.repeat_interleave(torch.arange(len(piece), device=q.device), lens, output_size=r1 - r0)
        slot = torch.arange(r1 - r0, device=q.device) - torch.repeat_interleave(torch.cumsum(lens, 0) - lens, lens, output_size=r1 - r0)
        bb, hh, rr = hit[r0:r1].unbind(1)
        i = q0 + rr
        qs = torch.zeros(len(piece), width, d, dtype=torch.float64, device=q.device)
        qs[gid, slot] = q[bb, hh, i].double()
        pairs = torch.tensor([pair_of[g] for g, _, _ in piece], device=q.device)
        ks = k[pairs // n_kv, pairs % n_kv, k0:k1].double()  # (groups, keys, d)
        sc = torch.bmm(qs, ks.transpose(1, 2))[gid, slot] * scale  # (rows, keys)
        if softcap is not None:
            sc = torch.tanh(sc / softcap) * softcap
        if pbias is not None:
            sc = sc + pbias[bb if pbias.shape[0] > 1 else 0, hh if pbias.shape[1] > 1 else 0, i, k0:k1].double()
        rows = None if block is None else block[bb if block.shape[0] > 1 else 0, 0, rr]
        o, f = _exact_from_scores(sc, i, k0, rows, causal)
        off[bb, hh, i], sink[bb, hh, i] = o, f


def _exact_limit(capture: "DiagonalCapture | None", device: torch.device) -> int:
    if capture is not None and capture.exact_below is not None:
        return capture.exact_below
    return DENSE_EXACT_ELEMENTS_CUDA if device.type == "cuda" else DENSE_EXACT_ELEMENTS


def _exact_stats(q, k, mask, causal, scale, softcap, pbias, capture, only=None):
    """Exact (float64-score) 1 - A_ii and A_i0, (b, h, n) each: every row, or with `only`
    (b, h, n) bool the flagged rows (NaN elsewhere), by blocks of query rows; small blocks as
    one dense product, large ones gathering just the flagged rows of each (batch, KV head)."""
    b, h, n, d = q.shape
    kv_len = k.shape[2]
    off = torch.full((b, h, n), math.nan, dtype=torch.float64, device=q.device)
    sink = off.clone()
    step = _rows_per_block(capture, b * kv_len, n, q.device)
    limit = _exact_limit(capture, q.device)
    if only is not None and not (capture is not None and capture.chunk_rows) and limit // (b * h * kv_len) >= 64:
        # Blocks small enough to be dense: on a GPU a float64 product over a whole block
        # costs less than the launches and host syncs of gathering its flagged rows.
        step = min(step, limit // (b * h * kv_len))
    if only is None:
        blocks = range(0, (n + step - 1) // step)
    else:
        blocks = torch.unique(only.any(dim=1).any(dim=0).nonzero()[:, 0] // step).tolist()
    for blk in blocks:
        q0, q1 = blk * step, min(n, blk * step + step)
        block, k0, k1 = _block_keys(mask, q0, q1, n, kv_len, causal, step)
        if capture is not None:
            capture._note_block(q1 - q0, k1 - k0)
        if only is None or b * h * (q1 - q0) * (k1 - k0) <= limit:
            o, f = _exact_dense(q, k, q0, q1, k0, k1, block, causal, scale, softcap, pbias)
            off[:, :, q0:q1], sink[:, :, q0:q1] = o, f
            continue
        _exact_sparse(q, k, only[:, :, q0:q1], q0, k0, k1, block, causal, scale, softcap, pbias, off, sink)
    return off, sink


def _refine_rows(q, k, mask, causal, scale, softcap, pbias, off, sink, capture) -> None:
    """Recompute, exactly (float64 scores), the rows where A_ii > 1 - REFINE_BELOW.

    -expm1(s_ii - lse_i) carries lse_i's absolute rounding (~eps * |lse_i|), which is a large
    relative error once 1 - A_ii is small: a head that attends to itself would get its tiny
    off-diagonal mass from rounding noise. For those rows (a few percent on pretrained models)
    sum_{j != i} exp(s_ij - m_i) / sum_j exp(s_ij - m_i) is computed from the row's scores,
    accurate relative to the value itself. The other rows keep the kernel's lse: with
    A_ii <= 1/2 their relative error is at most about twice eps * |lse|, eager's own.
    """
    flag = off < REFINE_BELOW
    if mask is None and causal and pbias is None:
        flag[:, :, 0] = False  # set exactly by the caller
    if capture.valid is not None:
        flag &= capture.valid.to(flag.device)[:, None, :]
    if not bool(flag.any()):
        return
    o, f = _exact_stats(q, k, mask, causal, scale, softcap, pbias, capture, only=flag)
    done = ~torch.isnan(o)  # flagged rows, and all rows of small dense blocks; not fully masked ones
    off.copy_(torch.where(done, o, off))
    sink.copy_(torch.where(done, f, sink))


# ------------------------------------------------------------------------------------------------
# Residual-stream maxima without keeping hidden states
# ------------------------------------------------------------------------------------------------
class HiddenMax:
    """max |h| over the valid tokens of each batch element, for every residual stream a model
    returns as hidden_states, without keeping a (layers x batch x n x d) stack.

    Streams 0..L-1 (the input of block 0, the outputs of blocks 0..L-2) come from forward hooks
    on the blocks; stream L is the trunk's last_hidden_state (after the final norm, as
    transformers reports it), which the caller passes to `final` after running the trunk
    (`model.base_model`).
    """

    def __init__(self, blocks: list[nn.Module], valid: torch.Tensor | None = None):
        self.blocks, self.valid = blocks, valid
        self.values: list[torch.Tensor | None] = [None] * (len(blocks) + 1)
        self._handles: list[Any] = []

    def _reduce(self, h: torch.Tensor) -> torch.Tensor:
        per_token = h.detach().abs().amax(dim=-1)  # (b, n); amax propagates NaN
        if self.valid is not None:
            per_token = torch.where(self.valid.to(per_token.device), per_token, torch.zeros((), dtype=per_token.dtype, device=per_token.device))
        return per_token.amax(dim=-1).double()

    def __enter__(self) -> "HiddenMax":
        def first_input(module, args, kwargs):
            self.values[0] = self._reduce(args[0] if args else kwargs["hidden_states"])

        def output_of(index):
            def hook(module, args, output):
                self.values[index] = self._reduce(output[0] if isinstance(output, (tuple, list)) else output)
            return hook

        self._handles.append(self.blocks[0].register_forward_pre_hook(first_input, with_kwargs=True))
        for i, block in enumerate(self.blocks[:-1]):
            self._handles.append(block.register_forward_hook(output_of(i + 1)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def final(self, last_hidden_state: torch.Tensor) -> None:
        """Record the last stream from the trunk's output."""
        self.values[-1] = self._reduce(last_hidden_state)

    def result(self) -> torch.Tensor:
        """(b, layers + 1) float64 on the CPU."""
        missing = [i for i, v in enumerate(self.values) if v is None]
        if missing:
            raise SheafscopeError(f"no max |h| for hidden-state streams {missing} (hooks did not fire, or final() not called)")
        return torch.stack(self.values, dim=1).cpu()


# ------------------------------------------------------------------------------------------------
# Registration
# ------------------------------------------------------------------------------------------------
def register() -> str:
    """Register the attention and mask functions with transformers (idempotent); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(FAST_ATTENTION, sheafscope_attention)
    AttentionMaskInterface.register(FAST_ATTENTION, lazy_sdpa_mask)
    return FAST_ATTENTION


register()


# ------------------------------------------------------------------------------------------------
# One batch of prompts
# ------------------------------------------------------------------------------------------------
def is_fast(model: nn.Module) -> bool:
    """Whether `model` was loaded with the fast attention implementation."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None) == FAST_ATTENTION


@dataclass
class BatchStats:
    """What ran during fast captures: kernel counts, fallback reasons, largest block."""

    kernels: Counter = field(default_factory=Counter)
    fallbacks: list[str] = field(default_factory=list)

    def add(self, cap: DiagonalCapture) -> None:
        self.kernels.update(cap.kernels)
        self.fallbacks.extend(f for f in cap.fallbacks if f not in self.fallbacks)


@torch.no_grad()
def capture_batch(model: nn.Module, blocks: list[nn.Module], prompts: list[torch.Tensor],
                  stats: BatchStats | None = None, pad_id: int = 0, **capture_options: Any):
    """Run prompts (each (1, n_i) token ids on the model's device) as one right-padded batch
    through the trunk (`model.base_model`: no LM head, which nothing here needs) and return
    one PromptCapture per prompt, equal to running it alone: sums run over its own rows only,
    and right padding never changes what a valid row attends to (padding keys are masked;
    positions still count from 0). Raises NonFiniteError on NaN/Inf in a prompt's numbers.
    capture_options go to DiagonalCapture (kernel, chunk_rows).
    """
    from sheafscope.capture_eager import PromptCapture, check_finite

    lengths = [int(p.shape[1]) for p in prompts]
    n, b = max(lengths), len(prompts)
    device = prompts[0].device
    input_ids = torch.full((b, n), pad_id, dtype=prompts[0].dtype, device=device)
    valid = torch.zeros(b, n, dtype=torch.bool, device=device)
    for j, p in enumerate(prompts):
        input_ids[j, : lengths[j]] = p[0]
        valid[j, : lengths[j]] = True
    # No mask when nothing is padded: exactly the call a single prompt gets (and sdpa's is_causal).
    attention_mask = None if min(lengths) == n else valid.long()
    trunk = getattr(model, "base_model", model)
    with DiagonalCapture(model, valid=valid, keep_positions=False, **capture_options) as cap, HiddenMax(blocks, valid) as hm:
        out = trunk(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hm.final(out[0])
    if stats is not None:
        stats.add(cap)
    off, sink = cap.masses(lengths)
    hidden = hm.result()
    dtype = next(model.parameters()).dtype
    for layer in range(off.shape[1]):
        check_finite(f"the attention of layer {layer}", off[:, layer], dtype)
        check_finite(f"the attention of layer {layer}", sink[:, layer], dtype)
    for layer in range(hidden.shape[1]):
        check_finite(f"the hidden state after layer {layer - 1}" if layer else "the embeddings", hidden[:, layer], dtype)
    return [
        PromptCapture(n_tokens=lengths[j], offdiag_mass=off[j].numpy(), first_token_mass=sink[j].numpy(),
                      max_abs_hidden=hidden[j].numpy())
        for j in range(b)
    ]
