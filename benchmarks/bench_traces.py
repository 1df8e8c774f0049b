#!/usr/bin/env python
"""Benchmark: sheafscope's fast path against a plain forward, the eager path and the notebooks.

Four methods, one model, the same token ids (benchmarks/README.md has the details):
  a  plain forward of the trunk (model.base_model), sdpa attention, in the right-padded batches
     token_batches forms for the fast path (no mask for causal models);
  b  sheafscope fast: capture_all(target, ids, "fast"), then prompt_result per prompt;
  c  sheafscope eager: capture_all(target, ids, "eager"), then prompt_result per prompt;
  d  notebook 000's method: eager attention with output_attentions and output_hidden_states one
     prompt at a time, value weights copied to the CPU per prompt and layer, each head's trace
     from its full attention matrix with .sum().item() and .trace().item().

    python benchmarks/bench_traces.py --out /tmp/cpu.json
    python benchmarks/bench_traces.py --model random:mistral-7b --context 65536 --out /tmp/gpu.json
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import sheafscope  # noqa: E402
from sheafscope.analysis import prompt_result, target_of, tokenize  # noqa: E402
from sheafscope.capture import fast  # noqa: E402
from sheafscope.capture.batching import BATCH_TOKENS, capture_all, token_batches  # noqa: E402
from sheafscope.errors import SheafscopeError  # noqa: E402
from sheafscope.measures.restriction import norms_sq  # noqa: E402
from sheafscope.prompts import load_prompts  # noqa: E402

HERE = Path(__file__).resolve().parent
METHODS = {"a": "plain forward (sdpa)", "b": "sheafscope fast", "c": "sheafscope eager", "d": "notebook 000 method"}
LENGTHS = {"cpu": "16,512,2048", "cuda": "16,512,2048,8192,32768,65536"}
CORPUS = {"cpu": 200, "cuda": 1000}
PROMPT_FILES = {"mixed": HERE / "prompts" / "mixed.txt"}
WARM_PROMPTS = 4  # c and d on many prompts: warm up on, and extrapolate from, the longest few


class Methods:
    """The four methods on one loaded model; each takes a list of 1-D token-id tensors."""

    def __init__(self, loaded, batch_tokens: int | None):
        self.loaded, self.batch_tokens = loaded, batch_tokens
        pad_id = getattr(loaded.tokenizer, "pad_token_id", None) or 0
        self.target = target_of(loaded.model, pad_id, loaded.adapter)
        self.budget = batch_tokens or BATCH_TOKENS.get(loaded.device.type, BATCH_TOKENS["cpu"])
        self.norm_sq = norms_sq(loaded.adapter, "raw_wv").numpy()  # once per model, never timed
        self.capture_info: dict = {}  # capture_all's info from the last run of b

    def attention(self, method: str) -> None:
        """The attention implementation a method runs with, set before it is timed: sdpa for a,
        eager for c and d, the fast path's for b. capture_all installs its own where it is not
        in place (transformers' set_attn_implementation, once per call, and back): a run installs
        it once for all its prompts, so b and c are timed with it in place."""
        fast_path = fast.register() if self.target.fast_supported else "sdpa"
        self.loaded.model.set_attn_implementation({"a": "sdpa", "b": fast_path}.get(method, "eager"))

    @torch.no_grad()
    def a(self, prompts: list[torch.Tensor]) -> None:
        lengths = [len(p) for p in prompts]
        for batch in token_batches(lengths, self.budget):
            lens = [lengths[i] for i in batch]
            ids = torch.full((len(batch), max(lens)), self.target.pad_id, dtype=torch.long, device=prompts[0].device)
            for row, i in enumerate(batch):
                ids[row, : lengths[i]] = prompts[i]
            mask = None  # causal: right padding cannot reach real tokens' rows
            if not self.target.causal and min(lens) < max(lens):
                mask = (torch.arange(max(lens), device=ids.device)[None] < torch.tensor(lens, device=ids.device)[:, None]).long()
            self.loaded.model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)

    def b(self, prompts: list[torch.Tensor]) -> None:
        caps, self.capture_info = capture_all(self.target, prompts, "fast", self.batch_tokens)
        for cap in caps:
            prompt_result("", cap, False, self.norm_sq)

    def c(self, prompts: list[torch.Tensor]) -> None:
        caps, _ = capture_all(self.target, prompts, "eager")
        for cap in caps:
            prompt_result("", cap, False, self.norm_sq)

    @torch.no_grad()
    def d(self, prompts: list[torch.Tensor]) -> None:
        """notebook 000's extract_multihead_attention_W_V and analyze_model_extended layer loop.
        Heads are sliced per KV head (right for separate v_proj; on fused QKV these are the
        notebook's wrong slices, D1/D2): a cost baseline, its numbers are not used."""
        model, adapter = self.loaded.model, self.loaded.adapter
        g = adapter.geometry
        for p in prompts:
            out = model(input_ids=p[None], output_attentions=True, output_hidden_states=True)
            per_layer = []
            for layer in range(g.n_layers):
                w = adapter.value_input_module(layer).weight.data.float().cpu()
                per_layer.append([w[g.kv_head(h) * g.head_dim : (g.kv_head(h) + 1) * g.head_dim] for h in range(g.n_heads)])
            for attn, heads in zip(out.attentions, per_layer):
                notebook_trace(attn[0].mean(dim=0), heads[0])  # trace_full (D8)
                sum(notebook_trace(attn[0][h], heads[h]) for h in range(attn.shape[1]))  # trace_mh


def notebook_trace(attention: torch.Tensor, w_v: torch.Tensor) -> float:
    """notebook 000's compute_trace_efficient, as written."""
    w_v_frobenius_sq = (w_v**2).sum().item()
    return (attention.sum().item() - attention.trace().item()) * w_v_frobenius_sq


def gpus() -> range:
    """Every visible GPU: a model under a device map computes on all of them."""
    return range(torch.cuda.device_count() if torch.cuda.is_available() else 0)


def timed(fn, prompts: list[torch.Tensor], device: torch.device) -> float:
    def sync():
        for i in gpus() if device.type == "cuda" else ():
            torch.cuda.synchronize(i)

    sync()
    t = time.perf_counter()
    fn(prompts)
    sync()
    return time.perf_counter() - t


def status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


class PeakMemory:
    """Peak bytes in use during a run above those in use before it: on a GPU the allocator's
    peak; on Linux the resident-set high-water mark (VmHWM), reset through /proc/self/clear_refs
    once freed heap memory is returned (malloc_trim); None where neither exists."""

    def __init__(self, device: torch.device):
        self.cuda, self.base = device.type == "cuda", None
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            self.base = sum(torch.cuda.memory_allocated(i) for i in gpus())
            for i in gpus():
                torch.cuda.reset_peak_memory_stats(i)
            return
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")
            self.base = status_bytes("VmRSS")
        except (OSError, StopIteration):
            pass

    def peak(self) -> int | None:
        if self.base is None:
            return None
        if self.cuda:  # summed over GPUs: an upper bound when their peaks fall at different times
            return sum(torch.cuda.max_memory_allocated(i) for i in gpus()) - self.base
        return status_bytes("VmHWM") - self.base


def measure(methods: Methods, method: str, prompts: list[torch.Tensor], args) -> dict:
    """A warm-up run (memory taken during it), then timed runs until --repeats or --max-seconds."""
    device, fn = methods.loaded.device, getattr(methods, method)
    methods.attention(method)
    one_by_one = method in "cd" and len(prompts) > WARM_PROMPTS
    warm = sorted(prompts, key=len, reverse=True)[:WARM_PROMPTS] if one_by_one else prompts
    mem = PeakMemory(device)
    out = {"warmup_s": timed(fn, warm, device), "peak_mem_bytes": mem.peak(), "notes": []}
    times: list[float] = []
    if one_by_one:  # the longest prompts, warm: an upper bound on one pass
        per_prompt = timed(fn, warm, device) / len(warm)
        k = int(args.max_seconds / per_prompt)
        if k < len(prompts):  # one pass would not fit: time a random sample and scale it (unbiased)
            if k < 2 * WARM_PROMPTS:
                return {"skipped": f"one pass predicted {per_prompt * len(prompts):.0f} s > --max-seconds {args.max_seconds:g}"}
            pick = np.random.default_rng(args.seed).choice(len(prompts), k, replace=False)
            t = timed(fn, [prompts[i] for i in sorted(pick)], device) * len(prompts) / k
            out.update(times_s=[t], median_s=t, sampled_prompts=k, loadavg_1min=os.getloadavg()[0])
            out["notes"].append(f"one pass estimated from a random sample of {k} of {len(prompts)} prompts (time x {len(prompts)}/{k})")
            return out
    elif out["warmup_s"] > args.max_seconds:
        times, out["notes"] = [out["warmup_s"]], ["the warm-up took longer than --max-seconds: its time is reported"]
    while len(times) < args.repeats:
        if times and sum(times) + statistics.median(times) > args.max_seconds:
            out["notes"].append(f"{len(times)} of {args.repeats} repeats within --max-seconds")
            break
        times.append(timed(fn, prompts, device))
    # a busy CPU slows torch's threads many-fold: the load average says whether that happened
    out.update(times_s=times, median_s=statistics.median(times), loadavg_1min=os.getloadavg()[0])
    if method == "b":
        out["capture"] = dict(methods.capture_info)  # kernel counts per pass, batching, fallbacks
    return out


def interleaved(methods: Methods, prompts: list[torch.Tensor], args) -> dict:
    """a and b timed in alternation (drift in the device's speed hits both alike); b/a is the
    median of the pairs' ratios, with a 95% percentile-bootstrap interval of that median."""
    device, ta, tb = methods.loaded.device, [], []
    while len(ta) < args.pairs and (not ta or (sum(ta) + sum(tb)) * (1 + 1 / len(ta)) <= args.max_seconds):
        methods.attention("a")
        ta.append(timed(methods.a, prompts, device))
        methods.attention("b")
        tb.append(timed(methods.b, prompts, device))
    r = np.array(tb) / np.array(ta)
    draws = np.median(r[np.random.default_rng(0).integers(0, len(r), (4000, len(r)))], axis=1)
    return {"pairs": len(r), "a_s": ta, "b_s": tb, "b/a": float(np.median(r)),
            "b/a_95": [float(q) for q in np.quantile(draws, [0.025, 0.975])]}


def workloads(loaded, args) -> list[dict]:
    device, limit = loaded.device, loaded.context_length
    top = min(loaded.model.get_input_embeddings().weight.shape[0], 32000)  # ids from 10: past special tokens
    out = []
    for n in [int(x) for x in args.lengths.split(",") if x.strip()]:
        ids = torch.randint(10, top, (n,), generator=torch.Generator().manual_seed(args.seed + n))
        skip = f"{n} tokens exceed the model's {limit}-token context (random twins: --context)" if limit and n > limit else None
        out.append({"workload": f"n={n}", "prompts": [ids.to(device)], "skip": skip})
    if args.corpus_size:
        g = torch.Generator().manual_seed(args.seed)
        lengths = torch.randint(8, 41, (args.corpus_size,), generator=g).tolist()
        out.append({"workload": f"corpus-{args.corpus_size}", "skip": None,
                    "prompts": [torch.randint(10, top, (n,), generator=g).to(device) for n in lengths]})
    for name in filter(None, (s.strip() for s in args.prompts.split(","))):
        texts, label = load_prompts(PROMPT_FILES.get(name, name))
        tokenised = [tokenize(loaded, text, None) for text in texts]  # as analyze: unusable prompts skipped
        prompts = [ids[0] for ids, _, warning in tokenised if not warning]
        out.append({"workload": name, "source": label, "prompts": prompts, "skip": None if prompts else "no usable prompt",
                    "notes": [f"prompt {i + 1}: {w}" for i, (_, _, w) in enumerate(tokenised) if w]})
    for w in out:
        lens = [len(p) for p in w["prompts"]]
        w.update(n_prompts=len(lens), tokens=sum(lens), min_len=min(lens, default=0), max_len=max(lens, default=0))
    return out


def precheck(loaded, w: dict, method: str, last: dict, args) -> str | None:
    """Why a configuration would obviously not fit or would exceed --max-seconds, or None."""
    if w["skip"]:
        return w["skip"]
    n, g = w["max_len"], loaded.adapter.geometry
    if method in "cd":  # every layer's (heads, n, n) attention is kept, plus float32 softmax work
        need = g.n_layers * g.n_heads * n * n * loaded.dtype.itemsize + 3 * g.n_heads * n * n * 4
        if loaded.device.type == "cuda":
            free = torch.cuda.mem_get_info(loaded.device)[0]
        else:
            free = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemAvailable:"))
        if need > 0.8 * free:
            return f"needs ~{need / 2**30:.0f} GiB for attention matrices, {free / 2**30:.0f} GiB free"
    if w["n_prompts"] == 1 and method in last and last[method][0] >= 1024:
        n0, t0 = last[method]  # quadratic from n >= 1024: an upper bound
        if t0 * (n / n0) ** 2 > args.max_seconds:
            return f"predicted {t0 * (n / n0) ** 2:.0f} s (from {t0:.1f} s at n={n0}) > --max-seconds {args.max_seconds:g}"
    return None


def profile(methods: Methods, w: dict, path: str) -> None:
    """One run each of a and b under torch.profiler: where b's time beyond a's goes."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    device = methods.loaded.device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for m in "ab":
            methods.attention(m)
            with profiler(activities=activities) as prof:
                timed(getattr(methods, m), w["prompts"], device)
            table = prof.key_averages()
            # operators called from Python, not from inside other operators: on a GPU, launches
            ops = sum(1 for e in prof.events() if e.name.startswith("aten::")
                      and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))
            f.write(f"===== {w['workload']} {m}: {ops} operator calls from Python\n")
            f.write(f"===== {w['workload']} {m}: by {sort}\n{table.table(sort_by=sort, row_limit=20)}\n")
            f.write(f"===== {w['workload']} {m}: by cpu_time_total\n{table.table(sort_by='cpu_time_total', row_limit=25)}\n")


def environment(loaded, args) -> dict:
    def git(*cmd: str) -> str | None:
        try:
            return subprocess.run(["git", *cmd], cwd=HERE.parent, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    dev, name = loaded.device, platform.processor() or platform.machine()
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
    elif Path("/proc/cpuinfo").exists():
        name = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), name)
    dirty = git("status", "--porcelain", "--", "src")
    return {"sheafscope": sheafscope.__version__, "git_commit": git("rev-parse", "HEAD"),
            "src_uncommitted_changes": None if dirty is None else bool(dirty), "date": time.strftime("%Y-%m-%d %H:%M %Z"),
            "device": str(dev), "device_name": name, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "model": loaded.spec, "dtype": str(loaded.dtype).removeprefix("torch."), "geometry": vars(loaded.adapter.geometry),
            "context_length": loaded.context_length,
            "batch_tokens": args.batch_tokens or BATCH_TOKENS.get(dev.type, BATCH_TOKENS["cpu"])}


def ratios(w: dict) -> dict:
    t = {m: r["median_s"] for m, r in w["results"].items() if "median_s" in r}
    out = {k: (t[x] / t[y] if x in t and y in t else None) for k, (x, y) in {"b/a": "ba", "c/b": "cb", "d/b": "db"}.items()}
    if "interleaved" in w:  # the better b/a where it exists
        out.update({"b/a separate medians": out["b/a"], "b/a": w["interleaved"]["b/a"], "b/a_95": w["interleaved"]["b/a_95"]})
    return out


def table(done: list[dict]) -> str:
    lines, reasons = [f"{'workload':<14}{'prompts':>8}{'tokens':>8}" + "".join(f"{m + ' s':>10}" for m in "abcd")
                      + f"{'b/a':>22}{'c/b':>8}{'d/b':>8}"], []
    for w in done:
        cells = []
        for m in "abcd":
            r = w["results"].get(m)
            if r is not None and "skipped" in r:
                reasons.append(f"[{len(reasons) + 1}] {w['workload']} {m}: {r['skipped']}")
            cells.append("-" if r is None else f"skip[{len(reasons)}]" if "skipped" in r else f"{r['median_s']:.4f}")
        q = w["ratios"]
        f = lambda k: "-" if q[k] is None else f"{q[k]:.2f}"  # noqa: E731
        ba = "-" if q["b/a"] is None else f"{q['b/a']:.3f}" + (" [{:.3f}-{:.3f}]".format(*q["b/a_95"]) if "b/a_95" in q else "")
        lines.append(f"{w['workload']:<14}{w['n_prompts']:>8}{w['tokens']:>8}" + "".join(f"{c:>10}" for c in cells)
                     + f"{ba:>22}{f('c/b'):>8}{f('d/b'):>8}")
    return "\n".join(lines + reasons)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="model spec for sheafscope.load_model")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: float32 CPU, bfloat16 GPU)")
    p.add_argument("--lengths", default=None, help=f"one random prompt per length (default CPU {LENGTHS['cpu']}; GPU {LENGTHS['cuda']})")
    p.add_argument("--corpus-size", type=int, default=None, help="prompts of 8-40 random ids (default CPU 200, GPU 1000; 0: none)")
    p.add_argument("--prompts", default="notebooks,research-v1,mixed", help="prompt sets: built-in names, 'mixed', or files ('': none)")
    p.add_argument("--methods", default="abcd", help="subset of abcd")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (median reported)")
    p.add_argument("--pairs", type=int, default=15, help="interleaved a/b pairs per workload (within --max-seconds)")
    p.add_argument("--max-seconds", type=float, default=300.0, help="time budget per configuration")
    p.add_argument("--context", type=int, default=None, help="max_position_embeddings of a random twin")
    p.add_argument("--device-map", default=None, help="auto, balanced or sequential: one model over every visible GPU")
    p.add_argument("--batch-tokens", type=int, default=None, help="token budget per batch for a and b (default: BATCH_TOKENS)")
    p.add_argument("--exact-keys", type=int, default=None,
                   help="the fast path's EXACT_KEYS on this device (0: every call takes the lse route)")
    p.add_argument("--hold-bytes", type=int, default=None,
                   help="the fast path's HOLD_BYTES on this device (0: every layer settles as it runs)")
    p.add_argument("--together", type=int, choices=(0, 1), default=None,
                   help="the fast path's TOGETHER on this device (1: held layers settled together, flagged rows in padded products)")
    p.add_argument("--profile", default=None,
                   help="text file: one profiled run of a and of b per workload, torch.profiler tables by self device and CPU time")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON file, rewritten after every workload")
    args = p.parse_args()

    loaded = sheafscope.load_model(args.model, device=args.device, dtype=args.dtype, device_map=args.device_map,
                                   config_overrides={"max_position_embeddings": args.context} if args.context else None)
    dev = loaded.device.type
    # The capture's tuning tables are public constants; setting them measures what each buys.
    for limit, value in ((fast.EXACT_KEYS, args.exact_keys), (fast.HOLD_BYTES, args.hold_bytes),
                         (fast.TOGETHER, None if args.together is None else bool(args.together))):
        if value is not None:
            limit[dev] = value
    args.lengths = LENGTHS.get(dev, LENGTHS["cpu"]) if args.lengths is None else args.lengths
    args.corpus_size = CORPUS.get(dev, CORPUS["cpu"]) if args.corpus_size is None else args.corpus_size
    methods, env = Methods(loaded, args.batch_tokens), environment(loaded, args)
    print(f"{env['model']} {env['dtype']} on {env['device_name']}, torch {env['torch']}, transformers {env['transformers']}, "
          f"commit {(env['git_commit'] or '?')[:10]}", flush=True)
    methods.attention("a")
    methods.a([torch.arange(10, 14, device=loaded.device)])  # page the weights in before anything is timed
    done, last = [], {}
    for w in workloads(loaded, args):
        w["results"] = {}
        for m in args.methods:
            reason = precheck(loaded, w, m, last, args)
            try:
                r = {"skipped": reason} if reason else measure(methods, m, w["prompts"], args)
            except (torch.OutOfMemoryError, SheafscopeError, RuntimeError) as e:
                r = {"skipped": f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"}
                gc.collect()
                if dev == "cuda":
                    torch.cuda.empty_cache()
            w["results"][m] = r
            if "median_s" in r and w["n_prompts"] == 1:
                last[m] = (w["max_len"], r["median_s"])
            mem = r.get("peak_mem_bytes")
            print(f"  {w['workload']:<14} {m} {METHODS[m]:<21} " + (r["skipped"] if "skipped" in r else f"{r['median_s']:.4f} s"
                  + ("" if mem is None else f", peak +{mem / 2**20:.0f} MiB")), flush=True)
        if all("median_s" in w["results"].get(m, {}) for m in "ab"):
            try:
                w["interleaved"] = interleaved(methods, w["prompts"], args)
            except torch.OutOfMemoryError:
                w.setdefault("notes", []).append("interleaved a/b timing: out of memory")
        if args.profile and all("median_s" in w["results"].get(m, {}) for m in "ab"):
            profile(methods, w, args.profile)
        w["ratios"] = ratios(w)
        done.append({k: v for k, v in w.items() if k != "prompts"})
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"environment": env, "args": vars(args), "methods": METHODS,
                                                  "workloads": done, "table": table(done)}, indent=1, default=str))
    print("\n" + table(done) + (f"\n\nwrote {args.out}" if args.out else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
