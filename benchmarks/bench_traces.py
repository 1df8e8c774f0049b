#!/usr/bin/env python
"""Benchmark: sheafscope's fast path against a plain forward, the eager path and the notebooks.

On one model and the same token ids, four methods:

  a  plain forward: the transformer trunk (model.base_model, no LM head) with sdpa attention;
  b  sheafscope fast path, analysis level: what `analyze` does per batch of prompts
     (launch_batch: forward with the diagonal capture and residual maxima; the next batch is
     launched before this one's result() (NaN checks) and prompt_result per prompt, as analyze
     pipelines them; ||W_V||^2, once per model, is computed before timing);
  c  sheafscope eager reference path (capture_eager, one prompt at a time, then prompt_result);
  d  the notebooks' method (notebook 000, re-implemented): eager attention with
     output_attentions and output_hidden_states, one prompt at a time, and for every prompt and
     layer the value weight copied to the CPU (`.float().cpu()`) and each head's trace from the
     full attention matrix (`.sum().item()`, `.trace().item()`), as notebook 000 computes it.

Lengths: one prompt of n random token ids (seeded) per length; corpus: N prompts of 8..40
random token ids (seeded), batched as `analyze` batches them (longest first) for a and b, one
at a time for c and d; its time is one whole pass, after a warm-up on the first two batches
(CPU) or on one batch of every shape (GPU: attention kernels are planned per shape).

Time: median of repeats after a warm-up run (torch.cuda.synchronize on a GPU). Memory, taken
during the warm-up run: on a GPU torch.cuda.max_memory_allocated above what was allocated
before it; on the CPU each configuration runs in a fresh subprocess that samples its resident
set size (RSS) every 2 ms: peak RSS minus RSS before the run (also ru_maxrss's growth, which
misses peaks below the load-time peak). Configurations that would obviously exceed memory, the
model's context, or --max-seconds (extrapolated from the previous length) are skipped and
recorded with the reason. b/a: where a and b run in this process (a GPU; --isolate no), a
and b are then also timed alternately on the same inputs and b/a is the median of those
pairs' ratios (host speed drifts by tens of percent over a run; alternation cancels it), with
their quartiles (how much one pair varies on this machine) and a 95% bootstrap interval of that
median (how far it could move with other pairs on the same host); the ratio of the separate
medians is kept as "b/a separate runs".

    python benchmarks/bench_traces.py                          # smollm2-135m on the CPU
    python benchmarks/bench_traces.py --model random:mistral-7b --dtype bfloat16 --context 65536
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

METHODS = {
    "a": "plain forward (sdpa)",
    "b": "sheafscope fast",
    "c": "sheafscope eager",
    "d": "notebook 000 method",
}
DEFAULT_LENGTHS = [16, 512, 2048, 8192, 32768, 65536]


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------
def token_ids(n: int, vocab: int, seed: int):
    """(1, n) random token ids, avoiding the low ids where special tokens usually sit."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, min(vocab, 32000), (1, n), generator=g)


def corpus(size: int, vocab: int, seed: int) -> list:
    import torch

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, 41, (size,), generator=g).tolist()
    return [torch.randint(10, min(vocab, 32000), (1, n), generator=g) for n in lengths]


def batches(prompts: list, size: int) -> list[list]:
    """Longest first, `size` at a time: the batches `analyze` forms for a and b."""
    order = sorted(prompts, key=lambda p: -p.shape[1])
    return [order[i : i + size] for i in range(0, len(order), size)]


# ------------------------------------------------------------------------------------------------
# The four methods
# ------------------------------------------------------------------------------------------------
def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def run_plain(loaded, groups: list[list], norm_sq) -> None:
    import torch

    from sheafscope.capture_fast import padded_batch

    model = loaded.model
    with torch.no_grad():
        for group in groups:
            # padded as capture_batch pads, so that a and b differ only in what b adds
            ids, _, mask = padded_batch(group)
            model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)


FAST_STATS: dict[str, Any] = {}  # what the fast path ran in the last run_fast


