"""The fused-rows Triton kernel (fused_rows.py) against a float64 softmax of the same inputs.

Rows span several 64 x 64 tiles (the running maximum and sums are rescaled across key
blocks), heads are grouped, and every third row points at its own key with a margin growing
to ~40 logits, so that 1 - A_ii runs from ~1/2 down to ~1e-17: only an off-diagonal sum that
is never formed as 1 minus something stays relative-accurate there. On the CPU the kernel
runs under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU),
which has no bfloat16; on a GPU the compiled kernel runs, bfloat16 included.
"""

from __future__ import annotations

import math

import pytest
import torch

from sheafscope.fused_rows import fused_rows, fused_stats, has_triton, runs_on

pytestmark = pytest.mark.skipif(not has_triton(), reason="Triton is a test dependency (pip install -e '.[dev]')")
# CPU tensors need the interpreter, which conftest.py turns on only where no GPU is (there
# the compiled kernel is tested instead, by the cuda tests below).
interpreted = pytest.mark.skipif(not runs_on(torch.device("cpu")), reason="a GPU machine: the cuda tests cover the kernel")

B, H, H_KV, N, D = 2, 4, 2, 150, 32
SCALE = D**-0.5
EPS32 = 2.0**-24


def _inputs(dtype: torch.dtype, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    k = torch.randn(B, H_KV, N, D, generator=g, dtype=torch.float64)
    q = torch.randn(B, H, N, D, generator=g, dtype=torch.float64)
    strength = torch.linspace(0.0, 7.0, N, dtype=torch.float64)
    aligned = (torch.arange(N) % 3 == 0)[:, None]
    q = torch.where(aligned, q * 0.1 + k.repeat_interleave(H // H_KV, dim=1) * strength[:, None], q)
    return q.to(device, dtype), k.to(device, dtype)


def _masks(kind: str) -> tuple[torch.Tensor | None, bool, torch.Tensor | None]:
    """(mask given to the kernel, causal flag, the bool (B | 1, 1, N, N) mask it means)."""
    causal = torch.ones(N, N, dtype=torch.bool).tril()[None, None]
    if kind == "causal":
        return None, True, causal
    if kind == "full":
        return None, False, None
    if kind == "padded":  # prompt 1 is 97 tokens long, right-padded
        m = causal.repeat(B, 1, 1, 1)
        m[1, :, :, 97:] = False
        return m, False, m
    if kind == "padded-empty":  # as padded, and prompt 1's padded rows see no key at all (NaN rows)
        m = causal.repeat(B, 1, 1, 1)
        m[1, :, :, 97:] = False
        m[1, :, 97:, :] = False
        return m, False, m
    if kind == "window":  # a sliding window of 40 keys
        i, j = torch.arange(N)[:, None], torch.arange(N)[None, :]
        m = ((j <= i) & (i - j < 40))[None, None]
        return m, False, m
    raise ValueError(kind)


def _reference(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """float64 rows (b, H, N, 2) of the same (rounded) inputs; NaN where a row sees no key."""
    qd, kd = q.cpu().double(), k.cpu().double().repeat_interleave(H // H_KV, dim=1)
    s = qd @ kd.transpose(-1, -2) * SCALE
    if mask is not None:
        s = s.masked_fill(~mask.repeat(q.shape[0] // mask.shape[0], 1, 1, 1), -math.inf)
    e = (s - s.amax(-1, keepdim=True)).exp()
    total = e.sum(-1)
    off = e.masked_fill(torch.eye(N, dtype=torch.bool), 0.0).sum(-1)
    return torch.stack((off / total, e[..., 0] / total), dim=-1)


def _bound(q: torch.Tensor, k: torch.Tensor) -> float:
    """Relative error allowed per row: twice a score's float32 rounding (d * eps32 * scale *
    sum_j |q_j k_j|) on each side of the ratio, plus the float32 exponentials' error of a few
    eps32 times the largest exponent |s - m| (~60 here)."""
    qd, kd = q.cpu().double().abs(), k.cpu().double().abs().repeat_interleave(H // H_KV, dim=1)
    score = D * EPS32 * SCALE * float((qd @ kd.transpose(-1, -2)).max())
    return 4 * score + 8 * EPS32 * 64


def _check(dtype: torch.dtype, device: str, kind: str, layers: int = 1) -> None:
    q, k = _inputs(dtype, device)
    if layers > 1:  # layers stacked along the batch, as the capture holds them: the mask repeats
        q, k = q.repeat(layers, 1, 1, 1), k.repeat(layers, 1, 1, 1)
    given, causal, meaning = _masks(kind)
    got = fused_rows(q, k, None if given is None else given.to(device), causal, SCALE).cpu()
    want = _reference(q, k, meaning)
    assert got.dtype == torch.float64 and got.shape == want.shape
    keep = ~want.isnan()
    assert not got[keep].isnan().any()
    assert want[..., 0][keep[..., 0]].min() < 1e-15  # the extreme rows are there
    rel = ((got - want).abs() / want.abs().clamp(min=1e-300))[keep]
    assert rel.max() <= _bound(q, k), (float(rel.max()), _bound(q, k))


@interpreted
@pytest.mark.parametrize("kind", ["causal", "full", "padded", "window"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_fused_rows_equal_float64_softmax(dtype, kind):
    _check(dtype, "cpu", kind)


@interpreted
def test_fused_rows_stacked_layers_repeat_the_mask():
    """Two layers stacked along the batch with a per-prompt mask: batch element i reads mask
    row i mod b (the padded prompt's mask applies to its rows in both layers)."""
    _check(torch.float16, "cpu", "padded", layers=2)


@interpreted
def test_fused_rows_in_batch_chunks(monkeypatch):
    """Stacks beyond the kernel's 32-bit offsets go through it in chunks of whole mask periods
    (here a limit of 2.5 batch elements: chunks of one mask period, two elements)."""
    import sheafscope.fused_rows as fr

    q, k = _inputs(torch.float16, "cpu")
    q, k = q.repeat(3, 1, 1, 1), k.repeat(3, 1, 1, 1)
    given, _, _ = _masks("padded")
    whole = fused_rows(q, k, given, False, SCALE)
    calls = []
    kernel = fr._kernel
    monkeypatch.setattr(fr, "INT32_ELEMENTS", q[:1].numel() * 5 // 2)
    monkeypatch.setattr(fr, "_kernel", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    assert torch.equal(fused_rows(q, k, given, False, SCALE), whole)
    assert len(calls) == 3  # batch elements 0-1, 2-3, 4-5


@interpreted
def test_fused_rows_any_strides():
    """Queries and keys in the model's memory layout ((b, n, h, d) seen as (b, h, n, d)), as
    a capture holds them: the kernel reads them through their strides, no copy."""
    q, k = _inputs(torch.float16, "cpu")
    q2, k2 = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k))
    assert not q2.is_contiguous()
    assert torch.equal(fused_rows(q2, k2, None, True, SCALE), fused_rows(q, k, None, True, SCALE))


def _layers(dtype: torch.dtype, device: str, count: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """`count` layers of different values, each in the model's memory layout ((b, n, h, d)
    seen as (b, h, n, d)), as separate tensors: what a capture holds."""
    q, k = _inputs(torch.float64, "cpu")
    qs, ks = [], []
    for i in range(count):
        g = torch.Generator().manual_seed(100 + i)
        qi = q * (1 + 0.25 * i) + 0.1 * torch.randn(q.shape, generator=g, dtype=torch.float64)
        qs.append(qi.to(device, dtype).transpose(1, 2).contiguous().transpose(1, 2))
        ks.append(k.to(device, dtype).transpose(1, 2).contiguous().transpose(1, 2))
    return qs, ks


@interpreted
@pytest.mark.parametrize("kind", ["causal", "padded"])
def test_fused_stats_reads_layers_where_they_lie(kind):
    """Three layers of different values, each its own tensor in the model's layout, read
    through the offset table: the rows of stacking them, and of the float64 softmax."""
    qs, ks = _layers(torch.float16, "cpu", 3)
    given, causal, meaning = _masks(kind)
    got = fused_stats(qs, ks, given, causal, SCALE)
    assert torch.equal(got, fused_rows(torch.cat(qs), torch.cat(ks), given, causal, SCALE))
    q, k = torch.cat(qs), torch.cat(ks)
    want = _reference(q, k, meaning)
    rel = ((got - want).abs() / want.abs().clamp(min=1e-300))[~want.isnan()]
    assert rel.max() <= _bound(q, k), float(rel.max())


@interpreted
def test_fused_stats_layers_of_other_strides_or_beyond_32_bits(monkeypatch):
    """Layers of equal strides take one launch (the address table); layers whose strides
    differ, or whose offsets would pass the kernel's 32-bit limit (lowered here below one
    layer), go through it one layer at a time, with the same rows."""
    import sheafscope.fused_rows as fr

    qs, ks = _layers(torch.float16, "cpu", 3)
    given, causal, _ = _masks("padded")
    calls = []
    kernel = fr._kernel
    monkeypatch.setattr(fr, "_kernel", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    whole = fused_stats(qs, ks, given, causal, SCALE)
    assert len(calls) == 1
    mixed = [qs[0], qs[1].contiguous(), qs[2]]
    assert torch.equal(fused_stats(mixed, ks, given, causal, SCALE), whole)
    assert len(calls) == 4
    monkeypatch.setattr(fr, "INT32_ELEMENTS", qs[0].numel() * 2 // 3)
    assert torch.equal(fused_stats(qs, ks, given, causal, SCALE), whole)
    assert len(calls) == 7


def _check_sums(dtype: torch.dtype, device: str, kind: str) -> None:
    """sums=True against float64 sums of the float64 softmax's rows over the rows that count
    (with `valid`, prompt 1 counts its first 97 rows only; without, every row counts), and
    against summing the kernel's own rows (the same numbers, summed tile by tile)."""
    qs, ks = _layers(dtype, device, 3)
    given, causal, meaning = _masks(kind)
    given = None if given is None else given.to(device)
    rows = fused_stats(qs, ks, given, causal, SCALE).cpu()
    want_rows = _reference(torch.cat(qs), torch.cat(ks), meaning)
    nan_rows = kind == "padded-empty"  # then only `valid` keeps the NaN rows out
    for valid in (torch.arange(N)[None, :] < torch.tensor([N, 97])[:, None], None)[:1 if nan_rows else 2]:
        counted = torch.ones(B, N, dtype=torch.bool) if valid is None else valid
        counted = torch.stack((counted, counted), dim=-1)[:, None].repeat(3, 1, 1, 1)  # (3 B, 1, N, 2)
        counted[..., 0, 1] = False  # row 0 never counts in the first-token sum
        got = fused_stats(qs, ks, given, causal, SCALE, sums=True,
                          valid=None if valid is None else valid.to(device)).cpu()
        assert rows.isnan().any() == nan_rows
        want = torch.where(counted, want_rows, 0.0).sum(-2)
        own = torch.where(counted, rows, 0.0).sum(-2)
        assert got.shape == (3 * B, H, 2) and got.dtype == torch.float64 and not got.isnan().any()
        assert ((got - want).abs() <= want.abs() * _bound(torch.cat(qs), torch.cat(ks))).all()
        assert ((got - own).abs() <= own.abs() * 1e-13).all()


@interpreted
@pytest.mark.parametrize("kind", ["causal", "padded", "padded-empty", "window"])
def test_fused_stats_sums_over_the_rows_that_count(kind):
    _check_sums(torch.float16, "cpu", kind)


@interpreted
def test_fused_stats_sums_refuse_valid_rows_without_sums():
    qs, ks = _layers(torch.float16, "cpu", 2)
    with pytest.raises(ValueError, match="sums=True"):
        fused_stats(qs, ks, None, True, SCALE, valid=torch.ones(B, N, dtype=torch.bool))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["causal", "padded", "padded-empty", "window"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_fused_stats_sums_over_the_rows_that_count(dtype, kind):
    _check_sums(dtype, "cuda", kind)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["causal", "full", "padded", "window"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_fused_rows_equal_float64_softmax(dtype, kind):
    """The compiled kernel: tensor-core products of the half-precision inputs summed in
    float32 (float32 inputs: full float32 products, not TF32)."""
    _check(dtype, "cuda", kind)
    _check(dtype, "cuda", kind, layers=3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["causal", "padded"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_fused_stats_reads_layers_where_they_lie(dtype, kind):
    """The compiled kernel through the offset table (aligned: wide loads) equals it on the stack."""
    qs, ks = _layers(dtype, "cuda", 3)
    given, causal, _ = _masks(kind)
    given = None if given is None else given.cuda()
    got = fused_stats(qs, ks, given, causal, SCALE)
    assert torch.equal(got, fused_rows(torch.cat(qs), torch.cat(ks), given, causal, SCALE))


def _check_table_sums(dtype: torch.dtype, device: str) -> None:
    """table_sums, with the layers found through a table of offsets from an unrelated base
    tensor, equals fused_stats' sums of the same layers bit for bit; so does it after the
    table is rewritten for other layers of the shape (what a replayed tail graph does)."""
    from sheafscope.fused_rows import table_sums

    base = torch.empty(1, dtype=dtype, device=device)
    size = base.element_size()
    first_qs, first_ks = _layers(dtype, device, 3)
    for qs, ks in ((first_qs, first_ks), (first_qs[::-1], first_ks[::-1])):
        offsets = [(t.data_ptr() - base.data_ptr()) // size for t in (*qs, *ks)]
        table = torch.tensor(offsets, dtype=torch.int64, device=device)
        got = table_sums(qs[0], ks[0], base, table, len(qs), 1, True, SCALE)
        assert torch.equal(got, fused_stats(qs, ks, None, True, SCALE, sums=True))


@interpreted
def test_table_sums_find_the_layers_through_the_table():
    _check_table_sums(torch.float16, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_table_sums_find_the_layers_through_the_table(dtype):
    _check_table_sums(dtype, "cuda")
