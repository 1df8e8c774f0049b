"""Host time per phase of the fast path (b) next to a plain forward (a): where a host-bound
forward pass spends the extra milliseconds.

Wraps the fast path's functions with wall-clock counters (no device syncs added, so each
counter is the host time spent inside that function, launches and any waits included), runs
each configuration --repeats times after a warm-up, and prints per-forward medians:

    python benchmarks/host_phases.py --model random:mistral-7b --dtype bfloat16 --configs 16,512,2048

`trunk` is the model's forward (its attention calls included), `attention` the fast path's
attention function inside it, `finish` the statistics of the held layers after the forward
(`stack`, `fused_stats`/`lse_rows`/`dense_rows`, `record`, `refine`), `masses`/`hidden.maxima` the per-prompt sums,
`to_host` their queued copies, `result` the wait for them and the checks, `wait` the final
device sync. A plain forward's `trunk` against b's `trunk` is what
the capture costs inside the forward pass.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_traces as bt  # noqa: E402
import profile_fast_path as pf  # noqa: E402

TOTALS: dict[str, float] = defaultdict(float)


def counted(owner, name: str, label: str) -> None:
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            TOTALS[label] += time.perf_counter() - t

    setattr(owner, name, wrapper)


def instrument() -> None:
    import sheafscope.analysis as an
    import sheafscope.capture_fast as cf
    import sheafscope.diag_stats as ds

    counted(cf, "_attention_with_lse", "attention.fused")
    counted(cf, "_sdpa", "attention.sdpa")
    counted(cf.DiagonalCapture, "_hold", "attention.hold")
    counted(cf.DiagonalCapture, "_hold_planned", "attention.hold")
    counted(cf.HiddenMax, "_keep", "hidden.keep")
    counted(cf.DiagonalCapture, "_finish", "finish")
    counted(cf, "lse_rows", "finish.lse_rows")
    counted(cf, "dense_rows", "finish.dense_rows")
    counted(cf, "_stacked", "finish.stack")
    counted(cf.DiagonalCapture, "_fused_stats", "finish.fused_stats")
    counted(cf.DiagonalCapture, "_record_group", "finish.record")
    counted(cf.DiagonalCapture, "_refine", "finish.refine")
    counted(cf, "exact_rows", "finish.refine.exact_rows")
    counted(ds, "plan_pieces", "finish.refine.plan")
    counted(cf.DiagonalCapture, "mass_sums", "masses")
    counted(cf.HiddenMax, "maxima", "hidden.maxima")
    counted(cf.HiddenMax, "__enter__", "hidden.hooks_on")
    counted(cf.HiddenMax, "__exit__", "hidden.hooks_off")
    counted(cf, "_to_host", "to_host")
    counted(cf.PendingBatch, "result", "result")
    counted(an, "prompt_result", "prompt_result")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    pf.add_arguments(ap, repeats=15)
    args = ap.parse_args(argv)

    from sheafscope.restriction import norms_sq

    loaded = bt.load(args)
    instrument()
    norm_sq = norms_sq(loaded.adapter).numpy()
    trunk = loaded.model.base_model
    inner = trunk.forward

    def timed_forward(*a, **k):
        t = time.perf_counter()
        try:
            return inner(*a, **k)
        finally:
            TOTALS["trunk"] += time.perf_counter() - t

    trunk.forward = timed_forward
    rows = []
    for config in [c for c in args.configs.split(",") if c]:
        groups = pf.groups_for(config, loaded, args.seed)
        row = {"config": config}
        for method, path, fn in (("a", "sdpa", bt.run_plain), ("b", "fast", bt.run_fast)):
            bt.set_path(loaded, path)
            fn(loaded, groups, norm_sq)
            bt._sync(loaded.device)
            per_run: dict[str, list[float]] = defaultdict(list)
            for _ in range(args.repeats):
                TOTALS.clear()
                t0 = time.perf_counter()
                fn(loaded, groups, norm_sq)
                t1 = time.perf_counter()
                bt._sync(loaded.device)
                t2 = time.perf_counter()
                TOTALS["total"] = t2 - t0
                TOTALS["wait"] = t2 - t1
                for k in set(TOTALS) | set(per_run):
                    per_run[k].append(TOTALS.get(k, 0.0))
            row[method] = {k: statistics.median(v) for k, v in sorted(per_run.items())}
        rows.append(row)
        print(f"\n=== {config}  (median ms per run over {args.repeats})")
        for k in sorted(set(row["a"]) | set(row["b"])):
            print(f"  {k:28s} a {row['a'].get(k, 0) * 1e3:8.2f}   b {row['b'].get(k, 0) * 1e3:8.2f}")
        sys.stdout.flush()
    pf.write_rows(args.out, args, loaded, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
