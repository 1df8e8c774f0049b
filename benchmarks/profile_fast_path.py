"""Where the fast path's time goes, next to a plain forward: torch.profiler on both.

For each configuration (one prompt of n random tokens, or one batch of short prompts) this
times a (plain sdpa forward of the trunk) and b (capture_batch + prompt_result, as
bench_traces.py does), then profiles one run of each and reports: wall time, GPU kernel time
(sum over kernels; on the CPU none), how many aten ops ran, host syncs (cudaStreamSynchronize,
cudaDeviceSynchronize, blocking copies), and b's most expensive ops by host time. A forward
whose GPU kernel time is well below its wall time is host-bound (kernel launches, Python);
one near it is GPU-bound.

    python benchmarks/profile_fast_path.py --model random:mistral-7b --dtype bfloat16 \
        --configs 16,512,2048,8192,batch32 --out prof.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_traces as bt  # noqa: E402


def groups_for(config: str, loaded, seed: int) -> list[list]:
    vocab = loaded.model.get_input_embeddings().weight.shape[0]
    if config.startswith("batch"):
        size = int(config[len("batch"):])
        prompts = [p.to(loaded.device) for p in bt.corpus(size, vocab, seed)]
        return bt.batches(prompts, size)
    return [[bt.token_ids(int(config), vocab, seed).to(loaded.device)]]


def timed(fn, device, repeats: int) -> list[float]:
    fn()
    bt._sync(device)
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        bt._sync(device)
        out.append(time.perf_counter() - t)
    return out


def profiled(fn, device, top: int) -> dict[str, Any]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        bt._sync(device)
    events = list(prof.events())
    aten = [e for e in events if e.name.startswith("aten::")
            and not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::"))]
    gpu_us = sum(e.device_time for e in events if e.device_type == torch.autograd.DeviceType.CUDA) if device.type == "cuda" else 0.0
    syncs = [e for e in events if e.name in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")]
    copies = [e for e in events if e.name.startswith("cudaMemcpy") and "Async" not in e.name]
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    ops: dict[str, list[float]] = {}  # top-level aten op -> [calls, host us including children]
    for e in aten:
        entry = ops.setdefault(e.name, [0, 0.0])
        entry[0] += 1
        entry[1] += e.cpu_time_total
    launches = sum(1 for e in events if e.name in ("cudaLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC",
                                                    "cudaMemcpyAsync", "cudaMemsetAsync", "cudaGraphLaunch"))
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)
    device_table = (prof.key_averages().table(sort_by="self_device_time_total", row_limit=top)
                    if device.type == "cuda" else "")
    return {
        "gpu_kernel_s": gpu_us / 1e6,
        "gpu_kernels": len(kernels),
        "aten_ops": len(aten),
        "launches": launches,
        "ops": ops,
        "syncs": len(syncs),
        "sync_s": sum(e.cpu_time for e in syncs) / 1e6,
        "blocking_copies": len(copies),
        "table": table,
        "device_table": device_table,
    }


def op_difference(a_ops: dict[str, list[float]], b_ops: dict[str, list[float]], limit: int = 30) -> str:
    """The top-level ops b calls more often than a: name, extra calls, b's host time in them."""
    extra = []
    for name, (calls, us) in b_ops.items():
        more = calls - a_ops.get(name, [0, 0.0])[0]
        if more > 0:
            extra.append((us * more / calls, more, name))
    extra.sort(reverse=True)
    lines = [f"ops b calls more often than a ({sum(m for _, m, _ in extra)} calls):"]
    lines += [f"  {name:48s} +{more:4d}  {us / 1e3:7.2f} ms host" for us, more, name in extra[:limit]]
    return "\n".join(lines)


def add_arguments(ap: argparse.ArgumentParser, repeats: int) -> None:
    """The model, configurations and output options this script shares with host_phases.py."""
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device")
    ap.add_argument("--dtype")
    ap.add_argument("--context", type=int)
    ap.add_argument("--config", help="integer config overrides for random twins, e.g. hidden_size=256,head_dim=8")
    ap.add_argument("--configs", default="16,512,batch32", help="prompt lengths, or batchN: one batch of N short prompts")
    ap.add_argument("--repeats", type=int, default=repeats)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out")


def write_rows(out: str | None, args: argparse.Namespace, loaded, rows: list) -> None:
    """The JSON file this script, host_phases.py and capture_overhead.py write: their
    arguments, the machine and model (bench_traces.environment) and their rows."""
    if out:
        Path(out).write_text(json.dumps({"args": vars(args), "environment": bt.environment(loaded), "rows": rows}, indent=1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap, repeats=5)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args(argv)

    from sheafscope.restriction import norms_sq

    loaded = bt.load(args)
    norm_sq = norms_sq(loaded.adapter).numpy()
    device = loaded.device
    rows = []
    for config in [c for c in args.configs.split(",") if c]:
        groups = groups_for(config, loaded, args.seed)
        row: dict[str, Any] = {"config": config}
        for method, path, fn in (("a", "sdpa", bt.run_plain), ("b", "fast", bt.run_fast)):
            bt.set_path(loaded, path)
            times = timed(lambda: fn(loaded, groups, norm_sq), device, args.repeats)
            prof = profiled(lambda: fn(loaded, groups, norm_sq), device, args.top)
            row[method] = {"median_s": statistics.median(times), "times_s": times, **prof}
        row["b/a"] = row["b"]["median_s"] / row["a"]["median_s"]
        rows.append(row)
        a, b = row["a"], row["b"]
        print(f"\n=== {config}: a {a['median_s'] * 1e3:.1f} ms (gpu {a['gpu_kernel_s'] * 1e3:.1f} ms, {a['aten_ops']} ops, "
              f"{a['launches']} launches, {a['syncs']} syncs)  b {b['median_s'] * 1e3:.1f} ms (gpu {b['gpu_kernel_s'] * 1e3:.1f} ms, "
              f"{b['aten_ops']} ops, {b['launches']} launches, {b['syncs']} syncs, {b['sync_s'] * 1e3:.1f} ms in syncs, "
              f"{b['blocking_copies']} blocking copies)  b/a {row['b/a']:.2f}", flush=True)
        print(op_difference(a["ops"], b["ops"]), flush=True)
        print(b["table"], flush=True)
        if b["device_table"]:
            print("a, by device time:\n" + a["device_table"] + "\nb, by device time:\n" + b["device_table"], flush=True)
    write_rows(args.out, args, loaded, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