def run_fast(loaded, groups: list[list], norm_sq, **capture_options) -> None:
    """Method b; capture_options go to launch_batch (capture_overhead.py's variants)."""
    from sheafscope.analysis import prompt_result
    from sheafscope.capture_fast import BatchStats, launch_batch

    stats = BatchStats()
    pending = None
    # as analysis._capture_fast_all: batch i + 1 is launched before batch i is collected
    for group in [*groups, None]:
        launched = None if group is None else launch_batch(loaded.model, loaded.adapter.blocks, group, **capture_options)
        if pending is not None:
            for cap in pending.result(stats):
                prompt_result("", cap, False, norm_sq)
        pending = launched
    FAST_STATS.update(kernels=dict(stats.kernels), fallbacks=stats.fallbacks)


def run_eager(loaded, groups: list[list], norm_sq) -> None:
    from sheafscope.analysis import prompt_result
    from sheafscope.capture.eager import capture_eager

    layers = loaded.adapter.geometry.n_layers
    for group in groups:
        for p in group:
            prompt_result("", capture_eager(loaded.model, p, layers), False, norm_sq)


def _notebook_trace(attention, w_v) -> float:
    # notebook 000's compute_trace_efficient, verbatim in its arithmetic
    w_v_frobenius_sq = (w_v**2).sum().item()
    attention_sum = attention.sum().item()
    attention_trace = attention.trace().item()
    return (attention_sum - attention_trace) * w_v_frobenius_sq


