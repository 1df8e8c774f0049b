"""Device time of each step of the fast path's statistics, on synthetic held layers, next to
alternatives: where the kernels b adds after a GPU-bound forward pass spend their time.

For a Mistral-7B shape (32 query heads, 8 KV heads, d = 128) in bfloat16 this builds the
queries and keys the attention function holds for `--layers` layers of one prompt of n tokens
(laid out as the model makes them: (b, n, h, d) memory seen as (b, h, n, d)) and times, with
CUDA events, the median over --repeats of:

    stack_q, stack_k       stacking the held layers (capture_fast._stacked, in the model's layout)
    cat_q                  a plain torch.cat of the same (the layout it transposes to), for scale
    scores_half            diag_stats._row_scores_half_cuda on the stack (s_ii, s_i0)
    scores_f32             diag_stats._row_scores (float32 copies, the fallback)
    lse_rows               the whole lse route on the stack
    slots                  diag_stats.slot_rows over the stack in chunks, as _refine_slots runs it
    record                 the where/sum that reduces rows to per-head sums
    fused_rows             fused_rows.fused_rows on the stack (causal): every row exact, the
                           route that replaces scores, lse_rows and slots up to
                           capture_fast.FUSED_ROWS_MAX_ROWS (needs Triton and a GPU)
    stats_rows             fused_rows.fused_stats on the held layers where they lie (an offset
                           table, no stack), what the capture runs; stats_rows_unaligned
                           without the table's alignment hint
    stats_sums             the same with sums=True (per head, summed over the rows): what a
                           short prompt's tail runs; stats_rows_T, stats_sums_T with the launch
                           settings T = BMxBNxWARPS[xSTAGES] (--tiles)
    *_baseline             the stats steps of another commit's fused_rows.py (--baseline-module),
                           on the same inputs; `vs_baseline` in the JSON is the largest relative
                           difference of its rows and sums from the current kernel's
    dense                  diag_stats.dense_rows for a batch of 32 prompts of --dense-n tokens
                           times every layer (the corpus's route), once per run; fused_rows
                           for the same batch next to it

    python benchmarks/stats_kernels.py --lengths 512,2048,8192 --out stats_kernels.json
    git show 4c391f6:src/sheafscope/fused_rows.py > /tmp/fused_rows_before.py
    python benchmarks/stats_kernels.py --lengths 16,512 --baseline-module /tmp/fused_rows_before.py --tiles 64x64x8,32x64x4

Without a GPU it runs on the CPU as a smoke test (wall clock, no attention kernels).
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
from sheafscope import fused_rows as fr  # noqa: E402
from sheafscope.capture_fast import _stacked  # noqa: E402


def held(layers: int, n: int, h: int, n_kv: int, d: int, dtype, device, seed: int = 0, batch: int = 1):
    gen = torch.Generator(device=device).manual_seed(seed)
    qs = [torch.randn(batch, n, h, d, device=device, dtype=dtype, generator=gen).transpose(1, 2) for _ in range(layers)]
    ks = [torch.randn(batch, n, n_kv, d, device=device, dtype=dtype, generator=gen).transpose(1, 2) for _ in range(layers)]
    return qs, ks


def stats_steps(qs, ks, mask, scale, module=fr, suffix: str = "", tiles: tuple[str, ...] = ()) -> dict:
    """fused_stats on held layers (rows, and sums as a short prompt's tail runs it), with and
    without the offset table's alignment hint; `module`: a fused_rows module (another commit's,
    --baseline-module), its steps named with `suffix`; `tiles`: rows and sums again with each of
    these launch settings, 'BMxBNxWARPS' or 'BMxBNxWARPSxSTAGES' (the current module only)."""
    def unaligned():
        table = module._offset_table
        module._offset_table = lambda *a: (*table(*a)[:2], 1)
        try:
            module.fused_stats(qs, ks, mask, mask is None, scale)
        finally:
            module._offset_table = table

    names = ("BLOCK_M", "BLOCK_N", "NUM_WARPS", "NUM_STAGES")

    def with_tiles(tile: str, sums: bool):
        values = [int(v) for v in tile.split("x")]

        def run():
            kept = [getattr(module, name) for name in names]
            for name, value in zip(names, values):
                setattr(module, name, value)
            try:
                module.fused_stats(qs, ks, mask, mask is None, scale, sums=sums)
            finally:
                for name, value in zip(names, kept):
                    setattr(module, name, value)
        return run

    steps = {"stats_rows": lambda: module.fused_stats(qs, ks, mask, mask is None, scale),
             "stats_rows_unaligned": unaligned,
             "stats_sums": lambda: module.fused_stats(qs, ks, mask, mask is None, scale, sums=True)}
    for tile in tiles:
        steps[f"stats_rows_{tile}"] = with_tiles(tile, False)
        steps[f"stats_sums_{tile}"] = with_tiles(tile, True)
    return {name + suffix: fn for name, fn in steps.items()}


def load_baseline(path: str):
    """A fused_rows.py from another commit (`git show REV:src/sheafscope/fused_rows.py > f.py`),
    imported as its own module, to time against the current kernel on the same inputs."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fused_rows_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def agreement(qs, ks, mask, scale, baseline) -> dict:
    """Largest relative difference between the current kernel's and the baseline's rows and
    sums on the same inputs (0.0: equal bit for bit)."""
    out = {}
    for name, sums in (("rows", False), ("sums", True)):
        new = fr.fused_stats(qs, ks, mask, mask is None, scale, sums=sums)
        old = baseline.fused_stats(qs, ks, mask, mask is None, scale, sums=sums)
        keep = ~old.isnan()
        out[name] = float(((new - old).abs() / old.abs().clamp(min=1e-300))[keep].max())
        out[name + "_nan_equal"] = bool(torch.equal(new.isnan(), old.isnan()))
    return out


