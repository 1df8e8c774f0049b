"""The row statistics of diag_stats.py against a float64 reference written out row by row.

1 - A_ii and A_i0 from the dense route, the fixed-shape slot route and the planned exact route,
on heads built so that 1 - A_ii spans 1e-20..1 (queries aligned with their own key), with
grouped KV heads, a causal mask, a padding mask and soft-capping: each must equal the reference
to 1e-12 relative, which only an evaluation without cancellation (off-diagonal probabilities
summed, not 1 minus the diagonal) can reach where 1 - A_ii is below float64's epsilon.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sheafscope.diag_stats import dense_rows, exact_rows, slot_rows

B, H, H_KV, N, D = 2, 4, 2, 24, 16
SCALE = D**-0.5
TOL = 1e-12


def _inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, H_KV, N, D, generator=g, dtype=torch.float64)
    q = torch.randn(B, H, N, D, generator=g, dtype=torch.float64)
    # every third row of every head points at its own key, with a logit margin growing to
    # ~50: A_ii from ~1/2 to 1 - 1e-20 (soft-capped at 30: to 1 - 1e-7)
    strength = torch.linspace(0.0, 12.0, N, dtype=torch.float64)
    own = k.repeat_interleave(H // H_KV, dim=1)
    aligned = torch.zeros(N, dtype=torch.bool)
    aligned[::3] = True
    q = torch.where(aligned[:, None], q * 0.1 + own * strength[:, None], q)
    return q.float(), k.float()


def _mask(kind: str) -> torch.Tensor | None:
    """bool (B, 1, N, N), True = attend."""
    causal = torch.ones(N, N, dtype=torch.bool).tril()
    if kind == "causal":
        return causal[None, None].expand(B, 1, N, N)
    if kind == "padded":  # prompt 1 is 17 tokens long, right-padded
        m = causal[None, None].repeat(B, 1, 1, 1)
        m[1, :, :, 17:] = False
        return m
    return None


def _reference(q, k, mask, softcap):
    """(B, H, N, 2) float64, row by row: off = sum_{j != i} e_j / sum_j e_j with
    e_j = exp(s_ij - max_j s_ij), first = e_0 / sum_j e_j. NaN for a row with no key."""
    qd, kd = q.double().numpy(), k.double().numpy()
    out = np.full((B, H, N, 2), np.nan)
    for b in range(B):
        for h in range(H):
            s = qd[b, h] @ kd[b, h // (H // H_KV)].T * SCALE
            if softcap is not None:
                s = np.tanh(s / softcap) * softcap
            for i in range(N):
                allowed = np.ones(N, dtype=bool) if mask is None else mask[b, 0, i].numpy()
                if not allowed.any():
                    continue
                row = np.where(allowed, s[i], -np.inf)
                e = np.exp(row - row.max())
                total = e.sum()
                out[b, h, i, 0] = np.delete(e, i).sum() / total
                out[b, h, i, 1] = e[0] / total
    return out


def _assert_close(got: torch.Tensor, want: np.ndarray, rows: np.ndarray | None = None) -> None:
    got = got.double().numpy()
    keep = ~np.isnan(want) if rows is None else rows
    rel = np.abs(got[keep] - want[keep]) / np.maximum(np.abs(want[keep]), 1e-300)
    assert rel.max() <= TOL, rel.max()


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("mask_kind", ["none", "causal", "padded"])
def test_routes_equal_the_row_by_row_reference(mask_kind, softcap):
    q, k = _inputs(1)
    mask = _mask(mask_kind)
    want = _reference(q, k, mask, softcap)
    tiny = want[..., 0][~np.isnan(want[..., 0])]
    assert tiny.min() < (1e-12 if softcap is None else 1e-6) and tiny.max() > 0.5  # the span they should

    bias = None if mask is None else torch.zeros(mask.shape, dtype=torch.float64).masked_fill_(~mask, -math.inf)
    _assert_close(dense_rows(q, k, bias, SCALE, softcap, None), want)

    flags = torch.from_numpy(~np.isnan(want[..., 0]))  # every row that sees a key
    rows, used, exact, rest = slot_rows(q, k, flags, N, mask, False, SCALE, softcap)
    assert bool(used.sum() == flags.sum()) and not rest.any()
    placed = torch.full((B, H, N, 2), math.nan, dtype=torch.float64)
    placed.scatter_(2, rows[..., None].expand(B, H, N, 2), exact)
    _assert_close(placed, want)

    hits = flags.nonzero().numpy()
    (bb, hh, ii), vals = exact_rows(q, k, hits, 0, 0, N, mask, False, SCALE, softcap, None)
    planned = torch.full((B, H, N, 2), math.nan, dtype=torch.float64)
    planned[bb, hh, ii] = vals
    _assert_close(planned, want)

    if mask is not None:  # the same mask as an additive float32 tensor, as some models pass it
        additive = torch.zeros(mask.shape).masked_fill_(~mask, torch.finfo(torch.float32).min)
        rows, _, exact, _ = slot_rows(q, k, flags, N, additive, False, SCALE, softcap)
        placed.scatter_(2, rows[..., None].expand(B, H, N, 2), exact)
        _assert_close(placed, want)
        (bb, hh, ii), vals = exact_rows(q, k, hits, 0, 0, N, additive, False, SCALE, softcap, None)
        planned[bb, hh, ii] = vals
        _assert_close(planned, want)


def test_slots_take_the_first_flagged_rows_and_leave_the_rest():
    """With fewer slots than flagged rows, the slots hold each head's earliest flagged rows
    and `rest` flags exactly the others."""
    q, k = _inputs(2)
    g = torch.Generator().manual_seed(3)
    flags = torch.rand(B, H, N, generator=g) < 0.4
    rows, used, _, rest = slot_rows(q, k, flags, 3, _mask("causal"), False, SCALE, None)
    for b in range(B):
        for h in range(H):
            flagged = flags[b, h].nonzero()[:, 0].tolist()
            assert sorted(rows[b, h][used[b, h]].tolist()) == flagged[:3]
            assert rest[b, h].nonzero()[:, 0].tolist() == flagged[3:]


def test_dense_rows_in_blocks_of_one_batch_element(monkeypatch):
    """A budget of one batch element's float64 tensors: dense_rows runs element by element
    (with a per-element bias) and still equals the reference."""
    import sheafscope.diag_stats as ds

    q, k = _inputs(4)
    mask = _mask("padded")
    bias = torch.zeros(mask.shape, dtype=torch.float64).masked_fill_(~mask, -math.inf)
    want = _reference(q, k, mask, None)
    monkeypatch.setattr(ds, "CPU_BLOCK_ELEMENTS", H * N * D + H_KV * N * D + 2 * H * N * N)
    calls = []
    block = ds._dense_rows_block
    monkeypatch.setattr(ds, "_dense_rows_block", lambda q, *a: calls.append(q.shape[0]) or block(q, *a))
    _assert_close(dense_rows(q, k, bias, SCALE, None, None), want)
    assert calls == [1] * B


def _float32_sums(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """What `half_products` computes on a GPU, on the CPU: bfloat16 -> float32 is exact, and so
    are the products of two bfloat16 values; the sums are float32."""
    return torch.bmm(a.float(), b.float())


def _check_half_routes(q: torch.Tensor, k: torch.Tensor, mask_kind: str) -> None:
    """Slot and dense rows of bfloat16 q, k (on their device) against the float64 reference of
    the same values, to the scores' float32 rounding."""
    mask = _mask(mask_kind)
    want = _reference(q.cpu(), k.cpu(), mask, None)
    tiny = want[..., 0][~np.isnan(want[..., 0])]
    assert tiny.min() < 1e-12
    # a score's rounding: d * eps32 * scale * sum_j |q_j k_j|; a ratio of sums of exponentials
    # of scores carries at most twice that, relative, on each side
    qd, kd = q.cpu().double(), k.cpu().double().repeat_interleave(H // H_KV, dim=1)
    tol = 4 * float(D * 2.0**-24 * SCALE * (qd.abs() @ kd.abs().transpose(-1, -2)).max())
    dev = q.device
    flags = torch.from_numpy(~np.isnan(want[..., 0])).to(dev)
    rows, used, exact, _ = slot_rows(q, k, flags, N, mask.to(dev), False, SCALE, None)
    placed = torch.full((B, H, N, 2), math.nan, dtype=torch.float64, device=dev)
    placed.scatter_(2, rows[..., None].expand(B, H, N, 2), exact)
    bias = torch.zeros(mask.shape, dtype=torch.float64).masked_fill_(~mask, -math.inf).to(dev)
    for got in (placed, dense_rows(q, k, bias, SCALE, None, None)):
        got = got.cpu().numpy()
        keep = ~np.isnan(want)
        rel = np.abs(got[keep] - want[keep]) / np.abs(want[keep]).clip(1e-300)
        assert rel.max() <= tol, (rel.max(), tol)


@pytest.mark.parametrize("mask_kind", ["causal", "padded"])
def test_half_precision_routes_are_float32_sums_of_exact_products(monkeypatch, mask_kind):
    """The slot and dense routes as a GPU runs them for half-precision models (score products
    from `half_products`, emulated): every row equals the float64 reference of the same
    bfloat16 inputs up to the scores' float32 rounding, 1 - A_ii down to 1e-20 included."""
    import sheafscope.diag_stats as ds

    calls = []

    def products(a, b):
        calls.append(a.shape)
        return torch.bmm(a.float(), b.float())  # bfloat16 -> float32 and their products are exact

    monkeypatch.setattr(ds, "half_products", lambda q: products if q.dtype == torch.bfloat16 else None)
    _check_half_routes(*(t.to(torch.bfloat16) for t in _inputs(4)), mask_kind)
    assert len(calls) == 2  # one product per route: the emulated GPU products ran


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mask_kind", ["causal", "padded"])
def test_cuda_half_precision_routes(mask_kind):
    """The same on a GPU, with the real float32-output products."""
    from sheafscope.diag_stats import half_products

    q, k = (t.to("cuda", torch.bfloat16) for t in _inputs(4))
    assert half_products(q) is not None
    _check_half_routes(q, k, mask_kind)
