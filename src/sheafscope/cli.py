"""Command line: a thin layer over the Python API.

    sheafscope run [--model SPEC ...] [--suite NAME|FILE] [--prompts FILE] [--out DIR]
    sheafscope models          # offline aliases and catalog
    sheafscope suites          # built-in suites
    sheafscope report DIR      # self-contained report.html

Exit codes: 0 all models ran; 1 some model failed (the others' results are written);
2 the run could not start (bad option, missing prompts file, unknown model).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from sheafscope import __version__
from sheafscope.errors import SheafscopeError
from sheafscope.measures.restriction import RESTRICTION_MAPS

if TYPE_CHECKING:
    from sheafscope.measures.lstar import LStarDefinition

EXIT_OK, EXIT_MODEL_FAILED, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sheafscope", description="Sheaf Laplacian traces of transformer attention, layer by layer.")
    p.add_argument("--version", action="version", version=f"sheafscope {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="measure traces and L* for models over prompts")
    r.add_argument("--model", "-m", action="append", dest="models", metavar="SPEC",
                   help="offline alias, catalog name, hub id, local dir or .gguf file; prefix random: for an untrained twin; repeatable")
    r.add_argument("--suite", help="built-in suite name or a suite .toml file (default when no --model: offline)")
    r.add_argument("--prompts", help="a .txt (one prompt a line) or .jsonl ('text' field) file, or a built-in set: notebooks, research-v1")
    r.add_argument("--out", "-o", default="sheafscope-results", help="output directory (default: %(default)s)")
    r.add_argument("--init", choices=["pretrained", "random"], default="pretrained",
                   help="random: untrained twin of each catalog model's shape (a control)")
    r.add_argument("--seed", type=int, default=0, help="seed for --init random (default 0)")
    r.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default float32 on CPU, bfloat16 on GPU")
    r.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    r.add_argument("--revision", help="hub revision (branch, tag or commit)")
    r.add_argument("--quantize", choices=["4bit", "8bit"], help="load hub/local weights through bitsandbytes")
    r.add_argument("--restriction-map", default="raw_wv", choices=list(RESTRICTION_MAPS),
                   help="the map on each edge (default: %(default)s); "
                        + "; ".join(f"{m.name}: {m.definition}" for m in RESTRICTION_MAPS.values()))
    r.add_argument("--max-tokens", type=int, help="truncate longer prompts to this many tokens (recorded per prompt)")
    r.add_argument("--attention", choices=["fast", "eager"], default="fast",
                   help="fast: attention diagonals captured inside the forward pass (default); eager: explicit n x n matrices (reference)")
    r.add_argument("--batch-tokens", type=int,
                   help="padded tokens per forward pass; prompts of like length share a batch (default: 4096 on the CPU, "
                        "65536 on a GPU; halved on out-of-memory)")
    r.add_argument("--force", action="store_true", help="recompute models already complete in --out")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")

    sub.add_parser("models", help="list offline aliases and catalog models")
    sub.add_parser("suites", help="list built-in suites")
    rep = sub.add_parser("report", help="write DIR/report.html from a finished run")
    rep.add_argument("dir")
    return p


def _cmd_models() -> int:
    from sheafscope.models.catalog import catalog

    print(f"{'name':<20} {'kind':<10} {'family':<16} {'L':>3} {'H':>3} {'KV':>3}  lab / hub id")
    for name, e in catalog().items():
        c = e.config
        L = c.get("num_hidden_layers") or c.get("n_layer")
        H = c.get("num_attention_heads") or c.get("n_head")
        kv = c.get("num_key_value_heads", H)
        kind = "offline" if e.offline else "hub/twin"
        print(f"{name:<20} {kind:<10} {e.config_class.removesuffix('Config'):<16} {L:>3} {H:>3} {kv:>3}  {e.lab} / {e.hub_id}")
    print("\nAny catalog name with --init random (or random:NAME) builds an untrained twin of that shape.")
    return EXIT_OK


def _cmd_suites() -> int:
    from sheafscope.suites import list_suites

    for s in list_suites():
        print(f"{s.name:<16} {len(s.models):>3} models  {s.description}")
    return EXIT_OK


def _lstar_cell(d: LStarDefinition, block: dict | None) -> str:
    if block is None:  # a resumed run's model computed before the definition existed
        return "-"
    if d.over == "prompts":
        return f"{block['mean']:.1f}±{block['std']:.1f}"
    return "-" if block["value"] is None else str(block["value"])


def print_summary(models: list[dict], out_dir: Path) -> None:
    from sheafscope.measures.lstar import DEFINITIONS, EMPIRICAL

    defs = list(DEFINITIONS.values())
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
    print(f"pred: the formula, '!' where it exceeds L (D10); err%: |pred - L*{EMPIRICAL}| / L.")
    print(f"Results: {out_dir}/results.json, summary.csv, analysis.json")


def _cmd_run(args: argparse.Namespace) -> int:
    from sheafscope.models.loading import classify_spec
    from sheafscope.prompts import load_prompts
    from sheafscope.runner import ModelEntry, RunOptions, run
    from sheafscope.suites import load_suite

    suite = None
    if args.models:
        entries = [ModelEntry(s) for s in args.models]
        prompt_source = args.prompts
    else:
        suite = load_suite(args.suite or "offline")
        entries = suite.models
        prompt_source = args.prompts or suite.prompts
    for e in entries:  # an unknown name fails now, not after an hour of other models
        classify_spec(e.spec, args.init)
    prompts, label = load_prompts(prompt_source)
    opts = RunOptions(dtype=args.dtype, device=args.device, restriction_map=args.restriction_map, max_tokens=args.max_tokens,
                      revision=args.revision, quantize=args.quantize, seed=args.seed, init=args.init,
                      attention=args.attention, batch_tokens=args.batch_tokens)
    out = Path(args.out)
    print(f"sheafscope {__version__}: {len(entries)} model(s) x {len(prompts)} prompt(s) ({label}) -> {out}", file=sys.stderr)
    outcome = run(entries, prompts, opts, out, prompt_source=label, force=args.force, show_progress=not args.no_progress,
                  suite=suite.to_dict() if suite else None)
    print_summary(outcome.models, out)
    if outcome.n_failed:
        print(f"\n{outcome.n_failed} of {len(outcome.models)} model(s) failed; the others' results are written.", file=sys.stderr)
        return EXIT_MODEL_FAILED
    return EXIT_OK


def _cmd_report(args: argparse.Namespace) -> int:
    from sheafscope.outputs.report import write_report

    d = Path(args.dir)
    if not (d / "results.json").exists():
        raise SheafscopeError(f"{d}/results.json not found: run `sheafscope run --out {d}` first")
    print(write_report(d))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        if args.command == "run":
            return _cmd_run(args)
        if args.command == "models":
            return _cmd_models()
        if args.command == "suites":
            return _cmd_suites()
        if args.command == "report":
            return _cmd_report(args)
    except SheafscopeError as e:
        print(f"sheafscope: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("\nsheafscope: interrupted; finished models are kept in --out and a rerun resumes", file=sys.stderr)
        return 130
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
