"""Which attention kernel plain sdpa picks on this GPU for a 7B layer (32 query heads, 8 key
heads, head size 128, bfloat16), what each of torch's fused kernels costs there, and whether the
fast path's kernel (`capture.kernels.attention_with_lse`) is sdpa's, with the same output and a
log-sum-exp equal to one from float32 scores.

    python benchmarks/sdpa_kernels.py --out OUT.json      (needs a CUDA GPU)
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from sheafscope.capture.kernels import attention_with_lse
from sheafscope.capture.scores import Scores

WINDOW = 4096  # Mistral-7B's sliding window


def timed_ms(f, repeats: int = 10) -> float:
    f()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        f()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3


def backend_ms(backend: SDPBackend, *args, **kwargs) -> float | str:
    try:
        with sdpa_kernel([backend]):
            return timed_ms(lambda: F.scaled_dot_product_attention(*args, **kwargs))
    except RuntimeError as e:
        return str(e).splitlines()[0][:80]


def measure(n: int) -> dict:
    g = torch.Generator("cuda").manual_seed(n)
    q, k, v = (torch.randn(1, h, n, 128, device="cuda", dtype=torch.bfloat16, generator=g) for h in (32, 8, 8))
    kr, vr = k.repeat_interleave(4, 1), v.repeat_interleave(4, 1)
    i = torch.arange(n, device="cuda")
    out = {f"n={n} gqa {b.name}_ms": backend_ms(b, q, k, v, is_causal=True, enable_gqa=True)
           for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION)}
    # as transformers calls sdpa: grouped heads without a mask, repeated heads with one
    cases = {"causal": None}
    if n > WINDOW:
        cases["window"] = ((i[None] <= i[:, None]) & (i[:, None] - i[None] < WINDOW))[None, None]
    for tag, mask in cases.items():
        kk, vv, gqa = (k, v, True) if mask is None else (kr, vr, False)
        sdpa = lambda: F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, is_causal=mask is None,  # noqa: E731
                                                      enable_gqa=gqa)
        choice = torch._fused_sdp_choice(q, kk, vv, mask, 0.0, mask is None, scale=None, enable_gqa=gqa)
        row = {"sdpa_choice": SDPBackend(choice).name, "sdpa_ms": timed_ms(sdpa)}
        scores = Scores(128 ** -0.5, mask is None, mask)
        got, lse, row["ours"] = attention_with_lse(q, kk, vv, scores)
        row["ours_ms"] = timed_ms(lambda: attention_with_lse(q, kk, vv, scores))
        row["out_maxdiff_vs_sdpa"] = float((got - sdpa()).abs().max())
        rows = torch.linspace(0, n - 1, 64, device="cuda").long()
        s = (q[0, :, rows].float() @ kr[0].float().transpose(-1, -2)) * 128 ** -0.5
        allowed = (i[None] <= rows[:, None]) if mask is None else mask[0, 0, rows]
        row["lse_maxdiff"] = float((torch.logsumexp(s.masked_fill(~allowed, -torch.inf), -1)
                                    - lse[0][:, rows].float()).abs().max())
        for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
            row[b.name + "_ms"] = backend_ms(b, q, kr, vr, attn_mask=mask, is_causal=mask is None)
        out[f"n={n} {tag}"] = row
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="512,2048,8192,32768")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    res = {"torch": torch.__version__, "cudnn": torch.backends.cudnn.version(), "gpu": torch.cuda.get_device_name()}
    for n in (int(x) for x in args.lengths.split(",")):
        res.update(measure(n))
        print(json.dumps({k: v for k, v in res.items() if k.startswith(f"n={n} ")}, indent=1), flush=True)
    json.dump(res, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