def run_notebook(loaded, groups: list[list], norm_sq) -> None:
    """notebook 000: extract_multihead_attention_W_V + the per-layer loop of analyze_model_extended."""
    import torch

    model, adapter = loaded.model, loaded.adapter
    g = adapter.geometry
    for group in groups:
        for p in group:
            with torch.no_grad():
                outputs = model(input_ids=p, output_attentions=True, output_hidden_states=True, use_cache=False)
            attentions = outputs.attentions
            w_v_per_layer = []
            for layer in range(g.n_layers):
                # The notebook copies each layer's value weight to the CPU for every prompt, then
                # slices it per head. The slices are right for separate v_proj layouts (Llama,
                # Mistral, OPT; GQA read per KV head); for fused QKV they are the notebook's
                # own D1/D2 slices. This is a cost baseline: its numbers are not used.
                w_v_full = adapter.value_input_module(layer).weight.data.float().cpu()
                rows = g.head_dim
                w_v_per_layer.append([w_v_full[(h // g.group_size) * rows : (h // g.group_size + 1) * rows]
                                      for h in range(g.n_heads)])
            traces_full, traces_mh = [], []
            for layer, attn in enumerate(attentions):
                heads = w_v_per_layer[layer]
                traces_full.append(_notebook_trace(attn[0].mean(dim=0), heads[0]))
                traces_mh.append(sum(_notebook_trace(attn[0][h], heads[h]) for h in range(attn.shape[1])))


RUNNERS = {"a": (run_plain, "sdpa"), "b": (run_fast, "fast"), "c": (run_eager, "eager"), "d": (run_notebook, "eager")}


# ------------------------------------------------------------------------------------------------
# Measuring one configuration
# ------------------------------------------------------------------------------------------------
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssSampler:
    """Peak resident set size while active, sampled every 2 ms in a thread."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.002)

    def __enter__(self):
        self.peak = _rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def set_path(loaded, path: str) -> None:
    from sheafscope.capture_fast import FAST_ATTENTION

    impl = {"sdpa": "sdpa", "fast": FAST_ATTENTION, "eager": "eager"}[path]
    if loaded.model.config._attn_implementation != impl:
        loaded.model.set_attn_implementation(impl)


def measure(loaded, method: str, groups: list[list], repeats: int, max_seconds: float,
            warmup_groups: list[list] | None = None) -> dict[str, Any]:
    """Warm-up (on `warmup_groups`, default all), then timed repeats (as many as fit in
    max_seconds, at least one). Memory is measured during the warm-up."""
    import torch

    from sheafscope.measures.restriction import norms_sq

    runner, path = RUNNERS[method]
    set_path(loaded, path)
    norm_sq = norms_sq(loaded.adapter).numpy()
    device = loaded.device
    # Prime: a short forward pages in memory-mapped weights and starts thread pools, which
    # would otherwise count as this method's memory.
    run_plain(loaded, [[groups[0][0][:, :4]]], norm_sq)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
    # Memory baselines before the warm-up: allocators keep what the warm-up freed, so a
    # baseline taken after it would hide the working set.
    if device.type == "cuda":
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        sampler = None
    else:
        base = _rss_bytes()
        maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        sampler = RssSampler().__enter__()
    t = time.perf_counter()
    runner(loaded, warmup_groups or groups, norm_sq)
    _sync(device)
    warm = time.perf_counter() - t
    # Memory is the warm-up's: the sampling thread would perturb the timed runs (on a small
    # CPU its wake-ups stall the compute threads).
    if sampler:
        sampler.__exit__()
    peak = (torch.cuda.max_memory_allocated() - base) if device.type == "cuda" else sampler.peak - base
    times, notes = [], []
    if warm > max_seconds and warmup_groups is None:
        notes.append("one run only: the warm-up run already took longer than --max-seconds")
        times = [warm]
    else:
        spent = 0.0
        for _ in range(repeats):
            if times and spent + statistics.median(times) > max_seconds:
                notes.append(f"{len(times)} of {repeats} repeats within --max-seconds")
                break
            t = time.perf_counter()
            runner(loaded, groups, norm_sq)
            _sync(device)
            times.append(time.perf_counter() - t)
            spent += times[-1]
    out = {"times_s": times, "median_s": statistics.median(times), "warmup_s": warm,
           "peak_mem_bytes": peak, "notes": notes}
    if method == "b":
        out["fast_path"] = dict(FAST_STATS)  # kernel calls per pass, fallback reasons
    if device.type == "cpu":
        out["ru_maxrss_growth_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - maxrss0
        out["mem_measure"] = "peak RSS during the warm-up run minus RSS before it (2 ms sampling)"
    else:
        out["mem_measure"] = "torch.cuda.max_memory_allocated during the warm-up run minus memory allocated before it"
    return out


def interleaved(loaded, groups: list[list], repeats: int, max_seconds: float) -> dict[str, Any]:
    """a and b timed alternately (a, b, a, b, ...) on the same inputs, after both were
    measured on their own (so both are warm): drift in the machine's speed (a busy or
    throttled host makes the same plain forward vary by tens of percent at short n) then hits
    both alike. b/a is the median of the per-pair ratios."""
    from sheafscope.measures.restriction import norms_sq
    from sheafscope.tail_graphs import KERNEL_NAME

    norm_sq = norms_sq(loaded.adapter).numpy()
    times: dict[str, list[float]] = {"a": [], "b": []}
    replayed: list[int] = []  # per pair, b's tail graph replays (0 where its tail ran op by op)
    spent = 0.0
    for _ in range(repeats):
        for method in ("a", "b"):
            runner, path = RUNNERS[method]
            set_path(loaded, path)
            _sync(loaded.device)
            t = time.perf_counter()
            runner(loaded, groups, norm_sq)
            _sync(loaded.device)
            times[method].append(time.perf_counter() - t)
        replayed.append(FAST_STATS["kernels"].get(KERNEL_NAME, 0))
        spent += times["a"][-1] + times["b"][-1]
        if spent * (1 + 1 / len(times["a"])) > max_seconds:
            break
    ratios = [tb / ta for ta, tb in zip(times["a"], times["b"])]
    # the pairs' quartiles: how far one pair's ratio can be trusted on this machine
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) >= 4 else [min(ratios), max(ratios)]
    return {"a_times_s": times["a"], "b_times_s": times["b"], "a_median_s": statistics.median(times["a"]),
            "b_median_s": statistics.median(times["b"]), "b/a": statistics.median(ratios), "pairs": len(ratios),
            "b/a quartiles": [quartiles[0], quartiles[-1]], "b/a median 95% interval": median_interval(ratios),
            "b_tail_replays": replayed}


def median_interval(values: list[float], resamples: int = 4000, seed: int = 0) -> list[float]:
    """A 95% percentile-bootstrap interval of the median of `values`: how far the run's b/a
    could move if its pairs were drawn again on the same host (not across hosts)."""
    import numpy as np

    x = np.asarray(values, dtype=np.float64)
    if x.size < 2:
        return [float(x.min()), float(x.max())] if x.size else [float("nan")] * 2
    draws = np.random.default_rng(seed).integers(0, x.size, size=(resamples, x.size))
    lo, hi = np.quantile(np.median(x[draws], axis=1), [0.025, 0.975])
    return [float(lo), float(hi)]


# ------------------------------------------------------------------------------------------------
# Orchestration
# ------------------------------------------------------------------------------------------------
def load(args):
    from sheafscope import load_model

    overrides = {"max_position_embeddings": args.context} if args.context else {}
    for item in filter(None, (getattr(args, "config", None) or "").split(",")):
        key, _, value = item.partition("=")
        overrides[key.strip()] = int(value)
    return load_model(args.model, device=args.device, dtype=args.dtype, attention="fast",
                      config_overrides=overrides or None)


def inputs_for(config: dict[str, Any], loaded, args) -> list[list]:
    vocab = loaded.model.get_input_embeddings().weight.shape[0]
    if config["n"] == "corpus":
        prompts = [p.to(loaded.device) for p in corpus(args.corpus_size, vocab, args.seed)]
        size = 1 if config["method"] in ("c", "d") else args.batch_size or (32 if loaded.device.type == "cuda" else 8)
        return batches(prompts, size)
    return [[token_ids(config["n"], vocab, args.seed + config["n"]).to(loaded.device)]]


def run_config(loaded, config: dict[str, Any], args) -> dict[str, Any]:
    groups = inputs_for(config, loaded, args)
    if config["n"] == "corpus":
        # On the CPU, warm up on the first (longest) batches only: a whole extra pass would
        # double the run, and memory is that of the largest batches anyway. On a GPU, warm up
        # on one batch of every shape: kernels are planned per shape (cuDNN attention), and a
        # first call per shape would otherwise land in the timed pass.
        if loaded.device.type == "cuda":  # one batch of every shape
            warm = list({tuple(p.shape[1] for p in g): g for g in groups}.values())
        else:
            warm = groups[:2]
        return measure(loaded, config["method"], groups, args.corpus_repeats, args.max_seconds, warmup_groups=warm)
    return measure(loaded, config["method"], groups, args.repeats, args.max_seconds)


def worker(args) -> None:
    """One configuration in this fresh process (CPU memory isolation); prints one JSON line."""
    config = json.loads(args.worker)
    import torch

    torch.manual_seed(0)
    loaded = load(args)
    result = run_config(loaded, config, args)
    print("RESULT " + json.dumps(result), flush=True)


def in_subprocess(config: dict[str, Any], argv: list[str], timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--worker", json.dumps(config)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"skipped": f"killed after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    if proc.returncode in (-9, 137):
        return {"skipped": "killed (out of memory)"}
    return {"skipped": "failed: " + " | ".join(tail)}


def available_memory(loaded) -> int:
    import torch

    if loaded.device.type == "cuda":
        return torch.cuda.mem_get_info()[0]
    import psutil

    return psutil.virtual_memory().available


def obvious_skip(config, loaded, args, last: dict[str, tuple[int, float]]) -> str | None:
    """Why this configuration would obviously fail or take too long, or None."""
    n, method = config["n"], config["method"]
    if n == "corpus":
        return None
    limit = loaded.context_length
    if limit is not None and n > limit:
        return f"n = {n} exceeds the model's {limit}-token context (a random twin takes --context)"
    g = loaded.adapter.geometry
    elem = loaded.model.get_input_embeddings().weight.element_size()
    if method in ("c", "d"):
        # every layer's (heads, n, n) attention is kept, plus the softmax's float32 working set
        need = g.n_layers * g.n_heads * n * n * elem + 3 * g.n_heads * n * n * 4
        have = available_memory(loaded)
        if need > 0.8 * have:
            return f"needs ~{need / 2**30:.0f} GiB for the attention matrices, {have / 2**30:.0f} GiB available"
    if method in last and last[method][0] >= 1024:
        # Extrapolated only from n >= 1024, where the quadratic attention term is already
        # visible; below, fixed per-call costs dominate and (n/n_prev)^2 would be absurd.
        n_prev, t_prev = last[method]
        predicted = t_prev * (n / n_prev) ** 2  # an upper bound: the rest grows linearly
        if predicted > args.max_seconds:
            return f"predicted {predicted:.0f} s (from {t_prev:.1f} s at n = {n_prev}, times (n/n_prev)^2) > --max-seconds {args.max_seconds:.0f}"
    return None


def environment(loaded) -> dict[str, Any]:
    import torch
    import transformers

    env = {
        "device": str(loaded.device),
        "device_name": torch.cuda.get_device_name(loaded.device) if loaded.device.type == "cuda" else platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            env["cpu_model"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if loaded.device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["gpu_memory_bytes"] = torch.cuda.get_device_properties(loaded.device).total_memory
    return env


def fmt_mem(b) -> str:
    return "-" if b is None else f"{b / 2**20:.0f} MiB"


def table(rows: list[dict[str, Any]], ratios: list[dict[str, Any]]) -> str:
    lines = ["| n | method | median time | peak memory | note |", "|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['n']} | {r['method']} {METHODS[r['method']]} | skipped | | {r['skipped']} |")
        else:
            note = "; ".join(r.get("notes", []))
            lines.append(f"| {r['n']} | {r['method']} {METHODS[r['method']]} | {r['median_s']:.3f} s | {fmt_mem(r['peak_mem_bytes'])} | {note} |")
    lines += ["", "| n | b/a (fast / plain) | b/a median's 95% interval | b/a pairs' quartiles | b/a, separate runs "
              "| d/b (notebook / fast) | c/b (eager / fast) |", "|---|---|---|---|---|---|---|"]
    for q in ratios:
        f = lambda k: "-" if q.get(k) is None else f"{q[k]:.2f}"  # noqa: E731
        spread = "-" if not q.get("b/a quartiles") else "{:.2f}–{:.2f}".format(*q["b/a quartiles"])
        interval = "-" if not q.get("b/a median 95% interval") else "{:.3f}–{:.3f}".format(*q["b/a median 95% interval"])
        lines.append(f"| {q['n']} | {f('b/a')} | {interval} | {spread} | {f('b/a separate runs')} | {f('d/b')} | {f('c/b')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="model spec (sheafscope load_model); default smollm2-135m")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--lengths", default=",".join(map(str, DEFAULT_LENGTHS)), help="comma-separated prompt lengths")
    p.add_argument("--corpus-size", type=int, default=1000, help="short prompts (8-40 tokens) in the corpus; 0: none")
    p.add_argument("--methods", default="abcd", help="subset of abcd")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per length (median reported)")
    p.add_argument("--corpus-repeats", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=None, help="corpus batch for a and b (default: analyze's automatic 8 CPU / 32 GPU)")
    p.add_argument("--max-seconds", type=float, default=300.0, help="time budget per configuration")
    p.add_argument("--context", type=int, default=None, help="max_position_embeddings override for random twins (e.g. 65536)")
    p.add_argument("--config", default=None, help="integer config overrides for random twins, e.g. hidden_size=256,head_dim=8")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--isolate", choices=["auto", "yes", "no"], default="auto",
                   help="a fresh subprocess per configuration (auto: on the CPU, where RSS is the memory measure)")
    p.add_argument("--out", default=None, help="write the JSON here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    import torch

    torch.manual_seed(0)
    t0 = time.time()
    loaded = load(args)
    isolate = args.isolate == "yes" or (args.isolate == "auto" and loaded.device.type == "cpu")
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    configs = [{"n": n, "method": m} for n in lengths for m in args.methods]
    if args.corpus_size:
        configs += [{"n": "corpus", "method": m} for m in args.methods]
    env = environment(loaded)
    info = {"model": loaded.spec, "dtype": str(loaded.dtype).removeprefix("torch."), "geometry": vars(loaded.adapter.geometry),
            "context_length": loaded.context_length, "attention_path": loaded.attention_path, "corpus_size": args.corpus_size,
            "isolated_subprocesses": isolate, "args": vars(args), "methods": METHODS, "environment": env}
    rows, last = [], {}
    print(f"{loaded.spec} on {env['device_name']} ({info['dtype']}), torch {env['torch']}, transformers {env['transformers']}", flush=True)
    for config in configs:
        reason = obvious_skip(config, loaded, args, last)
        if reason:
            row = {**config, "skipped": reason}
        else:
            if isolate:
                res = in_subprocess(config, passthrough, timeout=max(600.0, 4 * args.max_seconds))
            else:
                try:
                    res = run_config(loaded, config, args)
                except torch.OutOfMemoryError:
                    res = {"skipped": "out of GPU memory"}
                    gc.collect()
                    torch.cuda.empty_cache()
            row = {**config, **res}
            a_row = next((r for r in rows if r["n"] == config["n"] and r["method"] == "a"), None)
            if config["method"] == "b" and "median_s" in row and a_row and "median_s" in a_row and not isolate:
                repeats = max(5, args.corpus_repeats) if config["n"] == "corpus" else max(args.repeats, 9)
                try:
                    row["interleaved"] = interleaved(loaded, inputs_for(config, loaded, args), repeats, args.max_seconds)
                except torch.OutOfMemoryError:
                    row.setdefault("notes", []).append("interleaved timing skipped: out of GPU memory")
                    gc.collect()
                    torch.cuda.empty_cache()
            if "median_s" in row and config["n"] != "corpus":
                last[config["method"]] = (config["n"], row["median_s"])
        rows.append(row)
        shown = row.get("skipped") or f"{row['median_s']:.3f} s, {fmt_mem(row['peak_mem_bytes'])}"
        if "interleaved" in row:
            il = row["interleaved"]
            shown += f"; interleaved with a: a {il['a_median_s']:.3f} s, b {il['b_median_s']:.3f} s, b/a {il['b/a']:.2f}"
        print(f"  n={config['n']:>6} {config['method']} {METHODS[config['method']]:<22} {shown}", flush=True)
        if args.out:  # after every configuration, so a run cut short keeps what it measured
            write_results(args.out, info, rows, lengths, args.corpus_size, time.time() - t0, complete=False)
    text = write_results(args.out, info, rows, lengths, args.corpus_size, time.time() - t0, complete=True)
    print("\n" + text)
    if args.out:
        print(f"\nwrote {args.out}")
    return 0


def write_results(out: str | None, info: dict[str, Any], rows: list[dict[str, Any]], lengths: list[int],
                  corpus_size: int, elapsed_s: float, complete: bool) -> str:
    """The ratios and the markdown table of `rows`; written as JSON to `out` when given."""
    ratios = []
    for n in [*lengths, *(["corpus"] if corpus_size else [])]:
        t = {r["method"]: r["median_s"] for r in rows if r["n"] == n and "median_s" in r}
        q = {"n": n}
        for key, (num, den) in {"b/a": ("b", "a"), "d/b": ("d", "b"), "c/b": ("c", "b")}.items():
            q[key] = t[num] / t[den] if num in t and den in t else None
        il = next((r["interleaved"] for r in rows if r["n"] == n and "interleaved" in r), None)
        if il is not None:  # the better estimate where it exists (see `interleaved`)
            q["b/a separate runs"], q["b/a"] = q["b/a"], il["b/a"]
            q["b/a quartiles"] = il.get("b/a quartiles")
            q["b/a median 95% interval"] = il.get("b/a median 95% interval")
        ratios.append(q)
    text = table(rows, ratios)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        record = {**info, "elapsed_s": elapsed_s, "complete": complete, "results": rows, "ratios": ratios, "table_markdown": text}
        Path(out).write_text(json.dumps(record, indent=2, default=str))
    return text


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    sys.exit(main())
