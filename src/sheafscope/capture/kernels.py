"""Attention outputs: from the fused kernel torch has on the device, with its log-sum-exp, or
computed in blocks of query rows where no kernel applies (soft-capping, a position bias)."""

from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend

from sheafscope.capture.scores import Scores, masked, stat_dtype
from sheafscope.sheaf import row_stats_from_scores

# Scores per block of the chunked route (batch x heads x rows x keys): memory O(rows x n).
BLOCK_ELEMENTS = 1 << 24


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       scores: Scores) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Output (b, h, n, d_v), log-sum-exp (b, h, n) and the kernel's name, from the fused kernel
    that plain sdpa would run on these inputs. Raises RuntimeError where there is none."""
    n = q.shape[2]
    if q.device.type == "cpu":
        mask = None if scores.mask is None else _additive(scores.mask, q.dtype)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, scores.causal, attn_mask=mask, scale=scores.scale)
        return out, lse, "flash-cpu"
    if q.device.type != "cuda":
        raise RuntimeError(f"no fused attention kernel with log-sum-exp on {q.device.type}")
    groups = q.shape[1] // k.shape[1]
    if groups > 1 and scores.mask is not None:  # as transformers' sdpa call: key heads repeated
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    # The kernel plain sdpa would choose for the same arguments (on Hopper, cuDNN's), so that
    # recording costs no kernel speed against the model's own forward pass; it takes grouped
    # key heads as they are, as in sdpa.
    choice = torch._fused_sdp_choice(q, k, v, scores.mask, 0.0, scores.causal, scale=scores.scale,
                                     enable_gqa=k.shape[1] != q.shape[1])
    mask = None if scores.mask is None else _additive(scores.mask, q.dtype)
    if choice == SDPBackend.CUDNN_ATTENTION.value:
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, mask, True, 0.0, scores.causal, False, scale=scores.scale)[:2]
        return out, lse.reshape(q.shape[:3]), "cudnn-cuda"
    if choice == SDPBackend.FLASH_ATTENTION.value and mask is None:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, scores.causal, False, scale=scores.scale)[:2]
        return out, lse, "flash-cuda"
    # Otherwise the memory-efficient kernel: sdpa's choice, or better than the math it would fall
    # back to (float32 with grouped key heads); it wants as many key heads as query heads.
    if k.shape[1] != q.shape[1]:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    bias = None if mask is None else _aligned(mask, q)
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, bias, True, 0.0, scores.causal, scale=scores.scale)[:2]
    return out, lse[..., :n], "efficient-cuda"


def block_statistics(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None,
                     scores: Scores) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Exact (1 - A_ii, A_i0) of every row (b, h, n) and, given v, the attention output
    (b, h, n, d_v), in blocks of query rows."""
    b, h, n, _ = q.shape
    dtype = stat_dtype(q)
    step = max(1, BLOCK_ELEMENTS // max(1, b * h * k.shape[2]))
    out = None if v is None else torch.empty(b, h, n, v.shape[-1], dtype=v.dtype, device=v.device)
    off = torch.empty(b, h, n, dtype=dtype, device=q.device)
    first = torch.empty_like(off)
    groups = h // k.shape[1]
    for q0 in range(0, n, step):
        q1 = min(n, q0 + step)
        s = scores.block(q, k, q0, q1, dtype)
        own = torch.arange(q0, q1, device=q.device).expand(b, h, -1)
        off[:, :, q0:q1], first[:, :, q0:q1] = row_stats_from_scores(s, own)
        if out is not None:
            p = torch.softmax(s, dim=-1).to(v.dtype).reshape(b, k.shape[1], groups * (q1 - q0), -1)
            out[:, :, q0:q1] = (p @ v).reshape(b, h, q1 - q0, -1)
    return out, off, first


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return masked(torch.zeros(mask.shape, dtype=dtype, device=mask.device), mask)


def _aligned(mask: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """An additive mask as the memory-efficient kernel takes it: expanded to (b, h, n, kv), rows
    stored 16-byte aligned."""
    kv = mask.shape[-1]
    bias = torch.zeros(*mask.shape[:-1], kv + (-kv) % 8, dtype=q.dtype, device=q.device)[..., :kv]
    bias.copy_(mask)
    return bias.expand(q.shape[0], q.shape[1], q.shape[2], kv)
