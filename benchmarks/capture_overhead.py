"""What each part of the fast path adds to a forward pass, variants timed round-robin (one of
each in turn, so that a drifting machine shifts them alike), wall clock with a device sync
(and the host time before that sync: a forward whose host time is its wall time is host-bound),
and each variant's median difference from the a of its own round (paired):

    a            the plain forward of the trunk with sdpa attention
    fn           the trunk with sheafscope's attention function, no capture active
    fn+hidden    ... plus HiddenMax (max |h| per stream, from the blocks' wrapped forward)
    fn+route     ... plus a DiagonalCapture whose attention calls run (the lse route's fused
                 kernel, or sdpa for short prompts) but hold nothing
    fn+route/fa  ... the same with flash attention where cuDNN would run (the lse route's kernel
                 choice: what a host-bound forward pays for cuDNN's launch)
    fn+refs      fn+route with the layers' queries and keys kept in a plain list (what holding
                 costs beyond its own Python: the memory the forward cannot reuse)
    fn+capture   ... plus a DiagonalCapture holding the layers' inputs (statistics not computed)
    capture      ... both, and the statistics computed (launch_batch without the results)
    b            launch_batch, its result() and prompt_result, as bench_traces.py's method b
                 (the tail replayed from a CUDA graph where the shape's addresses repeat)
    b/op-by-op   b with launch_batch(tail_graph=False): the tail launched op by op, what a
                 forward pass pays whose shape or addresses did not repeat
    b/hold=N     b with DiagonalCapture(hold_bytes=N): held layers processed whenever they
                 exceed N bytes (--hold-bytes N,M,...)

    python benchmarks/capture_overhead.py --model random:mistral-7b --dtype bfloat16 --configs 16,512
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import sys
import time
from unittest import mock
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_traces as bt  # noqa: E402
import profile_fast_path as pf  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    pf.add_arguments(ap, repeats=30)
    ap.add_argument("--hold-bytes", default="", help="comma-separated hold budgets: a b/hold=N variant each")
    ap.add_argument("--variants", default="", help="comma-separated variants to run (default: all; a always runs)")
    args = ap.parse_args(argv)

    import torch

    from sheafscope import capture_fast as cf
    from sheafscope.capture_fast import DiagonalCapture, HiddenMax, padded_batch
    from sheafscope.restriction import norms_sq
    from sheafscope.tail_graphs import KERNEL_NAME

    loaded = bt.load(args)
    norm_sq = norms_sq(loaded.adapter).numpy()
    model, blocks, device = loaded.model, loaded.adapter.blocks, loaded.device
    rows = []
    for config in [c for c in args.configs.split(",") if c]:
        groups = pf.groups_for(config, loaded, args.seed)
        batch = [padded_batch(g) for g in groups]

        def trunk(capture: bool, hidden: bool, finish: bool = False, hold: bool = True, flash: bool = False,
                  refs: bool = False):
            kept: list = []
            with torch.no_grad(), (mock.patch.object(cf, "_sdpa_would_use_cudnn", lambda *a: False) if flash
                                   else contextlib.nullcontext()):
                for (ids, valid, mask) in batch:
                    with (DiagonalCapture(model, valid=valid, keep_positions=False) if capture else contextlib.nullcontext()) as cap, \
                         (HiddenMax(blocks, valid) if hidden else contextlib.nullcontext()):
                        if cap is not None and not finish:
                            cap._finish = lambda: None  # the statistics are not computed
                        if cap is not None and not hold:
                            cap._hold = cap._hold_planned = lambda *a: None
                        if cap is not None and refs:
                            cap._hold = cap._hold_planned = lambda *a: kept.append(a)
                        model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)

        variants = {
            "a": ("sdpa", lambda: bt.run_plain(loaded, groups, norm_sq)),
            "fn": ("fast", lambda: trunk(False, False)),
            "fn+hidden": ("fast", lambda: trunk(False, True)),
            "fn+route": ("fast", lambda: trunk(True, False, hold=False)),
            "fn+route/fa": ("fast", lambda: trunk(True, False, hold=False, flash=True)),
            "fn+refs": ("fast", lambda: trunk(True, False, refs=True)),
            "fn+capture": ("fast", lambda: trunk(True, False)),
            "capture": ("fast", lambda: trunk(True, True, finish=True)),
            "b": ("fast", lambda: bt.run_fast(loaded, groups, norm_sq)),
            "b/op-by-op": ("fast", functools.partial(bt.run_fast, loaded, groups, norm_sq, tail_graph=False)),
            **{f"b/hold={n}": ("fast", functools.partial(bt.run_fast, loaded, groups, norm_sq, hold_bytes=int(n)))
               for n in args.hold_bytes.split(",") if n},
        }
        if args.variants:
            chosen = {"a", *args.variants.split(",")}
            unknown = chosen - set(variants)
            if unknown:
                ap.error(f"unknown variants {sorted(unknown)}; choose from {sorted(variants)}")
            variants = {k: v for k, v in variants.items() if k in chosen}
        times: dict[str, list[float]] = {k: [] for k in variants}
        replays: dict[str, int] = {k: 0 for k in variants if k.startswith("b")}  # timed runs whose tail replayed
        host: dict[str, list[float]] = {k: [] for k in variants}
        for rep in range(args.repeats + 2):
            for name, (path, fn) in variants.items():
                bt.set_path(loaded, path)
                bt._sync(device)
                t = time.perf_counter()
                fn()
                t_host = time.perf_counter()
                bt._sync(device)
                if rep >= 2:  # two rounds of warm-up
                    times[name].append(time.perf_counter() - t)
                    host[name].append(t_host - t)
                    if name in replays:
                        replays[name] += bool(bt.FAST_STATS.get("kernels", {}).get(KERNEL_NAME))
        # paired: each variant against the a of its own round (the rounds drift alike)
        over_a = {k: statistics.median([t - a for t, a in zip(v, times["a"])]) * 1e3 for k, v in times.items()}
        row = {"config": config, "median_ms": {k: statistics.median(v) * 1e3 for k, v in times.items()},
               "host_median_ms": {k: statistics.median(v) * 1e3 for k, v in host.items()},
               "over_a_paired_ms": over_a, "tail_graph_replays": replays}
        rows.append(row)
        base = row["median_ms"]["a"]
        print(f"\n=== {config} (median ms over {args.repeats} rounds; wall, over a, ratio, host before the sync, "
              "median of the rounds' differences from their a)")
        for k, ms in row["median_ms"].items():
            print(f"  {k:12s} {ms:8.2f}  {ms - base:+7.2f}  x{ms / base:.3f}  host {row['host_median_ms'][k]:8.2f}  "
                  f"paired {over_a[k]:+7.2f}" + (f"  replayed {replays[k]}/{args.repeats}" if k in replays else ""))
        sys.stdout.flush()
    pf.write_rows(args.out, args, loaded, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
