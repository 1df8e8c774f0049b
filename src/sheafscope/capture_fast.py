"""The fast path: attention diagonals captured inside the model's own forward pass.

For query row i of head h, with s_ij the pre-softmax scores exactly as the model's softmax sees
them (scaled, soft-capped, position-biased, masked) and lse_i = log sum_j exp(s_ij):

    1 - A_h[i,i] = -expm1(s_ii - lse_i),        A_h[i,0] = exp(s_i0 - lse_i).

So the statistics need s_ii and s_i0 (row-wise dot products, O(n d)) and lse_i, which the fused
attention kernels return next to their output for free ("the lse route"). No n x n matrix is
ever built:

  - CPU: torch's flash kernel for CPU (`_scaled_dot_product_flash_attention_for_cpu`, the one
    `scaled_dot_product_attention` runs) returns (output, lse) in one pass;
  - CUDA: flash (`_scaled_dot_product_flash_attention`) for unmasked half-precision calls of
    up to FLASH_MAX_ROWS rows; else cuDNN (`_scaled_dot_product_cudnn_attention`) where sdpa
    would pick it for a plain forward, else flash (half precision, no mask) or memory-efficient
    attention (`_scaled_dot_product_efficient_attention`, any mask as an additive bias), each
    with its log-sum-exp (`_cuda_kernel`);
  - anywhere else, and for what no kernel does (logit soft-capping, a position bias): a chunked
    torch computation over blocks of query rows, memory O(rows x n).

Precision. lse_i carries an absolute rounding of about eps * |lse_i|, so 1 - A_ii from it has
a relative error of eps * |lse_i| / (1 - A_ii): fine where A_ii <= 1/2 (eager's own float error
is eps * |s|), noise where a head attends to itself and 1 - A_ii is tiny. Rows with A_ii > 1/2
(a few percent on pretrained models) are therefore recomputed exactly from their scores.
On a GPU, half-precision calls of up to FUSED_ROWS_MAX_ROWS rows skip the lse route
altogether ("the fused route"): their output is the plain sdpa call, and one Triton kernel over
the held layers (fused_rows.py, reading them where they lie) computes every row's 1 - A_ii
and A_i0 exactly, with its own off-diagonal accumulator (up to FUSED_SUMS_MAX_ROWS rows, where
only sums over valid rows are kept, it also sums them). Nothing is flagged there, so nothing is
refined and nothing waits.
Elsewhere, small problems (short prompts, a batch of them) skip the lse route and get exact statistics
for every row from one dense product (`DENSE_EXACT_ELEMENTS`). Those scores are float64,
except for half-precision models on a GPU, where they are float32 sums of the exact products
of the half-precision inputs (a relative error of ~d * eps32 on 1 - A_ii, however small).
The arithmetic of all three is in diag_stats.py.

Each attention call only holds its queries, keys and lse; the statistics of the held layers
are computed together (stacked along the batch, or read in place by the fused kernel) at the
end of the forward pass, or whenever the held tensors exceed a byte budget, so that a short
forward pass on a GPU pays a few dozen kernel launches for them rather than a few dozen per
layer. Nothing makes the host wait for the
device mid-forward: on a GPU the first REFINE_SLOTS_CUDA flagged rows of each head are
recomputed in fixed shapes right behind the statistics, and the flags of any further rows of a
group processed mid-forward reach the host asynchronously.

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

import dataclasses
import math
import weakref
from collections import Counter
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from sheafscope.capture_eager import PromptCapture, check_finite
from sheafscope.diag_stats import (
    allowed,
    block_elements,
    dense_rows,
    exact_rows,
    grouped,
    lse_rows,
    rows_per_block,
    slot_rows,
    stat_dtype,
    to_device,
)
from sheafscope import fused_rows as fr
from sheafscope import tail_graphs
from sheafscope.errors import SheafscopeError

FAST_ATTENTION = "sheafscope"

# A LazyMask no larger than this (batch x q x kv booleans) is materialised once and reused by
# every layer: cheaper than rebuilding small masks 30 times per forward.
SMALL_MASK_ELEMENTS = 1 << 22
# Rows per fused call when a mask is given (see _attention_with_lse).
FUSED_MASK_ROWS = 2048
# Unmasked half-precision calls of up to this many query rows take their lse from flash
# attention rather than cuDNN (H100, Mistral-7B heads: flash is the faster kernel up to 512
# rows and costs the host less per call; cuDNN from 1,024: benchmarks/attention_kernels.py).
FLASH_MAX_ROWS = 512
# A block of query rows this small (batch x heads x rows x keys) gets exact statistics
# for all its rows in one dense product: short prompts never take the lse route at all.
DENSE_EXACT_ELEMENTS = 1 << 18
# On a GPU: a batch of 32 prompts of up to 45 tokens of a 7B model (32 x 32 heads x 45 x 45)
# stays dense; one prompt of 512 tokens takes the lse route (float64 products of 8M scores per
# layer would cost about as much GPU time as the layer itself).
DENSE_EXACT_ELEMENTS_CUDA = 1 << 21
# Half-precision calls on a GPU of up to this many query rows get exact statistics for every
# row from one fused Triton kernel (fused_rows.py) over the held layers, and their output
# from the very sdpa call a plain forward makes: no lse, nothing flagged, nothing refined,
# no wait. Its cost grows as n^2 (the score product again, without P @ V); above this the
# lse route's O(n) statistics are cheaper.
FUSED_ROWS_MAX_ROWS = 2048
# Up to this many query rows, and where only sums over valid rows are kept, the fused kernel
# sums each head's rows itself (one program walks a head's row tiles in order): no rows
# tensor, and no where + sum after it, which a host-bound forward pass pays ~0.15 ms of host
# time for on a GPU (host_phases.py, finish.record). Longer sequences are bound by the device,
# where one program per row tile and the torch sum are the faster pair.
FUSED_SUMS_MAX_ROWS = 512
# Queries, keys and lse of up to this many bytes are held and their layers' statistics
# computed together (DiagonalCapture.hold_bytes): on a GPU a short forward pass is bound by
# kernel launches, and a few dozen per layer would cost more than the statistics' arithmetic.
HOLD_BYTES = 1 << 28
HOLD_BYTES_CUDA = 1 << 30
# On a GPU the first this many flagged rows of every head are recomputed in fixed shapes
# (diag_stats.slot_rows), queued behind the forward pass with no host planning and no wait;
# only the rows beyond them go through the planned recomputation. On the CPU every flagged
# row is planned (computing unflagged slots would cost more than planning).
REFINE_SLOTS_CUDA = 8

# Per-shape constants shared by forward passes: the dense route's causal bias (kept up to
# CAUSAL_BIAS_CACHE_BYTES in all) and the row weights of an unpadded batch.
CAUSAL_BIAS_CACHE_BYTES = 1 << 26
_CAUSAL_BIAS: dict[tuple, torch.Tensor] = {}
_UNPADDED_WEIGHTS: dict[tuple, torch.Tensor] = {}

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

    def __init__(self, recipe: dict[str, Any], causal_but_padding: bool = False):
        self.recipe = recipe
        # transformers' own verdict: without padding this mask would be plain causal attention
        # (sdpa's is_causal). Every row a right-padded batch counts then sees exactly the
        # causal keys (its keys are all valid), which DiagonalCapture.prefix_rows uses.
        self.causal_but_padding = causal_but_padding
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

    @property
    def small(self) -> bool:
        """Whether the whole mask is materialised once (SMALL_MASK_ELEMENTS) and read whole."""
        return self.batch_size * self.q_length * self.kv_length <= SMALL_MASK_ELEMENTS

    def rows(self, q0: int, q1: int) -> torch.Tensor:
        """Mask rows q0..q1-1: bool (batch, 1, q1 - q0, kv_length)."""
        if self._full is None and self.small:
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
    causal_but_padding = _causal_but_padding(recipe)
    recipe.pop("allow_is_causal_skip", None)
    recipe.pop("allow_is_bidirectional_skip", None)
    return LazyMask(recipe, causal_but_padding)


def _causal_but_padding(recipe: dict[str, Any]) -> bool:
    """Whether transformers would replace this mask by sdpa's is_causal were nothing padded:
    its mask builder allowed the causal skip (a causal mask with no overlay, packing or
    bidirectional part) and `_ignore_causal_mask_sdpa` accepts the shape with no padding (no
    sliding window or chunk shorter than the keys, no cache offset, queries = keys)."""
    if recipe.get("allow_is_causal_skip") is not True or recipe["q_length"] != recipe["kv_length"]:
        return False
    if any(not isinstance(o, int) or o != 0 for o in (recipe.get("q_offset", 0), recipe.get("kv_offset", 0))):
        return False  # a cache offset (a tensor for static caches: reading it would wait on the device)
    try:
        from transformers.masking_utils import _ignore_causal_mask_sdpa
    except ImportError:  # private helper moved: keep the mask (correct, a little slower)
        return False
    return bool(_ignore_causal_mask_sdpa(None, recipe["q_length"], recipe["kv_length"], 0, 0, recipe.get("local_size")))


def _mask_block(mask: Any, q0: int, q1: int) -> torch.Tensor:
    """Rows q0..q1-1 of a mask the attention function was given: bool (True = attend) or an
    additive float tensor, shape (batch | 1, 1, rows, kv)."""
    if isinstance(mask, LazyMask):
        return mask.rows(q0, q1)
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise SheafscopeError(f"{FAST_ATTENTION} attention expects a (batch, 1, q, kv) mask, got shape {tuple(mask.shape)}")
    return mask[:, :, q0:q1]


def _key_range(mask: Any, q0: int, q1: int, block: torch.Tensor) -> tuple[int, int]:
    if isinstance(mask, LazyMask):
        return mask.key_range(q0, q1, block)
    idx = allowed(block).any(dim=2).any(dim=1).any(dim=0).nonzero()
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
@dataclass(eq=False, slots=True)  # not frozen: a frozen dataclass's __init__ costs several times more, per layer
class _Softmax:
    """What besides queries and keys shapes one attention call's softmax rows, as the
    statistics need it."""

    mask: Any
    causal: bool
    scale: float
    softcap: float | None
    pbias: torch.Tensor | None
    step: int  # rows per block of the masked steps (the blocks whose key ranges a LazyMask caches)
    first_row_alone: bool  # row 0 sees only key 0 (causal attention)

    def key(self) -> tuple:
        """Equal for the layers of one forward pass that share a mask object and a recipe."""
        return (id(self.mask), self.causal, self.scale, self.softcap, id(self.pbias), self.step, self.first_row_alone)


@dataclass(eq=False, slots=True)
class _Plan:
    """What one forward pass's first call of a kind decided on an exact route without soft-capping
    or position bias, reused by the calls like it (sheafscope_attention's plan key): the route,
    the statistics' softmax, sdpa's mask, is_causal and scale, the kernel counters to bump. The
    calls it serves are held here (their layers, queries and keys) until the capture processes
    them, as one group: on a host-bound GPU forward pass, Python per layer is what b pays over a,
    so a planned call costs a dict lookup and three appends."""

    route: str
    softmax: _Softmax
    sdpa_mask: Any  # the mask the sdpa call gets (a LazyMask materialised once)
    causal: bool
    scale: float
    counted: tuple[str, ...]
    nbytes: int  # bytes held per call: its queries and keys
    keyed_mask: Any  # the mask object whose id keys the plan, kept so that its id is not reused
    # sdpa's enable_gqa for the calls the plan serves, which then call sdpa themselves (what
    # transformers' sdpa function would decide for them: `_direct_gqa`), or None: through it
    gqa: bool | None = None
    calls: int = 0  # calls served; their counters join DiagonalCapture.kernels when the capture finishes
    layers: list[int] = field(default_factory=list)  # held calls, not yet processed
    qs: list[torch.Tensor] = field(default_factory=list)
    ks: list[torch.Tensor] = field(default_factory=list)


@dataclass(eq=False, slots=True)
class _LayerInputs:
    """What one unplanned attention call (the lse route, soft-capping, a position bias) leaves
    for the statistics: its queries, keys and (lse route) the kernel's lse and the mask's values
    at each row's diagonal and first key. Held until a group of layers is processed together
    (`DiagonalCapture._process_held`)."""

    layer: int
    q: torch.Tensor
    k: torch.Tensor
    lse: torch.Tensor | None  # the lse route's; None on the exact routes
    points: torch.Tensor | None
    softmax: _Softmax
    route: str  # "lse", "dense" (diag_stats.dense_rows) or "fused" (fused_rows.fused_rows)

    def group_key(self) -> tuple:
        """Layers with equal keys share one computation: same route, shapes and softmax."""
        return (self.route, tuple(self.q.shape), tuple(self.k.shape), self.q.dtype, *self.softmax.key())


@dataclass(eq=False, slots=True)
class _Group:
    """Layers whose statistics are computed together: one route, one softmax, queries and keys
    of one shape (and the lse route's lse and mask points)."""

    route: str
    softmax: _Softmax
    layers: list[int]
    qs: list[torch.Tensor]
    ks: list[torch.Tensor]
    lses: list[torch.Tensor] | None = None
    points: torch.Tensor | None = None


@dataclass(eq=False)
class _Refinement:
    """A group's flagged rows, waiting for their exact 1 - A_ii: found on the device at the end
    of the forward pass (`hits`), or, for a group processed mid-forward on a GPU, as flags that
    travel to the host asynchronously (pinned memory) and are read once later work is queued.
    `target` is the group's record, (L * b, h, n, 2) rows or (L * b, h, 2) sums, whose entries
    the exact rows replace or add to."""

    q: torch.Tensor  # (L * b, h, n, d): the group's layers stacked along the batch
    k: torch.Tensor
    softmax: _Softmax  # its pbias tiled to L * b like q
    target: torch.Tensor
    hits: np.ndarray | None  # (F, 3) flagged valid rows, where already known
    flags: torch.Tensor | None = None  # else (L * b, h, n) bool on the host, copied asynchronously
    ready: Any = None  # torch.cuda.Event once that copy is done


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
    `exact_below`: problems (batch x heads x rows x keys) up to this size get exact
    statistics from one dense product (diag_stats.dense_rows) instead of the lse route (0: always the lse route;
    None: DENSE_EXACT_ELEMENTS, or DENSE_EXACT_ELEMENTS_CUDA on a GPU). `hold_bytes`: queries
    and keys of up to this many bytes are held and the statistics of all held layers computed
    together, in a few operations instead of a few dozen per layer (None: HOLD_BYTES or
    HOLD_BYTES_CUDA; 0: every layer on its own). `fused_rows`: exact statistics for every row
    from one Triton kernel (fused_rows.py) where that serves (None: half precision on a GPU, up
    to FUSED_ROWS_MAX_ROWS rows; False: never; True: wherever the kernel can run, any length,
    the CPU included under TRITON_INTERPRET=1, for tests). `defer`: recompute a group's flagged rows only
    once later work is queued (None: on a GPU). `refine_slots`: the first this many flagged
    rows of each head are recomputed in fixed shapes on the device, without waiting for it
    (None: REFINE_SLOTS_CUDA on a GPU, 0 on the CPU). `prefix_rows`: the caller promises that
    the model gets a right-padded batch whose attention mask is `valid` (launch_batch's), so
    that each element's valid rows are a prefix; where transformers says the mask would be
    plain causal attention but for the padding (LazyMask.causal_but_padding), the exact routes
    then compute the statistics with causal attention and no mask, which every counted row sees
    exactly (its keys are all valid); the padded rows, which differ, are never counted. Needs
    `valid` and keep_positions=False. Rows of a padded batch that see no key at all
    hold NaN in `off` and `sink`; sums never include them.
    """

    model: nn.Module
    valid: torch.Tensor | None = None
    keep_positions: bool = True
    kernel: str = "auto"
    chunk_rows: int | None = None
    exact_below: int | None = None
    defer: bool | None = None
    hold_bytes: int | None = None
    refine_slots: int | None = None
    fused_rows: bool | None = None
    prefix_rows: bool = False
    layer_of: dict[int, int] = field(default_factory=dict)
    kernels: Counter = field(default_factory=Counter)  # which computation ran, per attention call
    fallbacks: list[str] = field(default_factory=list)  # why a fused kernel was not used
    max_block: tuple[int, int] = (0, 0)  # largest (rows, key columns) block any chunked step built
    _refined: list[Any] = field(default_factory=list)  # counts (ints, or device scalars not yet read)
    _pending: list[_Refinement] = field(default_factory=list)
    _held: list[_LayerInputs] = field(default_factory=list)
    _held_bytes: int = 0
    _hold_budget: int | None = None  # hold_bytes, or the device's default (set by the first layer)
    _valid_device: dict[torch.device, torch.Tensor] = field(default_factory=dict)
    _cache: dict[Any, Any] = field(default_factory=dict)  # per forward: weights, dense mask biases
    _choices: dict[Any, str] = field(default_factory=dict)  # per forward: fused kernel per call shape
    _plans: dict[tuple, "_Plan"] = field(default_factory=dict)  # per forward: exact-route calls' decisions
    # (layers, record, b) per group of layers computed together: layer layers[i]'s record is
    # record[i * b:(i + 1) * b]
    _groups: list[tuple[list[int], torch.Tensor, int]] = field(default_factory=list)
    _seen: set[int] = field(default_factory=set)  # layers computed in this forward pass
    _numbered: int = 0  # modules numbered in call order (no adapter, no layer_idx)
    _token: Any = None

    def __post_init__(self) -> None:
        if self.kernel not in ("auto", "chunked"):
            raise ValueError(f"kernel must be 'auto' or 'chunked', not {self.kernel!r}")
        if self.prefix_rows and (self.keep_positions or self.valid is None):
            raise ValueError("prefix_rows needs valid rows (valid=...) and keep_positions=False: padded rows are "
                             "computed without the padding mask and must never be kept")
        if not self.layer_of:
            self.layer_of = attention_layer_indices(self.model)

    def __enter__(self) -> "DiagonalCapture":
        impl = getattr(getattr(self.model, "config", None), "_attn_implementation", None)
        if impl != FAST_ATTENTION:
            raise SheafscopeError(
                f"DiagonalCapture needs a model loaded with attn_implementation={FAST_ATTENTION!r} (got {impl!r})"
            )
        self._pending.clear()
        self._held.clear()
        self._held_bytes = 0
        self._hold_budget = None
        self._cache.clear()
        self._choices = {}
        self._plans = {}
        self._groups = []
        self._seen = set()
        self._refined = []
        self._valid_device = {}
        self._token = _ACTIVE.set(self)
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        _ACTIVE.reset(self._token)
        self._token = None
        if exc_type is None:
            self._finish()
        self._held.clear()
        self._pending.clear()
        self._cache.clear()
        self._plans = {}

    # -- results ------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return sum(len(layers) for layers, _, _ in self._groups)

    @property
    def records(self) -> dict[int, torch.Tensor]:
        """layer -> its rows (b, h, n, 2), or its sums over valid rows (b, h, 2): views of the
        records of the groups its layers were computed in (made on demand: a slice per layer
        per forward pass is host time a short forward pass on a GPU notices)."""
        views = {layer: t[i * b:(i + 1) * b] for layers, t, b in self._groups for i, layer in enumerate(layers)}
        return dict(sorted(views.items()))

    @property
    def refined_rows(self) -> int:
        """Rows whose 1 - A_ii was recomputed exactly (reading it waits for the device)."""
        self._refined = [sum(int(c) for c in self._refined)]
        return self._refined[0]

    def _finish(self) -> None:
        """Statistics of every layer still held, and every pending exact recomputation; the
        planned calls' kernel counters."""
        if not (self._held or self._pending or self._plans):
            return
        self._process_held(final=True)
        self._flush(keep=0)
        for plan in self._plans.values():
            self._count_calls(plan)

    def _count_calls(self, plan: "_Plan") -> None:
        """Add the calls a plan served to its kernel counters, once."""
        for name in plan.counted:
            self.kernels[name] += plan.calls
        plan.calls = 0

    def sole_summed_plan(self) -> "_Plan | None":
        """The plan that served every attention call of this forward pass, where its
        statistics are one launch of the fused sums kernel over unmasked layers 0..L-1 and
        nothing else is held, grouped or waiting (tail_graphs replays that launch); else None."""
        if (len(self._plans) != 1 or self._held or self._pending or self._groups or self.keep_positions
                or self.valid is not None or fr.disabled is not None):
            return None
        plan = next(iter(self._plans.values()))
        if (plan.route != "fused" or plan.softmax.mask is not None or not plan.qs
                or plan.qs[0].shape[2] > FUSED_SUMS_MAX_ROWS or plan.layers != list(range(len(plan.layers)))):
            return None
        return plan

    def take_plan(self, plan: "_Plan") -> None:
        """Count a sole summed plan's calls as _finish would and drop its held layers, whose
        statistics were queued elsewhere (a replayed tail graph): the capture then records
        none of them."""
        self._count_calls(plan)
        self._seen.update(plan.layers)
        plan.layers, plan.qs, plan.ks = [], [], []
        self._held_bytes = 0

    def _column(self, c: int) -> list[torch.Tensor]:
        self._finish()
        return [r[..., c] for r in self.records.values()]

    @property
    def off(self) -> list[torch.Tensor]:
        return self._column(0)

    @property
    def sink(self) -> list[torch.Tensor]:
        return self._column(1)

    def masses(self, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per batch element: offdiag mass (b, layers, heads) = sum over its valid rows of
        1 - A_ii, and first-token mass (b, layers, heads) = mean over its rows 1..n-1 of A_i0."""
        off, sink = masses_from_sums(self.mass_sums(lengths).cpu().numpy(), lengths)
        return torch.from_numpy(off), torch.from_numpy(sink)

    def mass_sums(self, lengths: list[int]) -> torch.Tensor:
        """(b, layers, heads, 2) float64 on the device: per batch element and head, the sums
        over its valid rows of 1 - A_ii and (rows 1..n-1) of A_i0 (`masses_from_sums` turns
        them, on the host, into masses)."""
        self._finish()
        layers = sorted(layer for group, _, _ in self._groups for layer in group)
        if layers != list(range(len(layers))):
            raise SheafscopeError(f"attention statistics were recorded for layers {layers}, not 0..{len(layers) - 1}")
        if len(self._groups) == 1 and self._groups[0][0] == layers:  # one group, all layers in order
            target = self._groups[0][1]
            sums = target.view(len(layers), -1, *target.shape[1:]).transpose(0, 1)
        else:
            sums = torch.stack(list(self.records.values()), dim=1)
        if self.keep_positions:
            n = sums.shape[-2]
            valid = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]
            sums = torch.where(self._weights(valid, sums.device)[:, None], sums, 0.0).sum(-2)
        return sums

    def refined_on_device(self) -> tuple[int, torch.Tensor | None]:
        """Rows recomputed exactly so far: the count known on the host, and a device scalar
        with the rest (None if none), so that reading it can wait until the device is done."""
        known = sum(c for c in self._refined if isinstance(c, int))
        pending = [c for c in self._refined if isinstance(c, torch.Tensor)]
        return known, (torch.stack(pending).sum() if pending else None)

    # -- called by the attention function -----------------------------------------------------------
    def _layer(self, module: nn.Module) -> int:
        idx = self.layer_of.get(id(module))
        if idx is None:
            idx = getattr(module, "layer_idx", None)
            if idx is None:  # a family without layer indices: number the modules in the order they run
                idx = self._numbered
                self._numbered += 1
            idx = self.layer_of[id(module)] = int(idx)
        return idx

    def _note_block(self, rows: int, cols: int) -> None:
        if rows * cols > self.max_block[0] * self.max_block[1]:
            self.max_block = (rows, cols)

    def _weights(self, valid: torch.Tensor | None, device: torch.device, n: int | None = None) -> torch.Tensor:
        """(b | 1, 1, n, 2) bool: which rows count in the off-diagonal sum (valid ones) and in
        the first-token sum (valid ones after the first)."""
        if valid is None:  # the same for every forward pass of this length: made once
            key = (n, device)
            if key not in _UNPADDED_WEIGHTS:
                if len(_UNPADDED_WEIGHTS) > 256:
                    _UNPADDED_WEIGHTS.clear()
                w = torch.ones(1, 1, n, 2, dtype=torch.bool, device=device)
                w[:, :, 0, 1] = False
                _UNPADDED_WEIGHTS[key] = w
            return _UNPADDED_WEIGHTS[key]
        w = torch.stack((valid, valid), dim=-1)[:, None]
        w[:, :, 0, 1] = False
        return w.to(device)

    def _hold(self, module: nn.Module, q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor | None,
              points: torch.Tensor | None, softmax: _Softmax, route: str) -> None:
        """Keep one unplanned attention call's inputs to the statistics; process the held
        layers once they exceed the byte budget."""
        self._held.append(_LayerInputs(self._layer(module), q, k, lse, points, softmax, route))
        self._held_bytes += q.nbytes + k.nbytes + (0 if lse is None else lse.nbytes)
        self._check_budget(q)

    def _hold_planned(self, plan: _Plan, module: nn.Module, q: torch.Tensor, k: torch.Tensor) -> None:
        """Keep a planned call's queries and keys with its plan. On a GPU this is what keeps a
        short forward pass as cheap as a plain one: the per-layer cost is a few appends, not
        kernel launches."""
        plan.layers.append(self._layer(module))
        plan.qs.append(q)
        plan.ks.append(k)
        plan.calls += 1
        self._held_bytes += plan.nbytes
        self._check_budget(q)

    def _check_budget(self, q: torch.Tensor) -> None:
        """Process the held layers once they exceed the byte budget (set by the first layer)."""
        if self._hold_budget is None:
            self._hold_budget = self.hold_bytes if self.hold_bytes is not None else (
                HOLD_BYTES_CUDA if q.is_cuda else HOLD_BYTES)
        if self._held_bytes > self._hold_budget:
            self._process_held()

    def _valid_on(self, device: torch.device) -> torch.Tensor | None:
        """`valid` on `device`, copied once per capture (before the forward pass queues work:
        a copy from pageable host memory in mid-forward would wait for the device)."""
        if self.valid is None:
            return None
        if device not in self._valid_device:
            self._valid_device[device] = self.valid if self.valid.device == device else self.valid.to(device)
        return self._valid_device[device]

    def _process_held(self, final: bool = False) -> None:
        groups = []
        for p in self._plans.values():
            if p.layers:
                groups.append(_Group(p.route, p.softmax, p.layers, p.qs, p.ks))
                p.layers, p.qs, p.ks = [], [], []
        unplanned: dict[tuple, list[_LayerInputs]] = {}
        for item in self._held:
            unplanned.setdefault(item.group_key(), []).append(item)
        for items in unplanned.values():
            first = items[0]
            groups.append(_Group(first.route, first.softmax, [i.layer for i in items], [i.q for i in items],
                                 [i.k for i in items], None if first.lse is None else [i.lse for i in items],
                                 first.points))
        self._held = []
        self._held_bytes = 0
        for group in groups:
            layers = group.layers
            if len(set(layers)) < len(layers) or not self._seen.isdisjoint(layers):
                raise SheafscopeError("a layer ran twice inside one DiagonalCapture; use one capture per forward pass")
            self._seen.update(layers)
        for group in groups:
            self._process_group(group, final)

    def _process_group(self, group: _Group, final: bool = False) -> None:
        """Statistics of a group of layers: one fused kernel launch, or, stacked along the
        batch, one dense or lse-route computation; one record tensor, one refinement job.
        `final`: nothing more will be queued, so the flagged rows are found on the device and
        fetched at once; otherwise the flags travel to the host asynchronously and are read a
        group later."""
        q0, k0, count, layers = group.qs[0], group.ks[0], len(group.qs), group.layers
        b, n, kv_len = q0.shape[0], q0.shape[2], k0.shape[2]
        defer = q0.is_cuda if self.defer is None else self.defer
        summed = group.route == "fused" and not self.keep_positions and n <= FUSED_SUMS_MAX_ROWS
        rows = self._fused_stats(group, summed) if group.route == "fused" else None
        if rows is not None:  # read from the layers where they lie: nothing stacked, nothing flagged
            if summed:  # the kernel's own sums over the rows that count (valid, or all)
                self._groups.append((list(layers), rows, b))
            else:
                self._record_group(layers, b, rows)
            self._flush(keep=1 if defer else 0)
            return
        q = q0 if count == 1 else _stacked(group.qs)
        k = k0 if count == 1 else _stacked(group.ks)
        sm = dataclasses.replace(group.softmax, pbias=_tile(group.softmax.pbias, count))
        if group.route in ("fused", "dense"):
            bias = _tile(_dense_bias(self, sm.mask, sm.causal, n, kv_len, q.device), count)
            rows, flags = dense_rows(q, k, bias, sm.scale, sm.softcap, sm.pbias), None
        else:
            lse = group.lses[0] if count == 1 else torch.cat(group.lses)
            rows, flags = lse_rows(q, k, lse, _tile(group.points, count), sm.scale, sm.softcap, sm.pbias,
                                   self.chunk_rows, first_row_alone=sm.first_row_alone)
        target = self._record_group(layers, b, rows)
        if flags is not None:
            valid = self._valid_on(flags.device)
            if valid is not None:
                flags = (flags.view(count, b, *flags.shape[1:]) & valid[None, :, None, :]).view(flags.shape)
            flags = self._refine_slots(q, k, flags, sm, target, b)
            job = _Refinement(q=q, k=k, softmax=sm, target=target, hits=None)
            if final or not flags.is_cuda:
                job.hits = flags.nonzero().cpu().numpy()
            else:
                job.flags = torch.empty(flags.shape, dtype=torch.bool, pin_memory=True)
                job.flags.copy_(flags, non_blocking=True)
                job.ready = torch.cuda.Event()
                job.ready.record()
            self._pending.append(job)
        self._flush(keep=1 if defer else 0)

    def _fused_stats(self, group: _Group, sums: bool = False) -> torch.Tensor | None:
        """The fused kernel's rows (L * b, h, n, 2) of a group of layers, read where they lie
        (fused_rows.fused_stats), or with `sums` their sums (L * b, h, 2) over the valid rows,
        or None where the kernel failed (a GPU or Triton install it
        does not compile for): the reason goes to `fallbacks`, the kernel is off for the rest of
        the process, and the caller computes these layers with the dense route instead."""
        sm, q = group.softmax, group.qs[0]
        mask = None if sm.mask is None else allowed(_mask_block(sm.mask, 0, q.shape[2]))
        try:
            valid = self._valid_on(q.device) if sums else None
            return fr.fused_stats(group.qs, group.ks, mask, sm.causal, sm.scale, sums=sums, valid=valid)
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # Triton's compile and launch errors have no common base
            fr.disabled = f"fused-rows kernel failed ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})"
            if fr.disabled not in self.fallbacks:
                self.fallbacks.append(fr.disabled)
            return None

    def _record_group(self, layers: list[int], b: int, rows: torch.Tensor) -> torch.Tensor:
        """Keep a group's rows (L * b, h, n, 2), or their sums over valid rows; each layer's
        record is a view of the returned tensor."""
        count = len(layers)
        if self.keep_positions:
            target = rows
        else:
            key = ("weights", b, rows.shape[2])
            if key not in self._cache:
                self._cache[key] = self._weights(self._valid_on(rows.device), rows.device, rows.shape[2])
            # where(), not a product: a NaN in a padded row must not poison the sum (check_finite
            # then reports only what valid rows produced).
            per_layer = rows.view(count, b, *rows.shape[1:])
            target = torch.where(self._cache[key], per_layer, 0.0).sum(-2).view(count * b, *rows.shape[1:2], 2)
        self._groups.append((list(layers), target, b))
        return target

    def _refine_slots(self, q: torch.Tensor, k: torch.Tensor, flags: torch.Tensor, sm: _Softmax,
                      target: torch.Tensor, b: int) -> torch.Tensor:
        """Exact rows for the first `refine_slots` flagged rows of every head, computed and
        written into `target` in fixed shapes (diag_stats.slot_rows): nothing here makes the
        host wait. Returns the flags of the rows left for the planned route: all of them where
        this route does not apply (a position bias, a mask too large to index whole, a
        product over the memory budget)."""
        slots = self.refine_slots if self.refine_slots is not None else (REFINE_SLOTS_CUDA if flags.is_cuda else 0)
        if slots <= 0 or sm.pbias is not None:
            return flags
        B, h, n = flags.shape
        n_kv, kv, d = k.shape[1], k.shape[2], k.shape[3]
        if sm.mask is None:
            mask = None
        elif isinstance(sm.mask, LazyMask) and not sm.mask.small:
            return flags
        else:
            mask = _mask_block(sm.mask, 0, n)
        budget = block_elements(q.device) // 4
        width = min(slots, n, budget // max(1, b * h * kv))
        # Layers per chunk: float64 keys and scores within the budget. Whole layers, so that a
        # chunk's batch index modulo b is the prompt's.
        layers = budget // max(1, b * (n_kv * kv * d + h * width * kv))
        if width < 1 or layers < 1 or B // b > 8 * layers:
            return flags
        rest = []
        for c0 in range(0, B, layers * b):
            c1 = min(B, c0 + layers * b)
            rows, used, exact, left = slot_rows(q[c0:c1], k[c0:c1], flags[c0:c1], width, mask, sm.causal,
                                                sm.scale, sm.softcap)
            rest.append(left)
            self._refined.append(used.sum())
            if self.keep_positions:
                idx = rows[..., None].expand(*rows.shape, 2)
                part = target[c0:c1]
                part.scatter_(2, idx, torch.where(used[..., None], exact, part.gather(2, idx)))
            else:
                exact = torch.where(used[..., None], exact, 0.0)
                exact[..., 1].masked_fill_(rows == 0, 0.0)  # row 0 never counts in the first-token sum
                target[c0:c1] += exact.sum(2)
        self._note_block(width, kv)
        return rest[0] if len(rest) == 1 else torch.cat(rest)

    def _flush(self, keep: int) -> None:
        while len(self._pending) > keep:
            self._refine(self._pending.pop(0))

    def _refine(self, job: _Refinement) -> None:
        """Exact rows for a group's flagged valid rows, into its record."""
        hits = job.hits
        if hits is None:
            if job.ready is not None:
                job.ready.synchronize()
            hits = np.argwhere(job.flags.numpy())
        if not len(hits):
            return
        self._refined.append(len(hits))
        sm = job.softmax
        n, kv_len = job.q.shape[2], job.k.shape[2]
        block_of = hits[:, 2] // sm.step
        for blk in np.unique(block_of):
            q0, q1 = int(blk) * sm.step, min(n, int(blk) * sm.step + sm.step)
            block, k0, k1 = _block_keys(sm.mask, q0, q1, n, kv_len, sm.causal, sm.step)
            self._note_block(q1 - q0, k1 - k0)
            (bb, hh, ii), rows = exact_rows(job.q, job.k, hits[block_of == blk], q0, k0, k1, block, sm.causal,
                                            sm.scale, sm.softcap, sm.pbias)
            if self.keep_positions:
                job.target[bb, hh, ii] = rows
            else:
                rows[:, 1].masked_fill_(ii == 0, 0.0)  # row 0 never counts in the first-token sum
                job.target.index_put_((bb, hh), rows, accumulate=True)


def _stacked(layers: list[torch.Tensor]) -> torch.Tensor:
    """Held (b, h, n, d) tensors of several layers along the batch. On a GPU in the memory
    layout they came in: models make q and k as (b, n, h, d) memory seen as (b, h, n, d),
    which a plain cat would transpose on the way (twice the time there), and in which the
    half-precision row scores read them without copies (diag_stats._row_scores_half). On the
    CPU as a plain cat: the float32 row scores there were measured on that layout."""
    if layers[0].is_cuda and layers[0].transpose(1, 2).is_contiguous():
        return torch.cat([t.transpose(1, 2) for t in layers]).transpose(1, 2)
    return torch.cat(layers)


def _tile(t: torch.Tensor | None, count: int) -> torch.Tensor | None:
    """A per-batch tensor (b | 1, ...) for `count` layers stacked along the batch."""
    if t is None or count == 1 or t.shape[0] == 1:
        return t
    return t.repeat(count, *([1] * (t.ndim - 1)))


_LAYER_INDICES: "weakref.WeakKeyDictionary[nn.Module, dict[int, int]]" = weakref.WeakKeyDictionary()


def attention_layer_indices(model: nn.Module) -> dict[int, int]:
    """id(attention module) -> layer index, from the model's adapter (the layer numbering the
    rest of sheafscope uses); empty if no adapter knows the model. Found once per model (an
    adapter per capture is host time a short forward pass on a GPU notices); a copy is
    returned, so that callers may add to it."""
    if model not in _LAYER_INDICES:
        try:
            from sheafscope.adapters import adapter_for

            adapter = adapter_for(model)
            _LAYER_INDICES[model] = {id(adapter.attention(layer)): layer for layer in range(adapter.geometry.n_layers)}
        except Exception:
            _LAYER_INDICES[model] = {}
    return dict(_LAYER_INDICES[model])


# ------------------------------------------------------------------------------------------------
# The attention function
# ------------------------------------------------------------------------------------------------
def _rows_per_block(capture: DiagonalCapture | None, per_row: int, n: int, device: torch.device) -> int:
    return rows_per_block(capture.chunk_rows if capture is not None else None, per_row, n, device)


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


_CUDNN_CHOICE: dict[tuple, bool] = {}


def _sdpa_would_use_cudnn(q, k, v, bias, causal, scale) -> bool:
    """Whether scaled_dot_product_attention would pick cuDNN attention for these inputs (on
    Hopper GPUs its choice for half precision, about twice as fast as flash at long n): the
    fast path then runs the same kernel as a plain forward pass. The choice depends only on
    the inputs' layout, so it is asked once per layout (every layer of a forward shares one)."""
    key = tuple((t.shape, t.stride(), t.dtype) if t is not None else None for t in (q, k, v, bias))
    cuda = torch.backends.cuda
    try:  # what sdpa_kernel() allows changes the choice
        key += (q.device, causal, scale, cuda.cudnn_sdp_enabled(), cuda.flash_sdp_enabled(),
                cuda.mem_efficient_sdp_enabled(), cuda.math_sdp_enabled())
    except AttributeError:  # a torch without cuDNN attention
        return False
    if key not in _CUDNN_CHOICE:
        try:
            choice = torch._fused_sdp_choice(q, k, v, bias, 0.0, causal, scale=scale, enable_gqa=True)
            _CUDNN_CHOICE[key] = int(choice) == int(torch.nn.attention.SDPBackend.CUDNN_ATTENTION)
        except (AttributeError, RuntimeError, TypeError):
            _CUDNN_CHOICE[key] = False
        if len(_CUDNN_CHOICE) > 4096:  # many distinct shapes (a corpus of lengths): start over
            _CUDNN_CHOICE.clear()
    return _CUDNN_CHOICE[key]


def _padded_bias(bias: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The bias as memory-efficient and cuDNN attention want it: rows aligned to 16 elements
    (as scaled_dot_product_attention pads internally), broadcast over heads."""
    b_, _, rows, kv = bias.shape
    padded = torch.empty(b_, 1, rows, (kv + 15) // 16 * 16, dtype=q.dtype, device=q.device)
    padded[..., :kv] = bias
    return padded[..., :kv].expand(q.shape[0], q.shape[1], rows, kv)


def _flash_ok(q: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether flash attention takes this call: half precision, no mask, head size <= 256."""
    return bias is None and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256


def _cuda_kernel(q, k, v, bias, causal, scale) -> str:
    """Which fused kernel returns this call's lse at the least cost: flash for unmasked half
    precision up to FLASH_MAX_ROWS query rows (there it is the faster kernel and costs the host
    less than cuDNN's graph execution, which a forward of that length is bound by), else the
    kernel a plain forward would run where that kernel returns its lse (cuDNN), else flash
    (half precision, no mask), else memory-efficient attention."""
    flash_ok = _flash_ok(q, bias)
    if flash_ok and q.shape[2] <= FLASH_MAX_ROWS:
        return "flash"
    if _sdpa_would_use_cudnn(q, k, v, bias, causal, scale):
        return "cudnn"
    return "flash" if flash_ok else "efficient"


def _fused_cuda(q, k, v, bias, causal, scale, choices: dict | None = None):
    """(output, lse, kernel name) from the kernel _cuda_kernel picks; a kernel that refuses
    the shapes hands over to the next one (cuDNN -> flash -> memory-efficient). cuDNN and flash
    read grouped KV heads directly. `choices` memoises the kernel that ran, per shape (one
    forward pass asks once, not once per layer: on a host-bound forward the asking is what
    costs)."""
    if bias is not None:
        bias = _padded_bias(bias, q)
    key = (q.shape, k.shape, bias is None, causal)
    kind = choices.get(key) if choices is not None else None
    if kind is None:
        kind = _cuda_kernel(q, k, v, bias, causal, scale)
    if kind == "cudnn":
        try:
            res = torch.ops.aten._scaled_dot_product_cudnn_attention.default(q, k, v, bias, True, 0.0, causal, False,
                                                                             scale=scale)
            out, lse = res[0], res[1].reshape(q.shape[:3])
        except RuntimeError:  # not for these shapes after all: the next kernel
            kind = "flash" if _flash_ok(q, bias) else "efficient"
    if kind == "flash":
        try:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention.default(q, k, v, 0.0, causal, False,
                                                                                 scale=scale)[:2]
        except RuntimeError:  # flash unavailable for this shape/GPU: memory-efficient attention
            kind = "efficient"
    if kind == "efficient":
        groups = q.shape[1] // k.shape[1]
        res = torch.ops.aten._scaled_dot_product_efficient_attention.default(
            q, _repeat_kv(k, groups), _repeat_kv(v, groups), bias, True, 0.0, causal, scale=scale)
        out, lse = res[0], res[1][..., : q.shape[2]]
    if choices is not None:
        choices[key] = kind
    return out, lse, kind


def _fused(q, k, v, bias, causal, scale, choices: dict | None = None):
    """(output, lse, kernel name) of one fused attention call."""
    if q.device.type == "cpu":
        return (*_fused_cpu(q, k, v, bias, causal, scale), "flash-cpu")
    if q.device.type == "cuda":
        return _fused_cuda(q, k, v, bias, causal, scale, choices)
    raise RuntimeError(f"no fused attention kernel with log-sum-exp for device {q.device.type}")


def _chunk_attention(q, k, v, block, causal_from, scale, softcap, pbias):
    """Attention output and lse of one block of query rows, in torch (the fallback).

    q (b, h, r, d) holds rows q0..; k, v (b, h_kv, c, d) key columns k0..; `block` the mask over
    those rows and columns, or None with `causal_from` = (q0, k0) for a causal mask, or neither.
    Scores are at least float32 (stat_dtype) even for half-precision models, so that lse
    agrees with the diagonal scores of diag_stats.lse_rows to float32 rounding.
    """
    b, h, r, d = q.shape
    n_kv = k.shape[1]
    dt = stat_dtype(q)
    s = torch.matmul(grouped(q, n_kv).to(dt), k.to(dt)[:, :, None].transpose(-1, -2)).reshape(b, h, r, -1) * scale
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
    """Attention output (b, h, n, d_v) in v's dtype and lse (b, h, n) in stat_dtype; the mask's
    additive value at each row's diagonal and first key ((b|1, 1, n, 2) float64; None where
    there is no mask or not `point_bias`); and the rows per block its masked steps used (the
    blocks whose key ranges a LazyMask has cached)."""
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
            out, lse, kind = _fused(q, k, v, None, causal, scale, capture._choices if capture is not None else None)
            note(f"fused-{dev}")
            note(f"kernel:{kind}")
            dt = stat_dtype(q)
            return out, (lse if lse.dtype == dt else lse.to(dt)), None, _rows_per_block(capture, b * kv_len, n, q.device)
        except RuntimeError as e:
            fused_ok, reason = False, f"fused kernel failed on {dev} ({str(e).splitlines()[0][:160]})"

    out = torch.empty(b, h, n, v.shape[-1], dtype=v.dtype, device=q.device)
    lse = torch.empty(b, h, n, dtype=stat_dtype(q), device=q.device)
    points = None
    if mask is not None and point_bias:
        points = torch.empty(b, 1, n, 2, dtype=torch.float64, device=q.device)
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
            if points is not None:
                points[:, :, q0:q1, 0] = _point_bias(block, q0, None)
                points[:, :, q0:q1, 1] = _point_bias(block, q0, 0)
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
                o, l, kind = _fused(qb, kb, vb, _as_bias(block, q.dtype), False, scale,
                                    capture._choices if capture is not None else None)
                out[:, :, q0:q1] = o
                lse[:, :, q0:q1] = l
                note(f"fused-{dev}")
                note(f"kernel:{kind}")
                continue
            except RuntimeError as e:
                fused_ok, reason = False, f"fused kernel failed on {dev} ({str(e).splitlines()[0][:160]})"
        pb = None if pbias is None else pbias[:, :, q0:q1, k0:k1]
        o, l = _chunk_attention(qb, kb, vb, block, causal_from, scale, softcap, pb)
        out[:, :, q0:q1] = o
        lse[:, :, q0:q1] = l
        note("chunked", reason)
    return out, lse, points, step


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
    if kwargs and (kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None):
        name = "s_aux" if kwargs.get("s_aux") is not None else "sinks"
        raise SheafscopeError(f"{FAST_ATTENTION} attention does not implement attention sinks ({name}); "
                              "load the model with attention='eager'")
    capture = _ACTIVE.get()
    if capture is not None and softcap is None and position_bias is None and not dropout:
        # The layers of one forward pass repeat one call: what the first decided, the rest
        # reuse (on a host-bound GPU forward pass, Python per layer is what b pays over a).
        plan_key = (id(attention_mask), query.shape, key.shape, query.dtype, query.device, scaling, is_causal,
                    getattr(module, "is_causal", None))
        plan = capture._plans.get(plan_key)
        if plan is not None:
            if plan.gqa is not None:  # the kernel call transformers' sdpa function makes, without its checks
                out = F.scaled_dot_product_attention(query, key, value, attn_mask=plan.sdpa_mask, dropout_p=0.0,
                                                     scale=plan.scale, is_causal=plan.causal,
                                                     enable_gqa=plan.gqa).transpose(1, 2).contiguous()
            else:
                out = _sdpa_forward(module, query, key, value, plan.sdpa_mask, dropout=0.0, scaling=plan.scale,
                                    is_causal=plan.causal, **kwargs)[0]
            capture._hold_planned(plan, module, query, key)
            return out, None
    else:
        plan_key = None
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    q_len, kv_len = query.shape[2], key.shape[2]
    # sdpa semantics: a mask says everything; without one, is_causal (aligned top-left).
    causal = bool(q_len > 1 and attention_mask is None and causal)
    if causal and kv_len > q_len:
        key, value = key[:, :, :q_len], value[:, :, :q_len]
        position_bias = None if position_bias is None else position_bias[..., :q_len]
        kv_len = q_len
        plan_key = None  # the plan's path does not cut keys
    if capture is None:
        if softcap is None and position_bias is None:
            return _sdpa(module, query, key, value, attention_mask, dropout, scale, causal, kwargs), None
        out = _attention_with_lse(query, key, value, attention_mask, causal, scale, softcap, position_bias, None)[0]
        return out.transpose(1, 2).contiguous(), None

    if dropout and module.training:
        raise SheafscopeError("attention statistics are measured in eval mode: call model.eval()")
    if q_len != kv_len:
        raise SheafscopeError(f"attention statistics need one full forward pass (queries {q_len} != keys {kv_len}); "
                              "pass use_cache=False")
    b, h, n, _ = query.shape
    causal_module = bool(is_causal if is_causal is not None else getattr(module, "is_causal", False))
    # The exact routes' statistics may see a right-padded causal batch as plain causal
    # attention (DiagonalCapture.prefix_rows): no mask to read (on a GPU the fused kernel's
    # masked loads cost it 7x on a padded corpus batch), and no length limit from materialising one.
    stats_mask, stats_causal = attention_mask, causal
    if capture.prefix_rows and isinstance(attention_mask, LazyMask) and attention_mask.causal_but_padding:
        stats_mask, stats_causal = None, True
    route = ("fused" if _fused_rows_serve(capture, query, stats_mask, softcap, position_bias)
             else "dense" if b * h * n * kv_len <= _exact_limit(capture, query.device) else "lse")
    if route != "lse":
        # The exact routes: statistics for every row from the fused kernel (fused_rows.py) or,
        # for small problems, one dense product (diag_stats.dense_rows), later, for all held
        # layers at once. The output is the plain sdpa call where sdpa can compute it.
        sdpa_mask = None
        if softcap is None and position_bias is None:
            # a LazyMask is built whole for sdpa once per forward pass, here (the plan keeps it)
            sdpa_mask = attention_mask.materialize() if isinstance(attention_mask, LazyMask) else attention_mask
            out = _sdpa(module, query, key, value, sdpa_mask, dropout, scale, causal, kwargs)
        else:
            out = _attention_with_lse(query, key, value, attention_mask, causal, scale, softcap, position_bias,
                                      capture, point_bias=False)[0].transpose(1, 2).contiguous()
        counted = (("sdpa",) if softcap is None and position_bias is None else ()) + (
            ("fused-rows",) if route == "fused" else ()) + (
            ("padding-as-causal",) if stats_mask is not attention_mask else ())
        softmax = _Softmax(stats_mask, stats_causal, scale, softcap, position_bias, n, causal_module)
        if plan_key is not None:
            plan = capture._plans[plan_key] = _Plan(route, softmax, sdpa_mask, causal, scale, counted,
                                                    query.nbytes + key.nbytes, attention_mask,
                                                    _direct_gqa(module, query, key, value, sdpa_mask, softcap,
                                                                position_bias))
            capture._hold_planned(plan, module, query, key)
        else:
            for name in counted:
                capture.kernels[name] += 1
            capture._hold(module, query, key, None, None, softmax, route)
        return out, None
    out, lse, points, step = _attention_with_lse(query, key, value, attention_mask, causal, scale, softcap,
                                                 position_bias, capture)
    capture._hold(module, query, key, lse, points,
                  _Softmax(attention_mask, causal, scale, softcap, position_bias, step, causal_module), "lse")
    return out.transpose(1, 2).contiguous(), None


def _direct_gqa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any,
                softcap: float | None, position_bias: torch.Tensor | None) -> bool | None:
    """For calls like this one, transformers' sdpa function (`_sdpa`) ends in one kernel call,
    `scaled_dot_product_attention(query, key, value, mask, scale, is_causal, enable_gqa)`, and the
    output's transpose: the enable_gqa it passes, so that planned calls can make that call
    themselves (its checks cost a host-bound GPU forward pass ~10 us per layer). None where it
    would do more (repeat or pack grouped heads, a position bias, a single query row, a device
    with its own rules): those calls go through it."""
    if softcap is not None or position_bias is not None or query.shape[2] < 2 or query.device.type not in ("cuda", "cpu"):
        return None
    if isinstance(mask, torch.Tensor) and mask.dtype != torch.bool:
        return None
    groups = getattr(module, "num_key_value_groups", 1)
    if groups == 1 and key.shape[1] == query.shape[1]:
        return False
    if groups > 1 and _use_gqa_in_sdpa is not None:
        try:
            return True if _use_gqa_in_sdpa(mask, key, value) else None
        except TypeError:  # another transformers' signature: let its function decide
            return None
    return None


def _sdpa(module, query, key, value, mask, dropout, scale, causal, kwargs) -> torch.Tensor:
    """The attention output (b, n, h, d) exactly as attn_implementation="sdpa" computes it."""
    if isinstance(mask, LazyMask):
        mask = mask.materialize()
    return _sdpa_forward(module, query, key, value, mask, dropout=dropout, scaling=scale, is_causal=causal,
                         **kwargs)[0]


_sdpa_forward: Any = None  # transformers' sdpa attention function (register() imports it)
_use_gqa_in_sdpa: Any = None  # its choice of sdpa's enable_gqa (register() imports it)


def _dense_bias(capture: DiagonalCapture, mask: Any, causal: bool, n: int, kv_len: int,
                device: torch.device) -> torch.Tensor | None:
    """The additive float64 mask (0 / -inf) of a small problem, made once per forward pass
    and shared by the layers that use the same mask."""
    if mask is None and not causal:
        return None
    if mask is None:  # causal: the same for every forward pass of this shape, made once
        key = (n, kv_len, device)
        if key not in _CAUSAL_BIAS:
            allowed = torch.ones(1, 1, n, kv_len, dtype=torch.bool, device=device).tril_()
            bias = torch.zeros(allowed.shape, dtype=torch.float64, device=device).masked_fill_(~allowed, -math.inf)
            if sum(t.nbytes for t in _CAUSAL_BIAS.values()) + bias.nbytes > CAUSAL_BIAS_CACHE_BYTES:
                _CAUSAL_BIAS.clear()
            _CAUSAL_BIAS[key] = bias
        return _CAUSAL_BIAS[key]
    key = ("bias", id(mask), causal, n, kv_len)
    if key not in capture._cache:
        block = _mask_block(mask, 0, n)
        if block.dtype != torch.bool:
            capture._cache[key] = (mask, block.double())
            return capture._cache[key][1]
        allowed = block
        bias = torch.zeros(allowed.shape, dtype=torch.float64, device=device).masked_fill_(~allowed, -math.inf)
        capture._cache[key] = (mask, bias)  # the mask is kept so that its id is not reused
    return capture._cache[key][1]


def _block_keys(mask, q0: int, q1: int, n: int, kv_len: int, causal: bool, step: int):
    """The mask block of rows q0..q1-1 cut to the keys they can see: (block | None, k0, k1)."""
    if mask is not None:
        block = _mask_block(mask, q0, q1)
        k0, k1 = (0, kv_len) if step >= n else _key_range(mask, q0, q1, block)
        return block[..., k0:k1], k0, k1
    return None, 0, (min(kv_len, q1) if causal else kv_len)


def _fused_rows_serve(capture: DiagonalCapture, q: torch.Tensor, mask: Any, softcap: float | None,
                      pbias: torch.Tensor | None) -> bool:
    """Whether the fused kernel computes this call's statistics: no soft-capping or position
    bias (the kernel applies neither), a mask it can read whole (none, a boolean tensor, or a
    LazyMask small enough to materialise), and the capture's `fused_rows` setting."""
    if capture.fused_rows is False or capture.kernel != "auto" or softcap is not None or pbias is not None:
        return False
    if isinstance(mask, LazyMask):
        if not mask.small:
            return False
    elif mask is not None and not (isinstance(mask, torch.Tensor) and mask.dtype == torch.bool):
        return False
    if capture.fused_rows:
        return q.shape[-1] <= fr.MAX_HEAD_DIM and fr.runs_on(q.device)
    return q.shape[2] <= FUSED_ROWS_MAX_ROWS and fr.available(q)


def _exact_limit(capture: "DiagonalCapture | None", device: torch.device) -> int:
    if capture is not None and capture.exact_below is not None:
        return capture.exact_below
    return DENSE_EXACT_ELEMENTS_CUDA if device.type == "cuda" else DENSE_EXACT_ELEMENTS


# ------------------------------------------------------------------------------------------------
# Residual-stream maxima without keeping hidden states
# ------------------------------------------------------------------------------------------------
_NO_FORWARD = object()  # a block without an instance-level forward (HiddenMax restores it so)


def _max_abs(t: torch.Tensor, dims: Any) -> torch.Tensor:
    """max |t| over `dims`; NaN propagates (test_hidden_max_propagates_nan). On a GPU in one
    kernel (vector_norm, ord=inf: no abs pass); on the CPU as abs().amax(), which there costs a
    fifth of vector_norm's slow path."""
    if t.is_cuda:
        return torch.linalg.vector_norm(t, ord=math.inf, dim=dims)
    return t.abs().amax(dim=dims)


class HiddenMax:
    """max |h| over the valid tokens of each batch element, for every residual stream a model
    returns as hidden_states, without keeping a (layers x batch x n x d) stack.

    Streams 0..L-1 (the input of block 0, the outputs of blocks 0..L-2) come from the blocks'
    forward methods, wrapped while the HiddenMax is entered; stream L is the trunk's last_hidden_state (after the final norm, as
    transformers reports it), which the caller passes to `final` after running the trunk
    (`model.base_model`). Streams of up to `hold_bytes` are held and reduced together (on a GPU
    two operations per stream would cost more than the reduction); larger ones as they come.
    """

    def __init__(self, blocks: list[nn.Module], valid: torch.Tensor | None = None, hold_bytes: int | None = None):
        self.blocks, self.valid, self.hold_bytes = blocks, valid, hold_bytes
        self.values: list[torch.Tensor | None] = [None] * (len(blocks) + 1)
        self._held: list[tuple[int, torch.Tensor]] = []
        self._limit = 1 << 62  # streams held before they are reduced (the first stream's size sets it)
        self._saved: list[tuple[dict, Any]] = []  # (a block's __dict__, its instance forward or _NO_FORWARD)
        self._all: torch.Tensor | None = None  # every stream's maxima (per token if padded), when reduced together

    def _keep(self, index: int, h: torch.Tensor) -> None:
        held = self._held
        held.append((index, h))
        if len(held) == 1:  # the streams of a forward pass are all shaped alike
            budget = self.hold_bytes if self.hold_bytes is not None else (HOLD_BYTES_CUDA if h.is_cuda else HOLD_BYTES)
            self._limit = max(1, budget // max(1, h.nbytes))
        if len(held) >= self._limit:
            self._reduce_held()

    @torch.no_grad()
    def _reduce_held(self) -> None:
        """Per batch element (b,) where every token counts (valid None); else per token (b, n),
        masked and reduced over tokens once, in maxima()."""
        held, self._held = self._held, []
        if not held:
            return
        tensors = [h for _, h in held]
        dims = (-2, -1) if self.valid is None else -1
        stacked = None
        if len(tensors) > 1:
            try:
                stacked = torch.stack(tensors)
            except RuntimeError:  # streams of other shapes or devices: one at a time
                pass
        if stacked is not None:
            maxima = _max_abs(stacked, dims)
            if self._every_stream(held):
                self._all = maxima  # every stream, in order: (streams, b[, n]), maxima() needs no second stack
                return
        else:
            maxima = [_max_abs(t, dims) for t in tensors]
        for (index, _), m in zip(held, maxima):
            self.values[index] = m

    def __enter__(self) -> "HiddenMax":
        # The blocks' forward methods are wrapped for the capture (as accelerate's hooks wrap
        # them), not given nn.Module hooks: a module with hooks takes nn.Module's slow call
        # path, and registering and removing 32 hooks per forward pass cost a host-bound 7B
        # forward on a GPU about a millisecond (benchmarks/capture_overhead.py, fn+hidden).
        # Through __dict__: what nn.Module's __setattr__ and __delattr__ do for a function, at a
        # fraction of their cost (32 blocks per forward pass).
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            if 0 < i == last:  # the last block's stream is the trunk's output (final): nothing to wrap
                break
            attrs = block.__dict__
            saved = attrs.get("forward", _NO_FORWARD)
            self._saved.append((attrs, saved))
            attrs["forward"] = self._wrapped(block.forward if saved is _NO_FORWARD else saved, i == 0,
                                             i + 1 if i < last else None)
        return self

    def _wrapped(self, inner: Any, first: bool, index: int | None) -> Any:
        """`inner` (a block's forward), keeping its input as stream 0 if `first` and its output
        as stream `index` (None: the last block, whose stream is the trunk's output)."""
        keep = self._keep
        if first:
            def forward_first(*args: Any, **kwargs: Any) -> Any:
                keep(0, args[0] if args else kwargs["hidden_states"])
                out = inner(*args, **kwargs)
                if index is not None:
                    keep(index, out[0] if isinstance(out, (tuple, list)) else out)
                return out
            return forward_first

        def forward(*args: Any, **kwargs: Any) -> Any:
            out = inner(*args, **kwargs)
            keep(index, out[0] if isinstance(out, (tuple, list)) else out)
            return out
        return forward

    def __exit__(self, *exc: Any) -> None:
        for attrs, saved in reversed(self._saved):
            if saved is _NO_FORWARD:
                del attrs["forward"]  # the class's forward again
            else:
                attrs["forward"] = saved  # what was there before (e.g. accelerate's wrapper)
        self._saved.clear()

    def final(self, last_hidden_state: torch.Tensor, reduce: bool = True) -> None:
        """Record the last stream from the trunk's output and reduce the held streams (or, with
        reduce=False, keep them held, for held_streams(), until the maxima are asked for)."""
        self._keep(len(self.blocks), last_hidden_state)
        if reduce:  # before the statistics run: long streams held on would raise the peak
            self._reduce_held()

    def held_streams(self) -> list[torch.Tensor] | None:
        """Every stream, in order, where all are still held and every token counts (no
        `valid`); else None."""
        held = self._held
        if self.valid is not None or not self._every_stream(held):
            return None
        return [h for _, h in held]

    def _every_stream(self, held: list[tuple[int, torch.Tensor]]) -> bool:
        """Whether `held` is every stream, in order."""
        return [i for i, _ in held] == list(range(len(self.values)))

    def drop_held(self) -> None:
        """Forget the held streams, whose maxima were queued elsewhere (a replayed tail graph)."""
        self._held = []

    def result(self) -> torch.Tensor:
        """(b, layers + 1) float64 on the CPU."""
        return self.maxima().cpu()

    def maxima(self, dtype: torch.dtype | None = torch.float64) -> torch.Tensor:
        """(b, layers + 1) on the device, in `dtype` (None: the hidden states' own dtype, which
        holds every max |h| exactly; launch_batch converts on the host)."""
        self._reduce_held()
        if self._all is not None:
            per_token = self._all.transpose(0, 1)  # (b, streams[, n])
        else:
            missing = [i for i, v in enumerate(self.values) if v is None]
            if missing:
                raise SheafscopeError(f"no max |h| for hidden-state streams {missing} (the blocks did not run, "
                                      "or final() was not called)")
            last = self.values[-1]
            per_token = torch.stack([v if v.dtype == last.dtype and v.device == last.device
                                     else v.to(last.device, last.dtype) for v in self.values], dim=1)
        if self.valid is None:  # already reduced over tokens: (b, streams)
            return per_token if dtype is None else per_token.to(dtype)
        per_token = torch.where(self.valid.to(per_token.device)[:, None], per_token, 0)
        out = per_token.amax(dim=-1)
        return out if dtype is None else out.to(dtype)


# ------------------------------------------------------------------------------------------------
# Registration
# ------------------------------------------------------------------------------------------------
def register() -> str:
    """Register the attention and mask functions with transformers (idempotent); returns the name."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface

    global _sdpa_forward, _use_gqa_in_sdpa
    _sdpa_forward = sdpa_attention_forward
    try:
        from transformers.integrations.sdpa_attention import use_gqa_in_sdpa
    except ImportError:  # moved: grouped-query calls go through sdpa_attention_forward (correct, slower)
        use_gqa_in_sdpa = None
    _use_gqa_in_sdpa = use_gqa_in_sdpa
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
    """What ran during fast captures: kernel counts, fallback reasons, and how many (layer,
    head, row) statistics were recomputed exactly after the lse route flagged them."""

    kernels: Counter = field(default_factory=Counter)
    fallbacks: list[str] = field(default_factory=list)
    refined_rows: int = 0

    def add(self, kernels: Counter, fallbacks: list[str], refined_rows: int) -> None:
        self.kernels.update(kernels)
        self.refined_rows += refined_rows
        self.fallbacks.extend(f for f in fallbacks if f not in self.fallbacks)


def padded_batch(prompts: list[torch.Tensor], pad_id: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Prompts (each (1, n_i) token ids on one device) as a right-padded batch: input ids
    (b, n), which positions are valid ((b, n) bool), and the attention mask to pass. Where
    nothing is padded, both are None: exactly the call a single prompt gets (sdpa's is_causal),
    and every position counts."""
    lengths = [int(p.shape[1]) for p in prompts]
    n = max(lengths)
    if min(lengths) == n:
        return (prompts[0] if len(prompts) == 1 else torch.cat(prompts)), None, None
    input_ids = torch.nn.utils.rnn.pad_sequence([p[0] for p in prompts], batch_first=True, padding_value=pad_id)
    # Built on the host and sent once (a device-side comparison would be launches), without
    # waiting for the work queued on the device (with batches pipelined, the previous batch's).
    valid = to_device(torch.arange(n)[None, :] < torch.tensor(lengths)[:, None], prompts[0].device)
    return input_ids, valid, valid.long()


def masses_from_sums(sums: np.ndarray, lengths: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Offdiag and first-token masses (b, layers, heads) from DiagonalCapture.mass_sums on
    the host (float64 numpy): the first-token sum over rows 1..n-1 divided by their number."""
    denom = np.array([max(n - 1, 1) for n in lengths], dtype=np.float64)
    return sums[..., 0], sums[..., 1] / denom[:, None, None]


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """A host copy of t that does not make the host wait: on a GPU into pinned memory, queued
    behind the work that produces t (read it only after the batch's event)."""
    if t.device.type != "cuda":
        return t.cpu()
    if not t.is_contiguous() and t.dim() >= 2 and t.transpose(0, 1).is_contiguous():
        # a (b, layers, ...) view of (layers, b, ...) memory (records, stream maxima): copied as
        # it lies, a view of the host copy, rather than reordered by a kernel on the device
        return _to_host(t.transpose(0, 1)).transpose(0, 1)
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


@dataclass(eq=False)
class PendingBatch:
    """A batch whose statistics are queued on the device and on their way to the host
    (`launch_batch`); `result()` waits for them and makes the per-prompt captures. Launching
    the next batch before collecting this one keeps a GPU busy while the host waits for, checks
    and converts this one's numbers (on a GPU-bound corpus the wait would otherwise leave the
    device idle once per batch)."""

    lengths: list[int]
    sums: torch.Tensor  # (b, layers, heads, 2) float64 on the host (pinned on a GPU)
    hidden: torch.Tensor  # (b, layers + 1) on the host, in the hidden states' dtype (exact maxima)
    refined_known: int
    refined_pending: torch.Tensor | None  # a host copy of the device's count
    kernels: Counter
    fallbacks: list[str]
    dtype: torch.dtype
    ready: Any = None  # torch.cuda.Event recorded after the copies, or None on the CPU
    replayed: Any = None  # tail_graphs.Replayed whose outputs sums and hidden are, until read

    def result(self, stats: BatchStats | None = None) -> list:
        """One PromptCapture per prompt (waits for the device). Raises NonFiniteError on
        NaN/Inf in a prompt's numbers, naming the first layer where it appears."""
        if self.ready is not None:
            self.ready.synchronize()
        # numpy from here: per prompt, a numpy view costs a fraction of a torch index, and a
        # batch of 32 short prompts on a host-bound GPU notices. np.array copies out of pinned
        # memory: the captures' arrays outlive the batch, and pinned blocks are a scarce
        # resource that the caching host allocator should get back (or, from a replayed tail
        # graph, buffers that its next replay overwrites: released once copied).
        sums = np.array(self.sums.numpy(), order="C")
        hidden = self.hidden.to(torch.float64, memory_format=torch.contiguous_format, copy=True).numpy()
        if self.replayed is not None:
            self.sums, self.hidden = torch.from_numpy(sums), torch.from_numpy(hidden)
            self.replayed, replayed = None, self.replayed
            replayed.release()
        off, sink = masses_from_sums(sums, self.lengths)
        if stats is not None:
            refined = self.refined_known + (0 if self.refined_pending is None else int(self.refined_pending))
            stats.add(self.kernels, self.fallbacks, refined)
        # a NaN or Inf anywhere makes a sum non-finite (so can an overflow of the sum of finite
        # values, which the search below then clears): one check per batch, not two scans
        if not math.isfinite(float(sums.sum()) + float(hidden.sum())):  # find the first culprit
            for layer in range(off.shape[1]):
                check_finite(f"the attention of layer {layer}", torch.from_numpy(off[:, layer]), self.dtype)
                check_finite(f"the attention of layer {layer}", torch.from_numpy(sink[:, layer]), self.dtype)
            for layer in range(hidden.shape[1]):
                check_finite(f"the hidden state after layer {layer - 1}" if layer else "the embeddings",
                             torch.from_numpy(hidden[:, layer]), self.dtype)
        return [PromptCapture(n, off[j], sink[j], hidden[j]) for j, n in enumerate(self.lengths)]


@torch.no_grad()
def launch_batch(model: nn.Module, blocks: list[nn.Module], prompts: list[torch.Tensor],
                 pad_id: int = 0, tail_graph: bool = True, **capture_options: Any) -> PendingBatch:
    """Run prompts (each (1, n_i) token ids on the model's device) as one right-padded batch
    through the trunk (`model.base_model`: no LM head, which nothing here needs) and queue
    their statistics' copy to the host; `PendingBatch.result()` gives one PromptCapture per
    prompt, equal to running it alone: sums run over its own rows only, and right padding
    never changes what a valid row attends to (padding keys are masked; positions still count
    from 0). `tail_graph`: on a GPU, replay the work queued after a plain short forward pass
    from a CUDA graph where one was captured for it (tail_graphs; the same kernels, so the same
    numbers). capture_options go to DiagonalCapture (kernel, chunk_rows, ...)."""
    lengths = [int(p.shape[1]) for p in prompts]
    input_ids, valid, attention_mask = padded_batch(prompts, pad_id)
    trunk = getattr(model, "base_model", model)
    options = {"prefix_rows": valid is not None, **capture_options}  # prefix_rows=False: read the mask
    replayed = None
    with DiagonalCapture(model, valid=valid, keep_positions=False, **options) as cap, \
            HiddenMax(blocks, valid, capture_options.get("hold_bytes")) as hm:
        out = trunk(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        plan = cap.sole_summed_plan() if tail_graph and out[0].is_cuda else None
        hm.final(out[0], reduce=plan is None)
        if plan is not None:
            replayed = _replay_tail(cap, hm, plan)
    if replayed is not None:
        sums, hidden, known, pending = replayed.sums, replayed.maxima, 0, None
    else:
        on_device = cap.mass_sums(lengths)
        sums = _to_host(on_device)
        hidden = _to_host(hm.maxima(dtype=None))  # float64 on the host (result()): no conversion kernel
        known, pending = cap.refined_on_device()
        pending = None if pending is None else _to_host(pending)
    ready = None
    if out[0].is_cuda:  # after the last copy: result() waits for this event, not for later batches
        ready = torch.cuda.Event()
        ready.record()
    # the capture ends here: its counters and reasons are the batch's; the model's dtype as its
    # output has it (next(model.parameters()) walks the module tree: host time)
    # a replayed tail's graph stays taken while the batch holds `replayed` (until result())
    return PendingBatch(lengths, sums, hidden, known, pending, cap.kernels, cap.fallbacks, out[0].dtype, ready,
                        replayed)


def _replay_tail(cap: DiagonalCapture, hm: "HiddenMax", plan: _Plan) -> Any:
    """The tail of a plain short forward pass (`plan`, its sole summed plan: one fused sums
    launch; the streams' maxima; their copies to the host) replayed from a CUDA graph
    (tail_graphs), with the capture's counters bumped and its held tensors dropped; None where
    it runs op by op."""
    streams = hm.held_streams()
    if streams is None:
        return None
    replayed = tail_graphs.TAILS.replay(plan.qs, plan.ks, streams, plan.softmax.causal, plan.softmax.scale)
    if replayed is None:
        if tail_graphs.disabled is not None and tail_graphs.disabled not in cap.fallbacks:
            cap.fallbacks.append(tail_graphs.disabled)
        return None
    cap.take_plan(plan)
    hm.drop_held()
    cap.kernels[tail_graphs.KERNEL_NAME] += 1
    return replayed


def capture_batch(model: nn.Module, blocks: list[nn.Module], prompts: list[torch.Tensor],
                  stats: BatchStats | None = None, pad_id: int = 0, **capture_options: Any):
    """`launch_batch` and its result at once: one PromptCapture per prompt (see launch_batch).
    Raises NonFiniteError on NaN/Inf in a prompt's numbers."""
    return launch_batch(model, blocks, prompts, pad_id, **capture_options).result(stats)
