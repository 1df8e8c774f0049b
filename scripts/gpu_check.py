"""Fast against eager on every catalog family's twin, on a GPU, in bfloat16 and float32.

For each twin small enough for one device (mistral-7b with its sliding window shrunk to 512
tokens, so that a 1,200-token prompt runs past it), both attention paths measure the same prompts
and the largest relative difference of the off-diagonal mass is reported, with the tolerance it
must meet. Writes a JSON table.

    PYTHONPATH=src python scripts/gpu_check.py --out gpu_check.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from sheafscope import analyze, load_model
from sheafscope.models import catalog

# float32 paths agree to rounding; bfloat16 to the rounding of bfloat16 q and k summed in another order.
RTOL = {"float32": 1e-5, "bfloat16": 2e-2}
SMALL = ("gpt2", "opt-125m", "pythia-160m", "bloom-560m", "smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b",
         "minilm-l6", "gemma-2b", "mistral-7b")


def prompts_of(tokenizer, n_tokens: list[int], seed: int) -> list[str]:
    """Texts of about these many tokens: random token ids decoded (a twin only indexes rows)."""
    g = torch.Generator().manual_seed(seed)
    vocab = min(len(tokenizer), 30000)
    return [tokenizer.decode(torch.randint(100, vocab, (n,), generator=g).tolist()) for n in n_tokens]


def worst(fast, eager) -> float:
    a = np.stack([p.offdiag_mass for p in fast.prompts])
    b = np.stack([p.offdiag_mass for p in eager.prompts])
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-6)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--models", default=",".join(SMALL))
    args = ap.parse_args()
    rows = []
    for name in args.models.split(","):
        entry = catalog.find(name)
        for dtype in ("bfloat16", "float32"):
            t0 = time.time()
            # Mistral's 4,096-token window shrunk to 512, so that the eager reference past it fits one GPU
            overrides = {"sliding_window": 512} if name == "mistral-7b" else None
            loaded = load_model(f"random:{entry.name}", dtype=dtype, device="cuda", config_overrides=overrides)
            window = getattr(loaded.model.config, "sliding_window", None)
            lengths = [40, 300, 1200]
            texts = prompts_of(loaded.tokenizer, lengths, seed=1)
            fast = analyze(loaded, texts, attention="fast")
            eager = analyze(loaded, texts, attention="eager")
            err = worst(fast, eager)
            rows.append({"model": name, "dtype": dtype, "tokens": [p.n_tokens for p in fast.prompts],
                         "sliding_window": window, "max_rel_diff": err, "rtol": RTOL[dtype], "ok": err <= RTOL[dtype],
                         "fast_kernels": fast.info.get("kernels"), "fallbacks": fast.info.get("fallbacks"),
                         "seconds": time.time() - t0})
            print(f"{name:22s} {dtype:9s} tokens {rows[-1]['tokens']} max rel diff {err:.2e} "
                  f"(<= {RTOL[dtype]:.0e}: {'ok' if rows[-1]['ok'] else 'FAIL'})", flush=True)
            del loaded
            torch.cuda.empty_cache()
            with open(args.out, "w") as f:
                json.dump({"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
