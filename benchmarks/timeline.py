"""When the host and the device finish each stage of a (plain forward) and b (the fast path).

A forward pass of a few hundred tokens on a GPU can be bound by the host (the device waits for
Python) or by the device (the host runs ahead). Which one decides what b's extra work costs:
host work after the forward pass hides behind a device that is still busy, and device work
after it adds in full once the device has caught up. This script times both clocks for each
stage of one run, a and b alternately (as bench_traces' interleaved pairs):

    start       after a device sync (the device is idle): host time 0, device time 0
    trunk_in    the trunk's forward is entered (b: after the capture and the stream wrappers)
    trunk_out   the trunk's forward returned: the host has queued the whole forward pass
    tail_out    (b) launch_batch returned: the statistics and their copies are queued
    result_in   (b) PendingBatch.result() is entered
    done        the run is over (a: after a device sync; b: result() and prompt_result done)

For each stage the host column is the time the host reached it, the device column the time the
device finished the work queued before it (a CUDA event recorded there), both from start. At
trunk_out, device - host is how far the device lags the host when the forward pass is queued
(about 0: host-bound). Events cost the host a few microseconds each, a and b alike.

    python benchmarks/timeline.py --model random:mistral-7b --dtype bfloat16 --configs 16,512 --repeats 100

GPU only (the device column needs CUDA events). Also counts, per b run, whether its tail was
replayed from a CUDA graph (tail_graphs) and how many graphs were captured.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import bench_traces as bt  # noqa: E402
import profile_fast_path as pf  # noqa: E402

STAGES = ("trunk_in", "trunk_out", "tail_out", "result_in", "done")


class Marks:
    """(stage, host seconds, CUDA event) of one run, from its start."""

    def __init__(self) -> None:
        self.items: list[tuple[str, float, Any]] = []
        self.t0 = 0.0

    def start(self) -> None:
        import torch

        torch.cuda.synchronize()
        self.items = []
        self.t0 = time.perf_counter()
        self.mark("start")

    def mark(self, stage: str, device: bool = True) -> None:
        """Note the host time; with `device`, also record a CUDA event (a few microseconds)."""
        import torch

        event = None
        if device:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        self.items.append((stage, time.perf_counter() - self.t0, event))

    def read(self) -> dict[str, tuple[float, float]]:
        """stage -> (host ms, device ms) from start (waits for the device); device NaN for
        host-only marks."""
        import torch

        torch.cuda.synchronize()
        first = self.items[0][2]
        return {s: (h * 1e3, first.elapsed_time(e) if e is not None else float("nan")) for s, h, e in self.items}


def instrument(loaded, marks: Marks) -> None:
    """Mark the trunk's entry and exit, launch_batch's return and result()'s entry."""
    from sheafscope import capture_fast

    trunk = loaded.model.base_model
    inner = trunk.forward

    def forward(*a: Any, **k: Any) -> Any:
        marks.mark("trunk_in")
        out = inner(*a, **k)
        marks.mark("trunk_out")
        return out

    trunk.forward = forward
    launch = capture_fast.launch_batch

    def launch_batch(*a: Any, **k: Any) -> Any:
        pending = launch(*a, **k)
        marks.mark("tail_out")
        return pending

    capture_fast.launch_batch = launch_batch
    result = capture_fast.PendingBatch.result

    def result_marked(self: Any, *a: Any, **k: Any) -> Any:
        marks.mark("result_in")
        return result(self, *a, **k)

    capture_fast.PendingBatch.result = result_marked


