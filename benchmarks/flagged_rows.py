"""How many rows of each head the lse route flags for exact recomputation (A_ii > 1/2, row 0
excluded), on pretrained models and one prompt of natural text: what the width of the GPU
refinement slots (capture_fast.REFINE_SLOTS_CUDA) should cover. Eager attention matrices on the
CPU, so lengths stay modest.

    python benchmarks/flagged_rows.py smollm2-135m gemma3-270m qwen2.5-coder-0.5b --n 512
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from sheafscope import load_model
from sheafscope.prompts import load_prompts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--n", type=int, default=512, help="tokens of the prompt (research-v1's ASCII prompts joined)")
    args = ap.parse_args(argv)
    texts, _ = load_prompts("research-v1")
    text = " ".join(t for t in texts if t.isascii())
    for alias in args.models:
        loaded = load_model(alias, device="cpu", dtype="float32", attention="eager")
        ids = loaded.tokenizer(text, return_tensors="pt").input_ids[:, : args.n]
        with torch.no_grad():
            out = loaded.model(ids, output_attentions=True)
        per_head = torch.stack([(a[0].diagonal(dim1=-2, dim2=-1)[:, 1:] > 0.5).sum(-1) for a in out.attentions])
        c = per_head.flatten().numpy()
        n = ids.shape[1]
        covered = {w: np.minimum(c, w).sum() / max(c.sum(), 1) for w in (4, 8, 16)}
        print(f"{alias}: n={n}, {c.size} heads, flagged rows {c.sum()} ({c.sum() / (c.size * (n - 1)):.2%} of rows); "
              f"per head median {np.median(c):.0f}, p90 {np.percentile(c, 90):.0f}, max {c.max()}; "
              f"heads with <= 4 / 8 / 16 flagged: {np.mean(c <= 4):.0%} / {np.mean(c <= 8):.0%} / {np.mean(c <= 16):.0%}; "
              f"flagged rows that 4 / 8 / 16 slots take: {covered[4]:.0%} / {covered[8]:.0%} / {covered[16]:.0%}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
