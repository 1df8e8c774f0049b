"""Host cost of one attention call, on this CPU: transformers' sdpa function against
sheafscope's attention function with no capture, and a call a per-forward plan serves (the
call every layer after the first makes inside a capture). A tiny Mistral layer (hidden 16,
16 tokens), so that the arithmetic is small next to the Python around it; warm (after 200
calls), the mean over --calls calls.

    python benchmarks/attention_call_cost.py --calls 20000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=20000)
    args = ap.parse_args(argv)

    import torch
    from transformers import MistralConfig, MistralModel
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from sheafscope import capture_fast as cf

    torch.set_num_threads(1)
    cf.register()
    config = MistralConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=100, sliding_window=None)
    model = MistralModel(config).eval()
    module = model.layers[0].self_attn
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 16, 4, generator=g) for h in (4, 2, 2))
    kw = dict(dropout=0.0, scaling=0.5, sliding_window=None)

    def per_call_us(fn) -> float:
        for _ in range(200):
            fn()
        t = time.perf_counter()
        for _ in range(args.calls):
            fn()
        return (time.perf_counter() - t) / args.calls * 1e6

    rows = {}
    with torch.no_grad():
        rows["transformers' sdpa function (a)"] = per_call_us(lambda: sdpa_attention_forward(module, q, k, v, None, **kw))
        rows["sheafscope, no capture"] = per_call_us(lambda: cf.sheafscope_attention(module, q, k, v, None, **kw))
        model.config._attn_implementation = cf.FAST_ATTENTION
        cap = cf.DiagonalCapture(model, keep_positions=False).__enter__()
        cf.sheafscope_attention(module, q, k, v, None, **kw)  # the first call makes the plan
        plan = next(iter(cap._plans.values()))

        def planned() -> None:
            cf.sheafscope_attention(module, q, k, v, None, **kw)
            plan.layers.clear(), plan.qs.clear(), plan.ks.clear()  # keep the held lists short

        rows["sheafscope, a planned call (b's layers 1..L-1)"] = per_call_us(planned)
        cap.__exit__(None, None, None)
    print(f"| call (mean of {args.calls}, warm) | µs |\n|---|---|")
    for name, us in rows.items():
        print(f"| {name} | {us:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
