"""Command line: a thin layer over the Python API.

    sheafscope run [--model SPEC ...] [--suite NAME|FILE] [--prompts FILE] [--out DIR]
    sheafscope models          # offline aliases and catalog
    sheafscope suites          # built-in suites
    sheafscope report DIR      # self-contained report.html

Exit codes: 0 all models ran; 1 some model failed (the others' results are written);
2 the run could not start (bad option, unreadable prompts file, unknown model, unusable
--out): every option and input is checked before any model loads, and one line on stderr
says what is wrong and how to fix it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from sheafscope import __version__
from sheafscope.errors import ConfigError, OutputWriteError, SheafscopeError
from sheafscope.measures.restriction import RESTRICTION_MAPS
from sheafscope.outputs.console import print_grid, print_summary, print_verdict

EXIT_OK, EXIT_MODEL_FAILED, EXIT_USAGE = 0, 1, 2
SEED_MAX = 2**63 - 1
# Libraries whose warnings and banners are filtered unless --verbose.
_LIBRARIES = r"(transformers|torch|huggingface_hub|accelerate|bitsandbytes|tokenizers|safetensors|gguf|tqdm)(\..*)?$"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (and exit 2), not usage + error."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USAGE, f"sheafscope: error: {message}; see `{self.prog} --help`\n")


def _int_in(low: int, high: int | None, why: str, high_text: str | None = None):
    """An argparse type: an integer in [low, high], else a message naming the range and why."""
    rule = f"an integer >= {low}" if high is None else f"an integer from {low} to {high_text or high}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {rule}, not '{text}'{why}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {rule}, not {value}{why}")
        return value

    return parse


def _max_memory(text: str) -> dict:
    """An argparse type: --max-memory DEVICE=SIZE,... as accelerate's max_memory {0: bytes, "cpu": bytes}."""
    from sheafscope.models.placement import parse_max_memory

    try:
        return parse_max_memory(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--max-memory").lstrip(": ")) from None


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="sheafscope", description="Sheaf Laplacian traces of transformer attention, layer by layer.")
    p.add_argument("--version", action="version", version=f"sheafscope {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="measure traces and L* for models over prompts")
    # a suite names its own models: given both, one would be dropped without a word
    models = r.add_mutually_exclusive_group()
    models.add_argument("--model", "-m", action="append", dest="models", metavar="SPEC",
                        help="offline alias, catalog name, hub id, local dir or .gguf file; prefix random: for an untrained twin; repeatable")
    models.add_argument("--suite", help="built-in suite name or a suite .toml file, instead of --model (default when no --model: offline)")
    r.add_argument("--prompts", help="a .txt (one prompt a line) or .jsonl ('text' field) file, or a built-in set: notebooks, research-v1")
    r.add_argument("--out", "-o", default="sheafscope-results", help="output directory (default: %(default)s)")
    r.add_argument("--init", choices=["pretrained", "random"], default="pretrained",
                   help="random: untrained twin of each catalog model's shape (a control)")
    r.add_argument("--seed", type=_int_in(0, SEED_MAX, "", "2**63 - 1"), default=0, help="seed for --init random (default 0)")
    r.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default float32 on CPU, bfloat16 on GPU")
    r.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    r.add_argument("--revision", help="hub revision (branch, tag or commit)")
    r.add_argument("--quantize", choices=["4bit", "8bit"], help="load hub/local weights through bitsandbytes")
    r.add_argument("--restriction-map", default="raw_wv", choices=list(RESTRICTION_MAPS),
                   help="the map on each edge (default: %(default)s); "
                        + "; ".join(f"{m.name}: {m.definition}" for m in RESTRICTION_MAPS.values()))
    r.add_argument("--max-tokens", type=_int_in(2, None, " (an attention graph needs at least 2 tokens); omit it to keep prompts whole"),
                   help="truncate longer prompts to this many tokens, at least 2 (recorded per prompt)")
    r.add_argument("--attention", choices=["fast", "eager"], default="fast",
                   help="fast: attention diagonals captured inside the forward pass (default); eager: explicit n x n matrices (reference)")
    r.add_argument("--batch-tokens", type=_int_in(1, None, "; omit it for the device default"),
                   help="padded tokens per forward pass; prompts of like length share a batch (default: 4096 on the CPU, "
                        "65536 on a GPU; halved on out-of-memory)")
    r.add_argument("--device-map", choices=["auto", "balanced", "sequential"],
                   help="spread each model over the devices with accelerate (larger than one GPU); --device then only "
                        "sets the default dtype")
    r.add_argument("--max-memory", type=_max_memory, metavar="DEVICE=SIZE,...",
                   help="memory each device may hold, e.g. 0=70GiB,1=70GiB,cpu=100GiB (implies --device-map auto); "
                        "what does not fit is offloaded to the CPU, then to --offload-dir")
    r.add_argument("--offload-dir", metavar="DIR", help="directory for weights offloaded to disk (implies --device-map auto)")
    r.add_argument("--force", action="store_true", help="recompute models already complete in --out")
    r.add_argument("--processes", type=_int_in(1, None, " (processes to share the run's work)"),
                   help="share the work among N processes (started with torchrun: one GPU each, or CPU cores); "
                        "the same as `torchrun --nproc_per_node N -m sheafscope run ...`")
    r.add_argument("--no-progress", action="store_true", help="no progress bars (sheafscope's and the libraries')")
    r.add_argument("--quiet", "-q", action="store_true",
                   help="no progress bars, no library noise and no warnings on stderr: errors only")

    sub.add_parser("models", help="list offline aliases and catalog models")
    sub.add_parser("suites", help="list built-in suites")
    rep = sub.add_parser("report", help="write DIR/report.html from a finished run")
    rep.add_argument("dir")
    pl = sub.add_parser("plan", help="what a run will need per device (weights, activations) and whether it fits; "
                                     "exit 0 if it fits, 1 if not")
    pl.add_argument("--model", "-m", action="append", dest="models", metavar="SPEC", required=True,
                    help="as for run (random:NAME for a twin); repeatable")
    pl.add_argument("--init", choices=["pretrained", "random"], default="pretrained")
    pl.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default float32 on CPU, bfloat16 on GPU")
    pl.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    pl.add_argument("--device-map", choices=["auto", "balanced", "sequential"], help="as accelerate would place the model")
    pl.add_argument("--max-memory", type=_max_memory, metavar="DEVICE=SIZE,...",
                    help="per-device budgets, e.g. 0=70GiB,1=70GiB,cpu=100GiB (implies --device-map auto); a GPU this "
                         "machine lacks is planned for with --gpu-memory, else its budget, as its memory")
    pl.add_argument("--offload-dir", metavar="DIR", help="directory for weights offloaded to disk")
    pl.add_argument("--gpu-memory", metavar="SIZE", help="memory of each GPU this machine lacks, to plan for another "
                                                         "machine (e.g. 80GB; default: its --max-memory budget)")
    pl.add_argument("--processes", type=_int_in(1, None, " (processes sharing the run)"), default=1)
    pl.add_argument("--attention", choices=["fast", "eager"], default="fast")
    pl.add_argument("--batch-tokens", type=_int_in(1, None, "; omit it for the device default"))
    longest = pl.add_mutually_exclusive_group()
    longest.add_argument("--prompts", help="prompts file or built-in set: its longest prompt sizes the activations")
    longest.add_argument("--max-tokens", type=_int_in(2, None, " (an attention graph needs at least 2 tokens)"),
                         help="the longest prompt, in tokens")
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


def apply_suite_options(args: argparse.Namespace, options: dict) -> None:
    """A suite's [options] (e.g. quantize = "4bit") apply where the command line left the
    option at its default; an option given on the command line wins."""
    defaults = _parser().parse_args(["run"])
    for key, value in options.items():
        if getattr(args, key) == getattr(defaults, key):
            setattr(args, key, value)



# --------------------------------------------------------------------------- library noise


_bars_disabled_here = False


def tame_libraries(*, verbose: bool, quiet: bool, progress: bool) -> None:
    """Library warnings and banners off (unless --verbose), and their progress bars off with
    --no-progress or --quiet. Process-wide settings: a later call in the same process resets them."""
    global _bars_disabled_here
    import transformers
    from huggingface_hub.utils import logging as hub_logging

    if quiet:
        logging.getLogger().setLevel(logging.ERROR)
    if not verbose:
        transformers.utils.logging.set_verbosity_error()
        hub_logging.set_verbosity_error()
        for category in (FutureWarning, DeprecationWarning, PendingDeprecationWarning):
            warnings.filterwarnings("ignore", category=category)
        warnings.filterwarnings("ignore", category=UserWarning, module=_LIBRARIES)
    if quiet or not progress:
        transformers.utils.logging.disable_progress_bar()  # also huggingface_hub's bars
        _bars_disabled_here = True
    elif _bars_disabled_here:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            transformers.utils.logging.enable_progress_bar()
        _bars_disabled_here = False


# --------------------------------------------------------------------------- commands


def _cmd_run(args: argparse.Namespace) -> int:
    from sheafscope.analysis import validate_prompts
    from sheafscope.inputs import check_device, check_models, check_out, check_room
    from sheafscope.processes import launched_size, relaunch
    from sheafscope.prompts import load_prompts
    from sheafscope.runner import ModelEntry, RunOptions, run
    from sheafscope.suites import load_suite

    # Everything a user can get wrong is refused here, before any model loads or --out is touched.
    try:
        suite = None
        if args.models:
            entries = [ModelEntry(s) for s in args.models]
            prompt_source = args.prompts
        else:
            suite = load_suite(args.suite or "offline")
            entries = suite.models
            prompt_source = args.prompts or suite.prompts
            apply_suite_options(args, suite.options)
        if args.device is not None:
            check_device(args.device)
        check_models(entries, args.init, args.quantize)  # an unknown name fails now, not after an hour of other models
        prompts, label = load_prompts(prompt_source)
        prompts = validate_prompts(prompts)
        check_room(entries, args)
        out = Path(args.out).expanduser()
        check_out(out)
    except OSError as e:  # an input path that cannot be read (a directory given as a suite file, ...)
        raise ConfigError(f"{e}; check the paths given on the command line") from None
    if args.processes and launched_size() == 1 and args.processes > 1:
        if not args.quiet:
            print(f"sheafscope: starting {args.processes} processes (torchrun)", file=sys.stderr)
        return relaunch(args.processes, args.argv)
    if args.processes and launched_size() != args.processes:
        raise ConfigError(f"--processes {args.processes}, but the launcher started {launched_size()} process(es); "
                          "give one of them, or the same number to both")
    opts = RunOptions(dtype=args.dtype, device=args.device, restriction_map=args.restriction_map, max_tokens=args.max_tokens,
                      revision=args.revision, quantize=args.quantize, seed=args.seed, init=args.init,
                      attention=args.attention, batch_tokens=args.batch_tokens, device_map=args.device_map,
                      max_memory=args.max_memory, offload_dir=args.offload_dir)
    main_process = os.environ.get("RANK", "0") == "0"
    tame_libraries(verbose=args.verbose, quiet=args.quiet or not main_process, progress=not args.no_progress)
    if not args.quiet and main_process:
        print(f"sheafscope {__version__}: {len(entries)} model(s) x {len(prompts)} prompt(s) ({label}) -> {out}", file=sys.stderr)
    if suite is not None and suite.grid:
        return _run_grid(suite, entries, prompt_source, opts, out, args)
    outcome = run(entries, prompts, opts, out, prompt_source=label, force=args.force,
                  show_progress=not (args.no_progress or args.quiet), suite=suite.to_dict() if suite else None)
    if not outcome.main:
        return EXIT_OK  # the main process reports for all
    print_summary(outcome.models, out)
    print_verdict(outcome.models, out)
    if outcome.n_failed:
        print(f"\n{outcome.n_failed} of {len(outcome.models)} model(s) failed; the others' results are written.", file=sys.stderr)
        return EXIT_MODEL_FAILED
    return EXIT_OK


def _run_grid(suite, entries, prompt_source: str | None, opts, out: Path, args: argparse.Namespace) -> int:
    """One run per condition of the suite's grid into OUT/<condition>/, then the comparison."""
    from dataclasses import replace

    from sheafscope import grid
    from sheafscope.analysis import validate_prompts
    from sheafscope.prompts import load_prompts
    from sheafscope.runner import run

    cells, skipped = grid.conditions(suite.grid)
    for s in skipped:
        print(f"sheafscope: condition {s['condition']} left out: {s['why']}", file=sys.stderr)
    inputs = {}
    for cell in cells:  # every condition's prompts are read before the first runs
        settings = dict(cell.settings)
        prompts, label = load_prompts(settings.pop("prompts", prompt_source))
        inputs[cell.name] = (validate_prompts(prompts), label, replace(opts, **settings))
    failed = 0
    for cell in cells:
        prompts, label, cell_opts = inputs[cell.name]
        if not args.quiet:
            print(f"sheafscope: condition {cell.name}: {len(entries)} model(s) x {len(prompts)} prompt(s) ({label})",
                  file=sys.stderr)
        outcome = run(entries, prompts, cell_opts, out / cell.name, prompt_source=label, force=args.force,
                      show_progress=not (args.no_progress or args.quiet), suite=suite.to_dict())
        if not outcome.main:
            continue
        failed += outcome.n_failed
    if os.environ.get("RANK", "0") != "0":
        return EXIT_OK
    table = grid.compare(out, cells, skipped)
    grid.write(out, table)
    print_grid(table, out)
    return EXIT_MODEL_FAILED if failed else EXIT_OK


def _cmd_report(args: argparse.Namespace) -> int:
    from sheafscope.outputs.report import load_results, write_report

    d = Path(args.dir).expanduser()
    if not d.is_dir():
        raise SheafscopeError(f"{d} is not a run directory: run `sheafscope run --out {d}` first")
    load_results(d)  # missing, truncated or not results: ResultsError, before any page is written
    print(write_report(d))
    return EXIT_OK


def _cmd_plan(args: argparse.Namespace) -> int:
    """Each model's plan; exit 0 if every one fits, 1 if one does not (bad input: 2)."""
    from sheafscope.plan import longest_tokens_bound, plan
    from sheafscope.prompts import load_prompts

    longest = args.max_tokens
    if args.prompts:
        longest = longest_tokens_bound(load_prompts(args.prompts)[0])
    fits = True
    for spec in args.models:
        p = plan(spec, init=args.init, dtype=args.dtype, device=args.device, device_map=args.device_map,
                 max_memory=args.max_memory, offload_dir=args.offload_dir, processes=args.processes,
                 longest_prompt_tokens=longest, batch_tokens=args.batch_tokens, attention=args.attention,
                 gpu_memory=args.gpu_memory)
        print(p.render() + "\n")
        fits = fits and p.fits
    return EXIT_OK if fits else EXIT_MODEL_FAILED


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:  # --help, --version, or a usage error (already printed, one line)
        return EXIT_OK if e.code is None else e.code if isinstance(e.code, int) else EXIT_USAGE
    level = logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    root, saved_level = logging.getLogger(), logging.getLogger().level
    root.setLevel(level)  # basicConfig sets it once per process; main may run again in one (tests)
    if not args.verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        return _dispatch(args)
    finally:
        root.setLevel(saved_level)


def _dispatch(args: argparse.Namespace) -> int:
    try:
        if args.command == "run":
            return _cmd_run(args)
        if args.command == "models":
            return _cmd_models()
        if args.command == "suites":
            return _cmd_suites()
        if args.command == "report":
            return _cmd_report(args)
        if args.command == "plan":
            return _cmd_plan(args)
    except OutputWriteError as e:  # the run started, then a result file could not be written
        print(f"sheafscope: error: {e}", file=sys.stderr)
        return EXIT_MODEL_FAILED
    except SheafscopeError as e:
        print(f"sheafscope: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("\nsheafscope: interrupted; finished models are kept in --out and a rerun resumes", file=sys.stderr)
        return 130
    except OSError as e:  # the run started, then a write failed (a full disk, a vanished directory)
        print(f"sheafscope: error: {e}; models finished before it are kept in --out and a rerun resumes", file=sys.stderr)
        return EXIT_MODEL_FAILED
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
