"""Device and host time of the attention kernels the fast path can take its lse from, next to
what scaled_dot_product_attention picks for a plain forward (Mistral-7B heads, bfloat16, causal,
one prompt): which kernel returns lse at the least extra cost, per length.

    python benchmarks/attention_kernels.py --lengths 128,512,1024,2048,8192 --out attention_kernels.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def timed(fn, calls: int = 32, repeats: int = 10) -> tuple[float, float]:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    hosts, devs = [], []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        hosts.append((time.perf_counter() - t) * 1e3)
        b.record()
        b.synchronize()
        devs.append(a.elapsed_time(b))
    return statistics.median(hosts), statistics.median(devs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="128,512,1024,2048,8192")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    aten = torch.ops.aten
    dev, dt, h, n_kv, d = "cuda", torch.bfloat16, 32, 8, 128
    rows = []
    for n in [int(x) for x in args.lengths.split(",") if x]:
        q = torch.randn(1, n, h, d, device=dev, dtype=dt).transpose(1, 2)
        k = torch.randn(1, n, n_kv, d, device=dev, dtype=dt).transpose(1, 2)
        v = torch.randn(1, n, n_kv, d, device=dev, dtype=dt).transpose(1, 2)
        choice = torch._fused_sdp_choice(q, k, v, None, 0.0, True, scale=d**-0.5, enable_gqa=True)
        kr, vr = (t.repeat_interleave(h // n_kv, dim=1) for t in (k, v))
        fns = {
            "F.sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
            "cudnn lse": lambda: aten._scaled_dot_product_cudnn_attention.default(q, k, v, None, True, 0.0, True, False),
            "cudnn no lse": lambda: aten._scaled_dot_product_cudnn_attention.default(q, k, v, None, False, 0.0, True, False),
            "flash (lse)": lambda: aten._scaled_dot_product_flash_attention.default(q, k, v, 0.0, True, False),
            "efficient lse": lambda: aten._scaled_dot_product_efficient_attention.default(q, kr, vr, None, True, 0.0, True),
        }
        row = {"n": n, "sdpa_choice": str(torch.nn.attention.SDPBackend(int(choice))), "ms_per_32_calls": {}}
        for name, fn in fns.items():
            try:
                host, device = timed(fn)
                row["ms_per_32_calls"][name] = {"host": host, "device": device}
            except RuntimeError as e:
                row["ms_per_32_calls"][name] = {"error": str(e).splitlines()[0][:160]}
        rows.append(row)
        print(f"\n=== n={n}: sdpa picks {row['sdpa_choice']}")
        for name, t in row["ms_per_32_calls"].items():
            print(f"  {name:14s} " + (t["error"] if "error" in t else f"host {t['host']:7.3f}  device {t['device']:7.3f} ms"))
    if args.out:
        env = {"torch": torch.__version__, "device": torch.cuda.get_device_name(),
               "cudnn": torch.backends.cudnn.version()}
        Path(args.out).write_text(json.dumps({"args": vars(args), "environment": env, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