def timed(fn, repeats: int) -> tuple[float, float]:
    """(device ms, host ms) medians. The device time is taken behind a sleeping kernel, so that
    it holds only the device's work, not the host's launching (the steps of short prompts
    take less device time than host time); the host time is fn's without waiting."""
    import time

    cuda = torch.cuda.is_available()
    fn()
    if cuda:
        torch.cuda.synchronize()
    device, host = [], []
    for _ in range(repeats):
        if cuda:
            torch.cuda._sleep(5_000_000)  # ~3 ms: longer than any step's launching
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
        t = time.perf_counter()
        fn()
        host.append((time.perf_counter() - t) * 1e3)
        if cuda:
            b.record()
            b.synchronize()
            device.append(a.elapsed_time(b))
    return (statistics.median(device) if cuda else float("nan")), statistics.median(host)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="512,2048,8192")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--width", type=int, default=8, help="slots per head")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--dense-n", type=int, default=40, help="prompt length of the dense-route batch (0: none)")
    ap.add_argument("--baseline-module", help="a fused_rows.py from another commit: its stats steps timed too "
                    "(suffix _baseline), and how far its results differ from the current kernel's")
    ap.add_argument("--tiles", default="", help="comma-separated launch settings BMxBNxWARPS[xSTAGES] to time "
                    "the rows and sums at too (fused_rows.BLOCK_M, BLOCK_N, NUM_WARPS, NUM_STAGES)")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    baseline = load_baseline(args.baseline_module) if args.baseline_module else None
    tiles = tuple(t for t in args.tiles.split(",") if t)
    # On a machine without a GPU: a smoke run on the CPU (wall clock; no attention kernels)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dt = torch.bfloat16
    h, n_kv, d = args.heads, args.kv_heads, args.head_dim
    scale = d**-0.5
    rows_out = []
    for n in [int(x) for x in args.lengths.split(",") if x]:
        # as many layers as _process_group would stack within HOLD_BYTES_CUDA
        per_layer = (h + n_kv) * n * d * 2 + h * n * 4
        layers = max(1, min(args.layers, (1 << 30) // per_layer + 1))
        qs, ks = held(layers, n, h, n_kv, d, dt, dev)
        q, k = _stacked(qs), _stacked(ks)
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

        steps = {
            "stack_q": lambda: _stacked(qs),
            "stack_k": lambda: _stacked(ks),
            "cat_q": lambda: torch.cat(qs),
            "scores_half": lambda: ds._row_scores_half_cuda(q, k),
            "scores_f32": lambda: ds._row_scores(q, k, step),
            "lse_rows": lambda: ds.lse_rows(q, k, lse, None, scale, None, None, None, True),
            "slots": slots,
            "record": lambda: torch.where(weights, rows, 0.0).sum(-2),
        }
        row = {"n": n, "layers": layers, "ms": {}, "host_ms": {}}
        if fr.available(q):
            steps["fused_rows"] = lambda: fr.fused_rows(q, k, None, True, scale)
            steps.update(stats_steps(qs, ks, None, scale, tiles=tiles))
            if baseline is not None:
                steps.update(stats_steps(qs, ks, None, scale, baseline, "_baseline"))
                row["vs_baseline"] = agreement(qs, ks, None, scale, baseline)
        for name, fn in steps.items():
            try:
                row["ms"][name], row["host_ms"][name] = timed(fn, args.repeats)
            except (RuntimeError, TypeError) as e:
                row["ms"][name] = row["host_ms"][name] = None
                print(f"  {name}: {str(e).splitlines()[0][:120]}", file=sys.stderr)
        rows_out.append(row)
        print(f"\n=== n={n}, {layers} layers stacked (median of {args.repeats}: device ms, host ms)")
        for name, ms in row["ms"].items():
            host = row["host_ms"][name]
            print(f"  {name:26s} {'-' if ms is None else f'{ms:8.3f} {host:8.3f}'}")
        if "vs_baseline" in row:
            print(f"  largest relative difference from the baseline: {row['vs_baseline']}")
        del qs, ks, q, k
        torch.cuda.empty_cache()
    if args.dense_n:
        # the corpus's batches: 32 prompts, every layer stacked (as HOLD_BYTES_CUDA allows)
        qs, ks = held(args.layers, args.dense_n, h, n_kv, d, dt, dev, batch=32)
        q, k = _stacked(qs), _stacked(ks)
        causal = torch.zeros(1, 1, args.dense_n, args.dense_n, dtype=torch.float64, device=dev)
        causal.masked_fill_(torch.ones_like(causal, dtype=torch.bool).triu(1), -math.inf)
        ms = timed(lambda: ds.dense_rows(q, k, causal, scale, None, None), args.repeats)[0]
        fused = timed(lambda: fr.fused_rows(q, k, None, True, scale), args.repeats)[0] if fr.available(q) else None
        # the corpus's padded batch: prompt j has 8 + j tokens, its mask causal over its own keys
        lengths = torch.arange(32, device=dev) % (args.dense_n - 7) + 8
        pos = torch.arange(args.dense_n, device=dev)
        valid = pos[None, :] < lengths[:, None]
        mask = (pos[None, :, None] >= pos[None, None, :]) & valid[:, None, :]
        stats = {}
        if fr.available(q):
            steps = {"fused_rows_masked": lambda: fr.fused_rows(q, k, mask[:, None], False, scale),
                     **stats_steps(qs, ks, mask[:, None], scale)}
            if baseline is not None:
                steps.update(stats_steps(qs, ks, mask[:, None], scale, baseline, "_baseline"))
            stats = {name: timed(fn, args.repeats) for name, fn in steps.items()}
        rows_out.append({"dense": {"prompts": 32, "n": args.dense_n, "layers": args.layers, "ms": ms, "fused_rows_ms": fused,
                                   "padded_ms": stats}})
        print(f"\n=== dense_rows, 32 prompts x {args.dense_n} tokens x {args.layers} layers: {ms:.3f} ms"
              + ("" if fused is None else f"; fused_rows {fused:.3f} ms"))
        for name, (t, host) in stats.items():
            print(f"  padded batch, {name:22s} {t:8.3f} ms device, {host:8.3f} ms host")
    if args.out:
        env = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"}
        Path(args.out).write_text(json.dumps({"args": vars(args), "environment": env, "rows": rows_out}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