def host_marks(marks: Marks) -> list[str]:
    """Host-only marks around the steps between the trunk's return and the end of b (--fine):
    the last stream's hold, the tail's replay and its lookup, the two context exits, result()."""
    from sheafscope import capture_fast, tail_graphs

    stages = []

    def wrap(owner: Any, name: str, label: str) -> None:
        inner = getattr(owner, name)

        def marked(*a: Any, **k: Any) -> Any:
            marks.mark(label + "_in", device=False)
            try:
                return inner(*a, **k)
            finally:
                marks.mark(label + "_out", device=False)

        setattr(owner, name, marked)
        stages.extend((label + "_in", label + "_out"))

    wrap(capture_fast.HiddenMax, "final", "hm_final")
    wrap(capture_fast, "_replay_tail", "replay_tail")
    wrap(tail_graphs.TailGraphs, "replay", "lookup_replay")
    wrap(capture_fast.HiddenMax, "__exit__", "hm_exit")
    wrap(capture_fast.DiagonalCapture, "__exit__", "cap_exit")
    wrap(capture_fast.PendingBatch, "result", "res")
    return stages


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    pf.add_arguments(ap, repeats=100)
    ap.add_argument("--fine", action="store_true", help="also host-only marks around the steps after the trunk")
    args = ap.parse_args(argv)

    import torch

    from sheafscope import tail_graphs
    from sheafscope.restriction import norms_sq

    if not torch.cuda.is_available():
        print("timeline.py needs a GPU (CUDA events)", file=sys.stderr)
        return 2
    loaded = bt.load(args)
    marks = Marks()
    instrument(loaded, marks)
    fine = host_marks(marks) if args.fine else []
    norm_sq = norms_sq(loaded.adapter).numpy()
    rows = []
    for config in [c for c in args.configs.split(",") if c]:
        groups = pf.groups_for(config, loaded, args.seed)
        runs: dict[str, list[dict[str, tuple[float, float]]]] = {"a": [], "b": []}
        replayed, captured = [], []
        for i in range(args.repeats + 3):  # the first three pairs warm up
            for method in ("a", "b"):
                runner, path = bt.RUNNERS[method]
                bt.set_path(loaded, path)
                before = tail_graphs.TAILS.captures
                marks.start()
                runner(loaded, groups, norm_sq)
                if method == "a":
                    torch.cuda.synchronize()
                marks.mark("done")
                got = marks.read()
                if i >= 3:
                    runs[method].append(got)
                    if method == "b":
                        replayed.append(bt.FAST_STATS["kernels"].get(tail_graphs.KERNEL_NAME, 0))
                        captured.append(tail_graphs.TAILS.captures - before)
        row: dict[str, Any] = {"config": config, "pairs": args.repeats,
                               "b_replayed_runs": sum(1 for r in replayed if r),
                               "b_graph_captures": sum(captured)}
        for method, got in runs.items():
            stages = [s for s in (*STAGES, *fine) if s in got[0]]
            row[method] = {s: {"host_ms": statistics.median(g[s][0] for g in got),
                               "device_ms": statistics.median(g[s][1] for g in got),
                               "device_lag_ms": statistics.median(g[s][1] - g[s][0] for g in got)}
                           for s in stages}
            row[method]["raw"] = [{s: g[s] for s in stages} for g in got]
        row["b_minus_a_done_ms"] = statistics.median(
            b["done"][0] - a["done"][0] for a, b in zip(runs["a"], runs["b"]))
        rows.append(row)
        print(f"\n=== {config}: medians over {args.repeats} pairs (ms from start); b's tail replayed in "
              f"{row['b_replayed_runs']} of {args.repeats} runs, {row['b_graph_captures']} graphs captured")
        print(f"  {'stage':10s} {'a host':>8s} {'a device':>9s} {'a lag':>7s}   {'b host':>8s} {'b device':>9s} {'b lag':>7s}")
        for s in STAGES:
            cells = []
            for method in ("a", "b"):
                v = row[method].get(s)
                cells.append(f"{v['host_ms']:8.2f} {v['device_ms']:9.2f} {v['device_lag_ms']:7.2f}" if v else
                             f"{'':8s} {'':9s} {'':7s}")
            print(f"  {s:10s} {cells[0]}   {cells[1]}")
        for s in sorted(fine, key=lambda s: row["b"].get(s, {}).get("host_ms", 0)):
            if s in row["b"]:
                print(f"  {s:14s} b host {row['b'][s]['host_ms']:8.3f}")
        print(f"  b - a at done, median of pairs: {row['b_minus_a_done_ms']:.2f} ms")
        sys.stdout.flush()
    pf.write_rows(args.out, args, loaded, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
