"""Fast path == eager reference on a CUDA GPU, for every supported family.

The CPU test suite checks the same on the CPU kernels; on a GPU the fast path takes lse from
other kernels (flash / memory-efficient attention), so it is checked there too. Writes JSON.

    PYTHONPATH=src:tests python scripts/gpu_check.py --out gpu_check.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from sheafscope.models.adapters import adapter_class, adapter_for  # noqa: E402
from sheafscope.capture.eager import capture_eager  # noqa: E402
from sheafscope.capture_fast import FAST_ATTENTION, capture_batch  # noqa: E402
from tiny_models import TINY_CONFIGS, build_tiny  # noqa: E402


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12)))


def compare(eager_model, fast_model, prompts: list[torch.Tensor]) -> dict:
    n_layers = len(adapter_for(eager_model).blocks)
    ref = [capture_eager(eager_model, p, n_layers) for p in prompts]
    fast = capture_batch(fast_model, adapter_for(fast_model).blocks, prompts)
    return {
        "offdiag_rel_err": max(rel(f.offdiag_mass, r.offdiag_mass) for f, r in zip(fast, ref)),
        "sink_abs_err": max(float(np.max(np.abs(f.first_token_mass - r.first_token_mass))) for f, r in zip(fast, ref)),
        "n_tokens": [int(p.shape[1]) for p in prompts],
    }


def tiny_pair(name: str, dtype: torch.dtype):
    eager = build_tiny(name, "eager").to("cuda", dtype)
    fast = build_tiny(name, FAST_ATTENTION).to("cuda", dtype)
    fast.load_state_dict(eager.state_dict())
    return eager.eval(), fast.eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gpu_check.json")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    out = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "transformers": transformers.__version__,
           "tiny": {}, "mistral_shape": {}}
    for dtype in (torch.float32, torch.bfloat16):
        for name in sorted(TINY_CONFIGS):
            if not adapter_class(build_tiny(name).config.model_type).fast_path_supported:
                continue  # loads eager: nothing to compare
            vocab = TINY_CONFIGS[name][1]["vocab_size"]
            prompts = [torch.randint(0, vocab, (1, n), generator=g).cuda() for n in (5, 17, 40)]
            eager, fast = tiny_pair(name, dtype)
            with torch.no_grad():
                r = compare(eager, fast, prompts)
            out["tiny"][f"{name}/{str(dtype).removeprefix('torch.')}"] = r
            print(name, dtype, r, flush=True)
    # A Mistral-7B-shaped slice (4 layers, real widths, sliding window 4096) past the window.
    cfg = transformers.MistralConfig(num_hidden_layers=4, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                     hidden_size=4096, intermediate_size=14336, vocab_size=32000,
                                     max_position_embeddings=32768, sliding_window=4096)
    for n in (2048, 6144):
        torch.manual_seed(0)
        with torch.device("cuda"):
            # from_config writes attn_implementation into the config object: one copy each.
            eager = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), dtype=torch.bfloat16, attn_implementation="eager").eval()
            fast = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), dtype=torch.bfloat16, attn_implementation=FAST_ATTENTION).eval()
        fast.load_state_dict(eager.state_dict())
        ids = [torch.randint(0, 32000, (1, n), generator=g).cuda()]
        t0 = time.time()
        with torch.no_grad():
            r = compare(eager, fast, ids)
        r["seconds"] = time.time() - t0
        out["mistral_shape"][str(n)] = r
        print("mistral-shape", n, r, flush=True)
        del eager, fast
        torch.cuda.empty_cache()
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
