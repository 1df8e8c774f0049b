"""cProfile of the fast path (b) and a plain forward (a) on the host: which Python functions
and which op calls a host-bound forward spends its time in (cProfile slows Python calls, so
read the shares, not the totals).

    python benchmarks/python_profile.py --model random:mistral-7b --dtype bfloat16 --configs 16,512 --repeats 20
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_traces as bt  # noqa: E402
import profile_fast_path as pf  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    pf.add_arguments(ap, repeats=20)
    ap.add_argument("--top", type=int, default=35)
    args = ap.parse_args(argv)

    from sheafscope.restriction import norms_sq

    loaded = bt.load(args)
    norm_sq = norms_sq(loaded.adapter).numpy()
    for config in [c for c in args.configs.split(",") if c]:
        groups = pf.groups_for(config, loaded, args.seed)
        for method, path, fn in (("a", "sdpa", bt.run_plain), ("b", "fast", bt.run_fast)):
            bt.set_path(loaded, path)
            for _ in range(3):
                fn(loaded, groups, norm_sq)
            bt._sync(loaded.device)
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(args.repeats):
                fn(loaded, groups, norm_sq)
                bt._sync(loaded.device)
            prof.disable()
            out = io.StringIO()
            stats = pstats.Stats(prof, stream=out)
            stats.sort_stats("tottime").print_stats(args.top)
            if method == "b":
                stats.sort_stats("cumulative").print_stats("sheafscope", args.top)
            text = out.getvalue()
            print(f"\n=== {config} {method} ({args.repeats} runs)\n" + "\n".join(
                line[:150] for line in text.splitlines() if line.strip() and not line.startswith("   Ordered")))
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
