"""Device time of each step of the fast path's statistics, on synthetic held layers, next to
alternatives: where the kernels b adds after a GPU-bound forward pass spend their time.

For a Mistral-7B shape (32 query heads, 8 KV heads, d = 128) in bfloat16 this builds the
queries and keys the attention function holds for `--layers` layers of one prompt of n tokens
(laid out as the model makes them: (b, n, h, d) memory seen as (b, h, n, d)) and times, with
CUDA events, the median over --repeats of:

    cat_q, cat_k           stacking the held layers (what _process_group does)
    scores_half            diag_stats._row_scores_half_cuda on the stack (s_ii, s_i0)
    scores_half_layers     the same, one layer at a time from the held views (no stack)
    scores_f32             diag_stats._row_scores (float32 copies, the fallback)
    lse_rows               the whole lse route on the stack
    k_double               the float64 copy of the stacked keys the slot route makes
    slots                  diag_stats.slot_rows over the stack in chunks, as _refine_slots runs it
    slots_f32acc           a slot route whose scores come from bf16 x bf16 products accumulated
                           in float32 (no float64 keys), for comparison
    record                 the where/sum that reduces rows to per-head sums

    python benchmarks/stats_kernels.py --lengths 512,2048,8192 --out stats_kernels.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from sheafscope import diag_stats as ds  # noqa: E402


def held(layers: int, n: int, h: int, n_kv: int, d: int, dtype, device, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    qs = [torch.randn(1, n, h, d, device=device, dtype=dtype, generator=gen).transpose(1, 2) for _ in range(layers)]
    ks = [torch.randn(1, n, n_kv, d, device=device, dtype=dtype, generator=gen).transpose(1, 2) for _ in range(layers)]
    return qs, ks


def timed(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b))
    return statistics.median(out)


def slots_f32acc(q, k, flags, width, scale):
    """slot_rows' arithmetic with float32-accumulated scores from the half-precision inputs."""
    b, h, n, d = q.shape
    n_kv, kv = k.shape[1], k.shape[2]
    rank = torch.where(flags, torch.arange(n, 0, -1, device=q.device), 0)
    top, rows = rank.topk(width, dim=-1, sorted=False)
    qs = q.gather(2, rows[..., None].expand(b, h, width, d))
    qg = ds.grouped(qs, n_kv).reshape(b * n_kv, (h // n_kv) * width, d)
    s = torch.bmm(qg, k.reshape(b * n_kv, kv, d).transpose(1, 2), out_dtype=torch.float32)
    s = s.view(b, h, width, kv).double().mul_(scale)
    s.masked_fill_(torch.arange(kv, device=q.device) > rows[..., None], -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    first = s[..., 0] - lse
    s.scatter_(-1, rows[..., None], -math.inf)
    off = torch.logsumexp(s, dim=-1).sub_(lse)
    return torch.stack((off, first), dim=-1).exp_()


def native_stack(tensors):
    """Layers stacked in the model's own layout, (B, n, h, d) memory seen as (B, h, n, d)."""
    return torch.cat([t.transpose(1, 2) for t in tensors]).transpose(1, 2)


def scores_native(q, k):
    """s_ii and s_i0 (B, h, n, 2) float32 from q, k in (B, n, h, d) memory: no permuted copies."""
    B, h, n, d = q.shape
    n_kv = k.shape[1]
    g = h // n_kv
    qn, kn = q.transpose(1, 2), k.transpose(1, 2)  # (B, n, h, d) contiguous
    out = torch.empty(B, n, h, 2, device=q.device)
    out[..., 0] = torch.bmm(qn.reshape(B * n * n_kv, g, d), kn.reshape(B * n * n_kv, d, 1),
                            out_dtype=torch.float32).view(B, n, h)
    # every query against key 0 of every KV head (as cheap as one: the product reads q once),
    # then each head's own
    first = torch.bmm(qn.reshape(B, n * h, d), kn[:, 0].transpose(1, 2), out_dtype=torch.float32)
    out[..., 1] = first.view(B, n, n_kv, g, n_kv).diagonal(dim1=2, dim2=4).transpose(-1, -2).reshape(B, n, h)
    return out.transpose(1, 2)


def attention_calls(n, h, n_kv, d, dev, dt, calls=32):
    """Host and device ms of `calls` attention calls: F.sdpa (a plain forward) vs the fast
    path's fused call that returns lse (capture_fast._fused_cuda)."""
    import time

    from sheafscope.capture_fast import _fused_cuda

    q = torch.randn(1, n, h, d, device=dev, dtype=dt).transpose(1, 2)
    k = torch.randn(1, n, n_kv, d, device=dev, dtype=dt).transpose(1, 2)
    v = torch.randn(1, n, n_kv, d, device=dev, dtype=dt).transpose(1, 2)
    fns = {
        "F.sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        "fused_cuda": lambda: _fused_cuda(q, k, v, None, True, d**-0.5),
    }
    out = {}
    for name, fn in fns.items():
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        hosts, devs = [], []
        for _ in range(10):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            t = time.perf_counter()
            for _ in range(calls):
                fn()
            hosts.append((time.perf_counter() - t) * 1e3)
            b.record()
            b.synchronize()
            devs.append(a.elapsed_time(b))
        out[name] = {"host_ms": statistics.median(hosts), "device_ms": statistics.median(devs)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="512,2048,8192")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--width", type=int, default=8, help="slots per head")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    dev, dt = torch.device("cuda"), torch.bfloat16
    h, n_kv, d = args.heads, args.kv_heads, args.head_dim
    scale = d**-0.5
    rows_out = []
    for n in [int(x) for x in args.lengths.split(",") if x]:
        # as many layers as _process_group would stack within HOLD_BYTES_CUDA
        per_layer = (h + n_kv) * n * d * 2 + h * n * 4
        layers = max(1, min(args.layers, (1 << 30) // per_layer + 1))
        qs, ks = held(layers, n, h, n_kv, d, dt, dev)
        q, k = torch.cat(qs), torch.cat(ks)
        lse = torch.randn(layers, h, n, device=dev) + 8
        flags = torch.zeros(layers, h, n, dtype=torch.bool, device=dev)
        flags[:, :, 1:4] = True
        rows = torch.rand(layers, h, n, 2, device=dev, dtype=torch.float64)
        weights = torch.ones(1, 1, n, 2, dtype=torch.bool, device=dev)
        step = ds.rows_per_block(None, layers * h * d, n, dev)
        budget = ds.block_elements(dev) // 4
        chunk = max(1, budget // (n_kv * n * d + h * args.width * n))

        def slots():
            for c0 in range(0, layers, chunk):
                ds.slot_rows(q[c0:c0 + chunk], k[c0:c0 + chunk], flags[c0:c0 + chunk], args.width, None, True, scale, None)

        def slots_acc():
            for c0 in range(0, layers, chunk):
                slots_f32acc(q[c0:c0 + chunk], k[c0:c0 + chunk], flags[c0:c0 + chunk], args.width, scale)

        def scores_layers():
            out = torch.empty(layers, h, n, 2, device=dev)
            for i in range(layers):
                out[i] = ds._row_scores_half_cuda(qs[i], ks[i], ds.rows_per_block(None, h * d, n, dev))[0]

        qn, kn = native_stack(qs), native_stack(ks)
        steps = {
            "cat_q": lambda: torch.cat(qs),
            "cat_q_native": lambda: native_stack(qs),
            "scores_native": lambda: scores_native(qn, kn),
            "cat_k": lambda: torch.cat(ks),
            "scores_half": lambda: ds._row_scores_half_cuda(q, k, step),
            "scores_half_layers": scores_layers,
            "scores_f32": lambda: ds._row_scores(q, k, step),
            "lse_rows": lambda: ds.lse_rows(q, k, lse, None, scale, None, None, None, True),
            "k_double": lambda: k.double(),
            "slots": slots,
            "slots_f32acc": slots_acc,
            "slots_f32acc_w4": lambda: [slots_f32acc(q[c0:c0 + chunk], k[c0:c0 + chunk], flags[c0:c0 + chunk], 4, scale)
                                        for c0 in range(0, layers, chunk)],
            "record": lambda: torch.where(weights, rows, 0.0).sum(-2),
        }
        row = {"n": n, "layers": layers, "ms": {}}
        for name, fn in steps.items():
            try:
                row["ms"][name] = timed(fn, args.repeats)
            except (RuntimeError, TypeError) as e:
                row["ms"][name] = None
                print(f"  {name}: {str(e).splitlines()[0][:120]}", file=sys.stderr)
        err = (scores_native(qn, kn) - ds._row_scores_half_cuda(q, k, step)).abs().max().item()
        row["scores_native_vs_half_max_abs"] = err
        row["attention_calls"] = attention_calls(n, h, n_kv, d, dev, dt)
        rows_out.append(row)
        print(f"\n=== n={n}, {layers} layers stacked (device ms, median of {args.repeats})")
        for name, ms in row["ms"].items():
            print(f"  {name:20s} {'-' if ms is None else f'{ms:8.3f}'}")
        print(f"  scores_native vs scores_half: max abs difference {err:.3g}")
        for name, t in row["attention_calls"].items():
            print(f"  32 x {name:12s} host {t['host_ms']:7.3f} ms  device {t['device_ms']:7.3f} ms")
        del qs, ks, q, k
        torch.cuda.empty_cache()
    if args.out:
        env = {"torch": torch.__version__, "device": torch.cuda.get_device_name()}
        Path(args.out).write_text(json.dumps({"args": vars(args), "environment": env, "rows": rows_out}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
