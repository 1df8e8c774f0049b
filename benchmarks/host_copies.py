"""Ways to bring capture results off a GPU into numpy, timed (the reason for fast_batch._host).

    python benchmarks/host_copies.py [--out FILE]

Shapes: the pooled residual streams of a batch of the 1,000-prompt corpus on a 7B model
(489 prompts x 33 streams x 4,096 float32, 264 MB), a smaller batch, and one prompt. Every
result is kept alive, as a run keeps its results, so that freed memory is not simply reused.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def pageable(t: torch.Tensor) -> np.ndarray:
    return t.cpu().numpy()


def one_block_numpy_copy(t: torch.Tensor) -> np.ndarray:
    staged = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    staged.copy_(t)
    return staged.numpy().copy()


def one_block_torch_copy(t: torch.Tensor) -> np.ndarray:
    staged = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    staged.copy_(t)
    out = torch.empty(t.shape, dtype=t.dtype)
    out.copy_(staged)
    return out.numpy()


def chunks(t: torch.Tensor, stage_bytes: int = 1 << 25) -> np.ndarray:
    out = torch.empty(t.shape, dtype=t.dtype)
    step = max(1, stage_bytes // max(1, t[0].nbytes))
    staged = torch.empty((min(step, len(t)), *t.shape[1:]), dtype=t.dtype, pin_memory=True)
    for i in range(0, len(t), step):
        j = min(len(t), i + step)
        staged[: j - i].copy_(t[i:j])
        out[i:j].copy_(staged[: j - i])
    return out.numpy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    rows = []
    for shape in ((489, 33, 4096), (200, 33, 4096), (1, 33, 4096)):
        t = torch.randn(shape, device="cuda")
        for fn in (pageable, one_block_numpy_copy, one_block_torch_copy, chunks):
            kept = [fn(t)]
            assert np.array_equal(kept[0], t.cpu().numpy())
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.repeats):
                kept.append(fn(t))
            ms = 1e3 * (time.perf_counter() - start) / args.repeats
            rows.append({"shape": list(shape), "way": fn.__name__, "ms": ms})
            print(f"{str(shape):18s} {fn.__name__:22s} {ms:8.2f} ms")
    if args.out:
        env = {"device_name": torch.cuda.get_device_name(), "torch": torch.__version__}
        with open(args.out, "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
