"""The table-read maxima kernel (table_maxima.py) against capture_fast._max_abs, one tensor at a
time: equal bit for bit (a maximum rounds nothing), NaN and infinities included, with the
tensors found through a table of their offsets from an unrelated base tensor. On the CPU under
Triton's interpreter (tests/conftest.py), on a GPU compiled."""

from __future__ import annotations

import pytest
import torch

from sheafscope.capture_fast import _max_abs
from sheafscope.fused_rows import has_triton, runs_on
from sheafscope.table_maxima import BLOCK, table_maxima

pytestmark = pytest.mark.skipif(not has_triton(), reason="Triton is a test dependency (pip install -e '.[dev]')")
interpreted = pytest.mark.skipif(not runs_on(torch.device("cpu")), reason="a GPU machine: the cuda tests cover the kernel")


def _check(dtype: torch.dtype, device: str) -> None:
    g = torch.Generator().manual_seed(0)
    # (b, n, d) with n * d over two blocks, so that one element spans three programs
    streams = [(torch.randn(2, 9, BLOCK // 4, generator=g) * (i + 1)).to(device, dtype) for i in range(5)]
    streams[2][1, 3, 7] = float("nan")  # one element's maximum NaN, the other's not
    streams[3][0, 8, -1] = -float("inf")  # in the last, partial block
    streams[4][1] = 0.0
    base = torch.empty(1, dtype=dtype, device=device)
    size = base.element_size()
    table = torch.tensor([(h.data_ptr() - base.data_ptr()) // size for h in streams], dtype=torch.int64, device=device)
    got = table_maxima(streams[0], base, table, len(streams), 1)
    want = torch.stack([_max_abs(h, (-2, -1)) for h in streams])
    assert got.dtype == dtype and got.shape == (5, 2)
    assert torch.equal(got.isnan(), want.isnan()) and bool(got[2, 1].isnan()) and not bool(got[2, 0].isnan())
    assert torch.equal(got.nan_to_num(nan=-1.0), want.nan_to_num(nan=-1.0))
    assert float(got[3, 0]) == float("inf") and float(got[4, 1]) == 0.0


@interpreted
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_table_maxima_equal_each_tensors_own(dtype):
    _check(dtype, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_table_maxima_equal_each_tensors_own(dtype):
    _check(dtype, "cuda")
