"""Probe: where the lse route's attention call spends host time inside a forward (512 tokens)."""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_traces as bt  # noqa: E402
import profile_fast_path as pf  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    pf.add_arguments(ap, repeats=10)
    args = ap.parse_args()
    import torch
    from torch.profiler import ProfilerActivity, profile

    from sheafscope import capture_fast as cf
    from sheafscope.capture_fast import DiagonalCapture, padded_batch

    loaded = bt.load(args)
    model, device = loaded.model, loaded.device
    aten = torch.ops.aten
    per_call: list[float] = []
    real_fused = cf._fused_cuda

    def timed_fused(*a):
        t = time.perf_counter()
        r = real_fused(*a)
        per_call.append(time.perf_counter() - t)
        return r

    def cudnn_nolse(q, k, v, bias, causal, scale):
        res = aten._scaled_dot_product_cudnn_attention.default(q, k, v, bias, False, 0.0, causal, False, scale=scale)
        return res[0], torch.zeros(q.shape[:3], device=q.device), "cudnn"

    def cudnn_lse_direct(q, k, v, bias, causal, scale):
        res = aten._scaled_dot_product_cudnn_attention.default(q, k, v, bias, True, 0.0, causal, False, scale=scale)
        return res[0], res[1].reshape(q.shape[:3]), "cudnn"

    def sdpa_as_route(q, k, v, bias, causal, scale):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, bias, is_causal=causal, scale=scale, enable_gqa=True)
        return out, torch.zeros(q.shape[:3], device=q.device), "sdpa"

    for config in [c for c in args.configs.split(",") if c]:
        (ids, valid, mask), = [padded_batch(g) for g in pf.groups_for(config, loaded, args.seed)]

        def route(patch=None):
            def run():
                with torch.no_grad(), (mock.patch.object(cf, "_fused_cuda", patch) if patch else mock.patch.object(cf, "_fused_cuda", real_fused)):
                    with DiagonalCapture(model, valid=valid, keep_positions=False) as cap:
                        cap._finish = lambda: None
                        cap._hold = lambda *a: None
                        model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)
            return run

        def plain():
            with torch.no_grad():
                model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)

        variants = {"a": ("sdpa", plain), "fn": ("fast", plain), "route": ("fast", route()),
                    "route/direct-lse": ("fast", route(cudnn_lse_direct)),
                    "route/cudnn-nolse": ("fast", route(cudnn_nolse)),
                    "route/F.sdpa": ("fast", route(sdpa_as_route)),
                    "route/timed": ("fast", route(timed_fused))}
        times = {k: [] for k in variants}
        hosts = {k: [] for k in variants}
        for rep in range(args.repeats + 2):
            for name, (path, fn) in variants.items():
                bt.set_path(loaded, path)
                bt._sync(device)
                t = time.perf_counter()
                fn()
                th = time.perf_counter()
                bt._sync(device)
                if rep >= 2:
                    times[name].append((time.perf_counter() - t) * 1e3)
                    hosts[name].append((th - t) * 1e3)
        print(f"=== {config}")
        for k in variants:
            print(f"  {k:20s} wall {statistics.median(times[k]):7.2f}  host {statistics.median(hosts[k]):7.2f}")
        pc = sorted(x * 1e6 for x in per_call[-32 * args.repeats:])
        print(f"  _fused_cuda per call us: min {pc[0]:.0f} p25 {pc[len(pc)//4]:.0f} med {pc[len(pc)//2]:.0f} p90 {pc[9*len(pc)//10]:.0f} max {pc[-1]:.0f}")
        for name in ("a", "route", "route/F.sdpa"):
            path, fn = variants[name]
            bt.set_path(loaded, path)
            fn()
            bt._sync(device)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                fn()
                bt._sync(device)
            api = Counter()
            api_us = Counter()
            for e in prof.events():
                if e.name.startswith("cu") and not e.name.startswith("cutlass") and e.device_type == torch.autograd.DeviceType.CPU:
                    api[e.name] += 1
                    api_us[e.name] += e.cpu_time_total
            print(f"  {name}: " + ", ".join(f"{n} {c} ({api_us[n] / 1e3:.2f} ms)" for n, c in api.most_common()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
