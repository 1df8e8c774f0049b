"""Host cost of the statistics launch that b adds after a forward pass, and of what could replace it.

For a Mistral-7B shape (32 query heads, 8 KV heads, d = 128) in bfloat16, this holds 32
layers' queries and keys of one prompt of n tokens as the attention function holds them
((b, n, h, d) memory seen as (b, h, n, d)) and times, as host microseconds per call:

    fused_stats      fused_rows.fused_stats(..., sums=True): what the capture runs (checks,
                     offset table, output allocation, launch)
    triton_launch    the sums kernel's Triton launch alone, with fused_stats' own arguments
    graph_replay     a CUDA graph holding that launch, replayed (the same work on the device)
    empty            torch.empty of the output, for scale
    add              a one-element torch.add on the device, for scale (one ATen launch)
    to_host          a pinned host buffer and a non-blocking copy of the sums into it
    tail             everything b queues on the device after the forward pass, as launch_batch
                     queues it for one prompt: fused_stats, the residual streams' maxima (33
                     streams stacked, one vector_norm), both copies into fresh pinned buffers,
                     an event
    tail_graph       the same work captured once as a CUDA graph (static pinned outputs) and
                     replayed, after looking it up by every input's address (what a cache of
                     such graphs would have to do per forward pass), and an event

each "warm" (back to back, the median over --repeats calls) and "cold" (one call right after a
forward pass of a 32-layer random Mistral of small width, whose host work evicts the caches as
the real forward pass does; the median over --repeats forward passes).

    python benchmarks/launch_cost.py --lengths 16,512 --out launch_cost.json

Needs a GPU with Triton.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from sheafscope import fused_rows as fr  # noqa: E402
from sheafscope.capture_fast import _max_abs  # noqa: E402


def held(layers: int, n: int, h: int, n_kv: int, d: int, dtype, device):
    qs = [torch.randn(1, n, h, d, device=device, dtype=dtype).transpose(1, 2) for _ in range(layers)]
    ks = [torch.randn(1, n, n_kv, d, device=device, dtype=dtype).transpose(1, 2) for _ in range(layers)]
    return qs, ks


def recorded_launch(qs, ks, scale):
    """The sums kernel's grid, arguments and keywords as fused_stats passes them."""
    seen = {}
    real = fr._kernel

    class Recorder:
        def __getitem__(self, grid):
            def call(*args, **kwargs):
                seen.update(grid=grid, args=args, kwargs=kwargs)
                return real(sums=True)[grid](*args, **kwargs)
            return call

    fr._kernel = lambda sums=False: Recorder() if sums else real(sums)
    try:
        fr.fused_stats(qs, ks, None, True, scale, sums=True)
    finally:
        fr._kernel = real
    kernel = real(sums=True)
    return lambda: kernel[seen["grid"]](*seen["args"], **seen["kwargs"])


def evictor(device):
    """A host-bound forward pass: 32 small Mistral layers."""
    from transformers import MistralConfig, MistralModel

    cfg = MistralConfig(hidden_size=256, intermediate_size=256, num_hidden_layers=32, num_attention_heads=2,
                        num_key_value_heads=1, head_dim=128, vocab_size=1000, attn_implementation="sdpa")
    model = MistralModel(cfg).to(device, torch.bfloat16).eval()
    ids = torch.randint(0, 1000, (1, 16), device=device)

    @torch.no_grad()
    def forward():
        model(input_ids=ids, use_cache=False)
    return forward


def host_us(fn, repeats: int, before=None) -> float:
    times = []
    for i in range(repeats):
        if before is not None:
            before()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        if before is not None or i % 50 == 49:
            torch.cuda.synchronize()
    return statistics.median(times) * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="16,512")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("launch_cost.py needs a GPU", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    h, n_kv, d = 32, 8, 128
    scale = d**-0.5
    forward = evictor(dev)
    for _ in range(3):
        forward()
    rows = []
    for n in [int(x) for x in args.lengths.split(",") if x]:
        qs, ks = held(args.layers, n, h, n_kv, d, torch.bfloat16, dev)
        sums = fr.fused_stats(qs, ks, None, True, scale, sums=True)
        launch = recorded_launch(qs, ks, scale)
        launch()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            launch()  # warm on the capture stream
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            launch()
        one = torch.ones(1, device=dev)
        hidden = [torch.randn(1, n, h * d, device=dev, dtype=torch.bfloat16) for _ in range(args.layers + 1)]

        def pinned(t):
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
            return host

        def tail():
            s_ = fr.fused_stats(qs, ks, None, True, scale, sums=True)
            m_ = _max_abs(torch.stack(hidden), (-2, -1))
            pinned(s_), pinned(m_)
            torch.cuda.Event().record()

        tail()
        static_sums = torch.empty(sums.shape, dtype=sums.dtype, pin_memory=True)
        static_max = torch.empty((len(hidden), 1), dtype=torch.bfloat16, pin_memory=True)
        tail_graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        with torch.cuda.graph(tail_graph):
            static_sums.copy_(fr.fused_stats(qs, ks, None, True, scale, sums=True), non_blocking=True)
            static_max.copy_(_max_abs(torch.stack(hidden), (-2, -1)), non_blocking=True)
        graphs = {tuple(map(torch.Tensor.data_ptr, [*qs, *ks, *hidden])): tail_graph}

        def replay_tail():
            graphs[tuple(map(torch.Tensor.data_ptr, [*qs, *ks, *hidden]))].replay()
            torch.cuda.Event().record()

        steps = {
            "fused_stats": lambda: fr.fused_stats(qs, ks, None, True, scale, sums=True),
            "triton_launch": launch,
            "graph_replay": graph.replay,
            "empty": lambda: torch.empty(sums.shape, dtype=sums.dtype, device=dev),
            "add": lambda: torch.add(one, one),
            "to_host": lambda: pinned(sums),
            "tail": tail,
            "tail_graph": replay_tail,
        }
        row = {"n": n, "layers": args.layers, "warm_us": {}, "cold_us": {}}
        for name, fn in steps.items():
            row["warm_us"][name] = host_us(fn, args.repeats)
            row["cold_us"][name] = host_us(fn, max(20, args.repeats // 4), before=forward)
        rows.append(row)
        print(f"\n=== n={n}, {args.layers} layers: host µs per call (warm: back to back; cold: after a forward pass)")
        for name in steps:
            print(f"  {name:14s} warm {row['warm_us'][name]:8.1f}   cold {row['cold_us'][name]:8.1f}")
        graphs.clear()
        del graph, tail_graph
    if args.out:
        import triton
        env = {"torch": torch.__version__, "triton": triton.__version__, "device": torch.cuda.get_device_name()}
        Path(args.out).write_text(json.dumps({"args": vars(args), "environment": env, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
