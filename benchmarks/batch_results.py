"""Host time to turn a batch's statistics into per-prompt results: `PendingBatch.result()`
(host copy, masses, NaN checks, one PromptCapture per prompt) and `analysis.prompt_result`
per prompt, on synthetic sums of a 7B shape (32 layers, 32 heads). No model and no device:
this is the per-batch Python work that a host-bound GPU run pays once per batch.

    python benchmarks/batch_results.py --prompts 32 --out batch_results.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from sheafscope.analysis import prompt_result  # noqa: E402
from sheafscope.capture_fast import PendingBatch  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    b, layers, heads = args.prompts, args.layers, args.heads
    norm_sq = np.random.default_rng(0).random((layers, heads))
    times: dict[str, list[float]] = {"result": [], "prompt_result": []}
    for rep in range(args.repeats + 10):
        batch = PendingBatch([40] * b, torch.rand(b, layers, heads, 2, dtype=torch.float64),
                             torch.rand(b, layers + 1, dtype=torch.float64), 0, None, Counter(), [], torch.bfloat16)
        t0 = time.perf_counter()
        caps = batch.result()
        t1 = time.perf_counter()
        for cap in caps:
            prompt_result("", cap, False, norm_sq)
        t2 = time.perf_counter()
        if rep >= 10:
            times["result"].append(t1 - t0)
            times["prompt_result"].append(t2 - t1)
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"| step ({b} prompts, {layers} layers x {heads} heads) | median ms over {args.repeats} |")
    print("|---|---|")
    for k, v in ms.items():
        print(f"| {k} | {v:.3f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "torch": torch.__version__, "median_ms": ms}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
