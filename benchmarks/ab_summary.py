"""b/a across the committed GPU runs of bench_traces.py: one line per run and length, from the
interleaved pairs each result file keeps (bench_traces.interleaved).

For every file matching --glob and every length in --lengths: the pairs, the median of their
b/a ratios with a 95% bootstrap interval of that median (bench_traces.median_interval), the
median b - a in ms and the median a. Files written before a rule changed are read the same
way, from their raw pair times, so old and new runs compare directly.

    python benchmarks/ab_summary.py                                    # the H200 runs
    python benchmarks/ab_summary.py --glob 'gpu_h100_mistral7b_*.json' --lengths 16,512,2048
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_traces import median_interval  # noqa: E402


def rows(files: list[Path], lengths: list[str]) -> list[dict]:
    out = []
    for f in files:
        record = json.loads(f.read_text())
        for r in record.get("results", []):
            il = r.get("interleaved")
            if not il or str(r["n"]) not in lengths:
                continue
            a, b = il["a_times_s"], il["b_times_s"]
            ratios = [tb / ta for ta, tb in zip(a, b)]
            out.append({"file": f.name, "n": r["n"], "pairs": len(ratios), "b/a": statistics.median(ratios),
                        "interval": median_interval(ratios),
                        "b-a_ms": statistics.median([(tb - ta) * 1e3 for ta, tb in zip(a, b)]),
                        "a_ms": statistics.median(a) * 1e3})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--glob", default="gpu_h200_mistral7b_*.json", help="result files under benchmarks/results")
    ap.add_argument("--lengths", default="16,512", help="comma-separated n (or 'corpus')")
    ap.add_argument("--limit", type=float, default=1.10, help="the target b/a, to mark each interval against")
    args = ap.parse_args(argv)
    files = sorted((HERE / "results").glob(args.glob))
    found = rows(files, args.lengths.split(","))
    if not found:
        print(f"no interleaved a/b pairs in benchmarks/results/{args.glob}", file=sys.stderr)
        return 1
    print(f"| file | n | pairs | b/a | median's 95% interval | vs {args.limit} | b − a (ms) | a (ms) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in found:
        lo, hi = r["interval"]
        verdict = "below" if hi <= args.limit else "above" if lo > args.limit else "straddles"
        print(f"| {r['file']} | {r['n']} | {r['pairs']} | {r['b/a']:.3f} | {lo:.3f}–{hi:.3f} | {verdict} "
              f"| {r['b-a_ms']:.2f} | {r['a_ms']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
