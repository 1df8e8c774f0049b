#!/usr/bin/env python
"""Compare two sheafscope result directories prompt by prompt.

    python scripts/compare_results.py OLD_DIR NEW_DIR [--rtol 1e-6]

For every model in both, the per-prompt arrays (offdiag_mass, trace, layer_trace by default)
must agree within --rtol, relative to the largest magnitude of each array. Prints the worst
relative difference per model and field; exits 1 if any exceeds --rtol or a model is missing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

FIELDS = ("offdiag_mass", "trace", "layer_trace")


def load(directory: Path) -> dict[str, dict]:
    data = json.loads((directory / "results.json").read_text())
    return {m["spec"]: m for m in data["models"]}


def worst(old: dict, new: dict, field: str) -> float:
    """Largest |new - old| / max|old| over the prompts of one model."""
    if len(old["prompts"]) != len(new["prompts"]):
        return float("inf")
    out = 0.0
    for p, q in zip(old["prompts"], new["prompts"]):
        a, b = np.asarray(p[field], dtype=float), np.asarray(q[field], dtype=float)
        if a.shape != b.shape:
            return float("inf")
        scale = np.abs(a).max() or 1.0
        out = max(out, float(np.abs(a - b).max() / scale))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--rtol", type=float, default=1e-6)
    ap.add_argument("--fields", default=",".join(FIELDS))
    args = ap.parse_args(argv)
    old, new = load(args.old), load(args.new)
    fields = args.fields.split(",")
    ok = True
    for spec in sorted(set(old) | set(new)):
        if spec not in old or spec not in new:
            print(f"{spec}: only in {'old' if spec in old else 'new'}")
            ok = False
            continue
        if old[spec].get("status") != "ok" or new[spec].get("status") != "ok":
            print(f"{spec}: status {old[spec].get('status')} -> {new[spec].get('status')}")
            ok = ok and old[spec].get("status") == new[spec].get("status")
            continue
        diffs = {f: worst(old[spec], new[spec], f) for f in fields}
        bad = [f for f, d in diffs.items() if not d <= args.rtol]
        ok = ok and not bad
        print(f"{spec}: " + ", ".join(f"{f} {d:.1e}" for f, d in diffs.items()) + ("  EXCEEDS" if bad else ""))
    print("equal within" if ok else "NOT equal within", f"rtol {args.rtol:g}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
