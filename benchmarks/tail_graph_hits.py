"""How often a repeated forward pass replays its tail graph (tail_graphs.py), and why not.

Runs `launch_batch` on the same prompt(s) --runs times, each result read before the next
launch (as capture_batch does), and prints per run whether the tail was replayed, the
addresses of the first layer's queries and of the first residual stream, and a hash of the
graph key (shapes, strides, dtypes: tail_graphs._layout). A shape replays from its second
sighting on, wherever the allocator put its tensors (the addresses show that they move).

    python benchmarks/tail_graph_hits.py --model tiny:llama --lengths 23,23,11 --runs 12
    python benchmarks/tail_graph_hits.py --model random:mistral-7b --dtype bfloat16 --lengths 16 --runs 12

Needs a GPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from sheafscope import tail_graphs  # noqa: E402
from sheafscope.capture_fast import FAST_ATTENTION, launch_batch  # noqa: E402


def load(spec: str, dtype: torch.dtype):
    if spec.startswith("tiny:"):
        from sheafscope.adapters import adapter_for
        from tiny_models import build_tiny

        model = build_tiny(spec[5:], attn_implementation=FAST_ATTENTION).to("cuda", dtype)
        return model, adapter_for(model).blocks, 128
    from sheafscope import load_model

    loaded = load_model(spec, device="cuda", dtype=str(dtype).removeprefix("torch."), attention="fast")
    return loaded.model, loaded.adapter.blocks, 32000


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny:llama")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--lengths", default="23,23,11", help="prompt lengths, run in turn (one prompt per length)")
    ap.add_argument("--runs", type=int, default=12)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("tail_graph_hits.py needs a GPU", file=sys.stderr)
        return 2
    model, blocks, vocab = load(args.model, getattr(torch, args.dtype))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, vocab, (1, int(n)), generator=g).cuda() for n in args.lengths.split(",")]
    seen: dict = {}
    real = tail_graphs.TailGraphs.replay

    def spy(self, qs, ks, streams, causal, scale):
        key = tail_graphs._layout(qs, ks, streams, causal, scale)
        seen.update(key=hash(key) % 10**8, q0=qs[0].data_ptr(), h0=streams[0].data_ptr())
        return real(self, qs, ks, streams, causal, scale)

    tail_graphs.TailGraphs.replay = spy
    print("| run | n | replayed | key | q0 | stream 0 |\n|---|---|---|---|---|---|")
    hits = 0
    with torch.no_grad():
        for run in range(args.runs):
            p = prompts[run % len(prompts)]
            seen.clear()
            batch = launch_batch(model, blocks, [p])
            replayed = batch.replayed is not None
            batch.result()
            hits += replayed
            print(f"| {run} | {p.shape[1]} | {replayed} | {seen.get('key', '-')} | {seen.get('q0', 0):#x} "
                  f"| {seen.get('h0', 0):#x} |")
    print(f"\n{hits} of {args.runs} runs replayed; graphs disabled: {tail_graphs.disabled}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
