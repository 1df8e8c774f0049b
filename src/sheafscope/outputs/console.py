"""What a run prints on stdout: the summary table, the verdict and report lines, and a grid
suite's L* spreads and verdict flips. Everything here reads results already written."""

from __future__ import annotations

import json
from pathlib import Path

# the registry is read when printing, so a definition registered later is printed too
from sheafscope.measures import lstar


def _lstar_cell(d: lstar.LStarDefinition, block: dict | None) -> str:
    if block is None:  # a resumed run's model computed before the definition existed
        return "-"
    if d.over == "prompts":
        return f"{block['mean']:.1f}±{block['std']:.1f}"
    return "-" if block["value"] is None else str(block["value"])


def print_summary(models: list[dict], out_dir: Path) -> None:
    defs = list(lstar.DEFINITIONS.values())
    widths = [max(len(d.name) + 2, 11 if d.over == "prompts" else 6) for d in defs]
    print()
    lstar_hdr = " ".join(f"{'L*' + d.name:>{w}}" for d, w in zip(defs, widths))
    hdr = f"{'model':<28} {'family':<9} {'L':>3} {'H':>3} {'mean trace':>12} {lstar_hdr} {'pred':>6} {'err%':>6}  status"
    print(hdr)
    print("-" * len(hdr))
    for m in models:
        if m.get("status") != "ok":
            blank = " ".join(" " * w for w in widths)
            print(f"{m['spec']:<28} {'':<9} {'':>3} {'':>3} {'':>12} {blank} {'':>6} {'':>6}  FAILED: {m['error']['message']}")
            continue
        ls = m["lstar"]
        f = ls["formula"]
        pred = f"{f['predicted']:.1f}" + ("!" if f["exceeds_L"] else "")
        cells = " ".join(f"{_lstar_cell(d, ls.get(d.name)):>{w}}" for d, w in zip(defs, widths))
        print(f"{m['spec']:<28} {m['family']:<9} {m['n_layers']:>3} {m['n_heads']:>3} {m['mean_trace']:>12.4g} "
              f"{cells} {pred:>6} {f['error_pct']:>6.1f}  ok")
        for w in m.get("warnings", []):
            print(f"    warning: {w}")
    print()
    for d in defs:
        print(f"L*{d.name}: {d.definition} ({d.source})")
    print(f"pred: the formula, '!' where it exceeds L (D10); err%: |pred - L*{lstar.EMPIRICAL}| / L.")
    print(f"Results: {out_dir}/results.json, summary.csv, analysis.json")


def verdict_line(out_dir: Path, models: list[dict]) -> str:
    """The formula's verdict as analysis.json states it (sheafscope.outputs.formula.verdict)."""
    try:
        analysis = json.loads((out_dir / "analysis.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "not available (analysis.json could not be read)"
    mape = analysis.get("mape") if isinstance(analysis, dict) else None
    if not isinstance(mape, dict) or not mape.get("verdict"):
        if not any(m.get("status") == "ok" for m in models):
            return "none: no model ran"
        return "none: no trained model ran (random-init twins are controls, kept out of the formula's statistics)"
    overall = mape.get("overall") if isinstance(mape.get("overall"), dict) else {}
    value, n = overall.get("mape_of_L"), overall.get("n")
    detail = f"MAPE {value:.1f} % of L" if isinstance(value, (int, float)) else "MAPE not available"
    ci = overall.get("ci")
    if isinstance(ci, list) and len(ci) == 2 and all(isinstance(v, (int, float)) and v == v for v in ci):
        detail += f" [{ci[0]:.1f}, {ci[1]:.1f}] (95 % interval)"
    return f"{mape['verdict']}, {detail}, n = {n}"


def report_line(out_dir: Path) -> str:
    report, results = out_dir / "report.html", out_dir / "results.json"
    try:  # a report older than results.json is a previous run's: the write failed (logged above)
        if report.stat().st_mtime_ns >= results.stat().st_mtime_ns:
            return str(report)
    except OSError:
        pass
    return f"not written (see the error above); retry with `sheafscope report {out_dir}`"


def print_verdict(models: list[dict], out_dir: Path) -> None:
    """The last lines of a run's stdout: the verdict and where the report is."""
    print(f"Verdict: {verdict_line(out_dir, models)}")
    print(f"Report: {report_line(out_dir)}")


def print_grid(table: dict, out: Path) -> None:
    print(f"\nL* across {len(table['conditions'])} condition(s): spread = max - min over the conditions a model ran in")
    print(f"{'model':28s} {'ran':>4s} " + " ".join(f"{'L*' + n + ' spread':>20s}" for n in lstar.DEFINITIONS))
    for model, s in table["spread"].items():
        cells = [f"{s[n]['spread']:20.2f}" if s.get(n) else f"{'-':>20s}" for n in lstar.DEFINITIONS]
        print(f"{model:28s} {s['conditions_ok']:>4d} " + " ".join(cells))
    flips, settled = table["verdict_flips"], table["settled_flips"]
    print("Verdict flips: " + ("; ".join(f"{c}: {' / '.join(v)}" + (" (each settled: a real flip)" if c in settled else
                                                                     " (not every verdict settled: within the intervals)")
                                         for c, v in flips.items()) if flips else "none among the conditions that judged"))
    for claim, where in table["not_judged"].items():
        print(f"Not judged: {claim} in {', '.join(where)} (robustness.json: not_judged)")
    print(f"Results: {out / 'robustness.json'}, robustness.csv, figures/robustness.png; each condition in {out}/<condition>/")
