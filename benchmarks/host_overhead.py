"""Host time the fast path adds to a forward pass, on the CPU, with the device work taken out.

On a GPU a short forward pass of a 7B model is bound by the host: its 1,400 kernel launches
and the Python around them take longer than the device's work (benchmarks/README.md, "GPU,
seventh round"). What b costs there beyond a is then the fast path's Python and its extra
launches. This measures that part here, on a model with the 7B's depth and a tiny width (so
that the arithmetic is negligible) and the fused kernel replaced by a stub that returns zeros
of its shape (its launch is measured on the GPU by stats_kernels.py):

    python benchmarks/host_overhead.py --layers 32 --tokens 16 --pairs 300 --out results/host_overhead.json

a and b run interleaved in pairs; the table gives the medians and the median of the pairs'
differences. `--lengths 8,40,23,...` runs a right-padded batch of those prompt lengths instead.
The numbers are host milliseconds on this machine, a proxy. A plain forward pass costs the GPU
hosts 13-23 us per top-level operator call, and this CPU ~3.2 us (benchmarks/README.md, "GPU,
seventh round"), so multiply by 4-7 before comparing with a GPU forward pass.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=16, help="one prompt of this many tokens")
    ap.add_argument("--lengths", default="", help="comma-separated prompt lengths: one right-padded batch")
    ap.add_argument("--pairs", type=int, default=300)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    import numpy as np
    import torch
    from transformers import MistralConfig, MistralModel

    import bench_traces as bt
    import sheafscope
    from sheafscope import capture_fast as cf
    from sheafscope import fused_rows as fr

    torch.set_num_threads(1)
    cf.register()
    config = MistralConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=args.layers,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=100, sliding_window=None)
    torch.manual_seed(0)
    model = MistralModel(config).eval()
    blocks = list(model.layers)

    def stub(qs, ks, mask, causal, scale, sums=False, valid=None):
        b, h, n, _ = qs[0].shape
        return torch.zeros((len(qs) * b, h, 2) if sums else (len(qs) * b, h, n, 2), dtype=torch.float64)

    fr.available = lambda q: True  # the fused route, as on a GPU in half precision
    fr.fused_stats = stub
    lengths = [int(x) for x in args.lengths.split(",") if x] or [args.tokens]
    prompts = [torch.randint(0, 100, (1, n), generator=torch.Generator().manual_seed(i)) for i, n in enumerate(lengths)]

    # a and b as bench_traces.py runs them (b: launch_batch, result, prompt_result per prompt)
    loaded = SimpleNamespace(model=model, adapter=SimpleNamespace(blocks=blocks))
    groups, norm_sq = [prompts], np.ones((args.layers, config.num_attention_heads))

    def plain() -> None:
        model.config._attn_implementation = "sdpa"
        bt.run_plain(loaded, groups, norm_sq)

    def fast() -> None:
        model.config._attn_implementation = cf.FAST_ATTENTION
        bt.run_fast(loaded, groups, norm_sq)

    for _ in range(5):
        plain(), fast()
    times: dict[str, list[float]] = {"a": [], "b": []}
    for _ in range(args.pairs):
        for label, fn in (("a", plain), ("b", fast)):
            t0 = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - t0)
    diffs = [b - a for a, b in zip(times["a"], times["b"])]
    a_ms, b_ms = (statistics.median(times[k]) * 1e3 for k in "ab")
    d_ms = statistics.median(diffs) * 1e3
    q = statistics.quantiles(diffs, n=4)
    print(f"| layers | prompts | a (ms) | b (ms) | b - a, median of pairs (ms) | quartiles (ms) |")
    print(f"|---|---|---|---|---|---|")
    print(f"| {args.layers} | {','.join(map(str, lengths))} | {a_ms:.3f} | {b_ms:.3f} | {d_ms:.3f} | "
          f"{q[0] * 1e3:.3f}-{q[2] * 1e3:.3f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "sheafscope": sheafscope.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.processor() or platform.machine(), "layers": args.layers, "lengths": lengths,
            "pairs": args.pairs, "a_ms": a_ms, "b_ms": b_ms, "b_minus_a_ms": d_ms,
            "b_minus_a_quartiles_ms": [q[0] * 1e3, q[2] * 1e3],
            "what": "host time per forward, CPU, tiny-width model, fused kernel stubbed (see the docstring)"},
            indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
