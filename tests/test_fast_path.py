"""The fast path (capture_fast.py) against the eager reference (capture_eager.py).

Every per-head off-diagonal mass, first-token mass and residual maximum of the fast path must
equal the eager path's to 1e-5 relative (float32), on every supported family (prompts longer
than the sliding windows, so windows and soft-capping matter), along every route (dense exact
statistics, the kernels' lse, the chunked torch fallback); padded batches must equal prompts
run alone; the model's own outputs must not change; chunked memory must stay O(chunk x n).
Offline pretrained models: the same, except Qwen2.5, whose float32 attention is too
ill-conditioned for any two float32 computations to agree to 1e-5 (see its test). The CUDA
tests run only where a GPU is.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
import transformers
from torch.profiler import ProfilerActivity, profile
from transformers.masking_utils import AttentionMaskInterface

from sheafscope import analyze, fused_rows, load_model
from sheafscope import capture_fast as cf
from sheafscope.models.adapters import adapter_class, adapter_for
from sheafscope.capture.eager import capture_eager
from sheafscope.capture_fast import FAST_ATTENTION, BatchStats, DiagonalCapture, capture_batch
from sheafscope.errors import NonFiniteError
from sheafscope.models.loading import attention_implementation
from tiny_models import TINY_CONFIGS, build_tiny

RTOL = 1e-5
FIELDS = ("offdiag_mass", "first_token_mass", "max_abs_hidden")


def _family_supported(name: str) -> bool:
    cls_name, kwargs = TINY_CONFIGS[name]
    return adapter_class(getattr(transformers, cls_name)(**kwargs).model_type).fast_path_supported


FAMILIES = [n for n in sorted(TINY_CONFIGS) if _family_supported(n)]
UNSUPPORTED = [n for n in sorted(TINY_CONFIGS) if not _family_supported(n)]


def rel_err(x: np.ndarray, ref: np.ndarray) -> float:
    x, ref = np.asarray(x, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return float(np.max(np.abs(x - ref) / np.maximum(np.abs(ref), 1e-30)))


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def _pair(name: str):
    return build_tiny(name), build_tiny(name, attn_implementation=FAST_ATTENTION)


def test_fast_is_registered_with_transformers():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    assert attention_implementation("fast") == FAST_ATTENTION
    assert attention_implementation("eager") == "eager"
    assert FAST_ATTENTION in AttentionInterface._global_mapping
    assert FAST_ATTENTION in AttentionMaskInterface._global_mapping
    assert UNSUPPORTED == ["bloom"] and len(FAMILIES) == len(TINY_CONFIGS) - 1


# How the statistics are computed: short prompts get exact float64 statistics from one dense
# product ("dense"); longer ones the kernel's lse with exact recomputation of the rows where
# A_ii > 1/2 ("lse": forced here with exact_below=0); "chunked" is the torch fallback.
# By default the statistics of all layers are computed together at the end of the forward
# pass; "lse-per-layer" computes each layer's on its own (hold_bytes=0) and "lse-deferred"
# also does each layer's exact recomputation only after the next layer ran, as on a GPU.
# fused_rows=False: on a GPU, half-precision calls would otherwise take the fused route.
ROUTES = {"dense": dict(kernel="auto", fused_rows=False), "lse": dict(kernel="auto", exact_below=0, fused_rows=False),
          "lse-per-layer": dict(kernel="auto", exact_below=0, hold_bytes=0, fused_rows=False),
          "lse-deferred": dict(kernel="auto", exact_below=0, hold_bytes=0, defer=True, fused_rows=False),
          "lse-slots": dict(kernel="auto", exact_below=0, refine_slots=2, fused_rows=False),
          "chunked": dict(kernel="chunked", exact_below=0),
          "fused": dict(kernel="auto", fused_rows=True)}


@pytest.mark.parametrize("route", sorted(ROUTES))
@pytest.mark.parametrize("name", FAMILIES)
def test_tiny_fast_equals_eager(name, route):
    """Per-head masses and residual maxima, prompts of 12 and 19 tokens (sliding windows are 4).
    chunk_rows=5 splits every sequence into several row blocks with their own key ranges."""
    from sheafscope.capture_fast import BatchStats

    eager, fast = _pair(name)
    layers = adapter_for(eager).geometry.n_layers
    blocks = adapter_for(fast).blocks
    for n, seed in ((12, 1), (19, 2)):
        ids = _ids(n, seed)
        ref = capture_eager(eager, ids, layers)
        stats = BatchStats()
        (cap,) = capture_batch(fast, blocks, [ids], stats, chunk_rows=5, **ROUTES[route])
        assert cap.n_tokens == n
        for f in FIELDS:
            assert getattr(cap, f).shape == getattr(ref, f).shape
            assert rel_err(getattr(cap, f), getattr(ref, f)) <= RTOL, (f, n)
        if route == "fused" and fused_rows.runs_on(torch.device("cpu")):
            # every layer took the kernel, except soft-capped ones (it does not soft-cap)
            assert stats.kernels.get("fused-rows", 0) == (0 if name == "gemma2" else layers), dict(stats.kernels)


def test_fused_rows_failure_falls_back_to_dense(monkeypatch):
    """A fused-rows kernel that fails (a GPU or Triton install it does not compile for): the
    layers it held get dense statistics, still equal to eager; the reason is reported; later
    forward passes no longer try the kernel."""
    from sheafscope import fused_rows as fr
    from sheafscope.capture_fast import BatchStats

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this GPU")

    monkeypatch.setattr(fr, "disabled", None)
    monkeypatch.setattr(fr, "has_triton", lambda: True)
    monkeypatch.setattr(fr, "runs_on", lambda device: fr.disabled is None)
    monkeypatch.setattr(fr, "_kernel", broken)
    eager, fast = _pair("llama")
    layers = adapter_for(eager).geometry.n_layers
    for seed in (1, 2):  # the second forward pass finds the kernel off
        ids = _ids(15, seed)
        stats = BatchStats()
        (cap,) = capture_batch(fast, adapter_for(fast).blocks, [ids], stats, fused_rows=True)
        assert any("no kernel for this GPU" in f for f in stats.fallbacks) == (seed == 1), stats.fallbacks
        assert stats.kernels.get("fused-rows", 0) == (layers if seed == 1 else 0)
        ref = capture_eager(eager, ids, layers)
        for f in FIELDS:
            assert rel_err(getattr(cap, f), getattr(ref, f)) <= RTOL, f


@pytest.mark.parametrize("route", ["dense", "lse", "lse-slots", "fused"])
@pytest.mark.parametrize("name", ["llama", "mistral", "gemma2", "gemma3", "bert"])
def test_positions_equal_eager_attention(name, route):
    """Per position (keep_positions=True, a padded batch): 1 - A_ii and A_i0 of every layer,
    head and valid row equal the diagonal and first column of eager's attention matrices."""
    eager, fast = _pair(name)
    lengths = [19, 11]
    prompts = [_ids(n, 40 + n) for n in lengths]
    ids = torch.nn.utils.rnn.pad_sequence([p[0] for p in prompts], batch_first=True)
    valid = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
    with torch.no_grad():
        with DiagonalCapture(fast, valid=valid, chunk_rows=5, **ROUTES[route]) as cap:
            fast.base_model(input_ids=ids, attention_mask=valid.long(), use_cache=False)
        refs = [eager.base_model(input_ids=p, output_attentions=True, use_cache=False).attentions for p in prompts]
    for j, n in enumerate(lengths):
        for layer, att in enumerate(refs[j]):
            a = att[0].double()  # (heads, n, n)
            want_off = 1 - a.diagonal(dim1=-2, dim2=-1)
            assert rel_err(cap.off[layer][j, :, :n].numpy(), want_off.numpy()) <= RTOL, (j, layer)
            assert rel_err(cap.sink[layer][j, :, :n].numpy(), a[..., 0].numpy()) <= RTOL, (j, layer)


def test_slot_refinement_in_layer_chunks(monkeypatch):
    """Every row flagged (REFINE_BELOW > 1) and a budget that fits one layer's float64 keys
    and scores: the fixed-shape recomputation runs one layer at a time, takes the first
    `refine_slots` rows of every head, leaves the rest to the planned route, and the
    numbers are the eager reference's."""
    import sheafscope.diag_stats as ds
    from sheafscope.capture_fast import BatchStats

    eager, fast = _pair("mistral")
    cfg = fast.config
    layers, heads, kv_heads = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads
    d = cfg.hidden_size // heads
    lengths, slots = [19, 13], 3
    prompts = [_ids(n, 60 + n) for n in lengths]
    b, n = len(prompts), max(lengths)
    per_layer = b * (kv_heads * n * d + heads * slots * n)  # float64 elements, see _refine_slots
    monkeypatch.setattr(ds, "REFINE_BELOW", 1.01)
    monkeypatch.setattr(ds, "CPU_BLOCK_ELEMENTS", 4 * per_layer + 4)

    chunks, slot_rows = [], cf.slot_rows
    monkeypatch.setattr(cf, "slot_rows", lambda q, *a: chunks.append(q.shape[0]) or slot_rows(q, *a))
    stats = BatchStats()
    got = capture_batch(fast, adapter_for(fast).blocks, prompts, stats, exact_below=0, refine_slots=slots)
    assert chunks == [b] * layers  # one layer (b batch elements) per chunk
    assert stats.refined_rows == heads * layers * sum(m - 1 for m in lengths)
    for p, cap in zip(prompts, got):
        ref = capture_eager(eager, p, layers)
        for f in FIELDS:
            assert rel_err(getattr(cap, f), getattr(ref, f)) <= RTOL, f


@pytest.mark.parametrize("name", FAMILIES)
def test_tiny_model_outputs_unchanged(name):
    """Logits and every hidden state: with no capture active (the sdpa delegate), and inside
    a capture along every route."""
    eager, fast = _pair(name)
    ids = _ids(19, 3)
    kw = dict(input_ids=ids, output_hidden_states=True, use_cache=False)
    with torch.no_grad():
        ref = eager(**kw)
        runs = {"no capture": fast(**kw)}
        for route, options in ROUTES.items():
            with DiagonalCapture(fast, chunk_rows=5, **options):
                runs[route] = fast(**kw)
    final = "logits" if "logits" in ref else "last_hidden_state"
    for label, out in runs.items():
        pairs = [(out[final], ref[final])] + list(zip(out.hidden_states, ref.hidden_states))
        assert len(out.hidden_states) == len(ref.hidden_states)
        for got, want in pairs:
            assert (got - want).abs().max() <= RTOL * want.abs().max(), label


# transformers' sdpa function refuses gemma2's logit soft-capping: no sdpa twin to compare with
SDPA_FAMILIES = [n for n in FAMILIES if n != "gemma2"]


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("name", SDPA_FAMILIES)
def test_planned_calls_equal_sdpa_bit_for_bit(name, padded):
    """Inside a capture, the layers a plan serves call sdpa's kernel themselves where
    transformers' sdpa function would only add checks (capture_fast._direct_gqa; the others go
    through that function): every hidden state equals the sdpa model's bit for bit, causal,
    grouped, windowed and padded alike."""
    sdpa, fast = build_tiny(name, attn_implementation="sdpa"), build_tiny(name, attn_implementation=FAST_ATTENTION)
    ids = torch.cat([_ids(19, 3), _ids(19, 4)]) if padded else _ids(19, 3)
    mask = None
    if padded:
        mask = torch.ones_like(ids)
        mask[1, 12:] = 0
    kw = dict(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    with torch.no_grad():
        want = sdpa(**kw)
        with DiagonalCapture(fast, fused_rows=False):
            got = fast(**kw)
    assert len(got.hidden_states) == len(want.hidden_states)
    for layer, (g, w) in enumerate(zip(got.hidden_states, want.hidden_states)):
        assert torch.equal(g, w), f"{name}: stream {layer}"


@pytest.mark.parametrize("route", sorted(ROUTES))
@pytest.mark.parametrize("name", FAMILIES)
def test_padded_batch_equals_prompts_alone(name, route):
    """Right-padded batch of 3..20 tokens: each prompt's n, masses and maxima as if run alone."""
    _, fast = _pair(name)
    blocks = adapter_for(fast).blocks
    lengths = [3, 20, 7, 12, 5, 17]
    prompts = [_ids(n, 10 + i) for i, n in enumerate(lengths)]
    batch = capture_batch(fast, blocks, prompts, chunk_rows=6, **ROUTES[route])
    for p, got in zip(prompts, batch):
        (alone,) = capture_batch(fast, blocks, [p], **ROUTES[route])
        assert got.n_tokens == alone.n_tokens == p.shape[1]
        for f in FIELDS:
            assert rel_err(getattr(got, f), getattr(alone, f)) <= RTOL, (f, p.shape[1])


@pytest.mark.parametrize("name", FAMILIES)
def test_padding_as_causal_only_where_valid_rows_see_causal_keys(monkeypatch, name):
    """A right-padded batch's statistics drop the mask (prefix_rows) exactly where every valid
    row of the mask transformers built sees the causal keys, checked on the materialised mask
    itself: the families without a window (or a window >= n) do, sliding windows of 4 < n and
    bidirectional attention do not. The numbers of such batches are test_padded_batch_*'s."""
    _, fast = _pair(name)
    masks = []

    def recording(*args, **kwargs):
        mask = cf.lazy_sdpa_mask(*args, **kwargs)
        masks.append(mask)
        return mask

    monkeypatch.setitem(AttentionMaskInterface._global_mapping, FAST_ATTENTION, recording)
    lengths = [3, 20, 7]
    stats = BatchStats()
    capture_batch(fast, adapter_for(fast).blocks, [_ids(n, 30 + i) for i, n in enumerate(lengths)], stats,
                  fused_rows=False)
    lazy = [m for m in masks if isinstance(m, cf.LazyMask)]
    assert lazy, "a padded batch builds masks"
    valid = torch.arange(20)[None, :] < torch.tensor(lengths)[:, None]
    causal = torch.ones(20, 20, dtype=torch.bool).tril()
    verdicts = []
    for m in lazy:
        rows = m.materialize()[:, 0]  # (b, n, kv)
        truth = bool((rows == causal)[valid].all())
        assert m.causal_but_padding == truth
        verdicts.append(truth)
    # Layers whose mask is causal but for padding: all but those with a window of 4 (< 20 tokens)
    # and bidirectional BERT's.
    types = getattr(fast.config, "layer_types", None) or ["full_attention"] * fast.config.num_hidden_layers
    if name == "mistral" or name == "bert":
        types = ["other"] * len(types)
    expected = sum(t == "full_attention" for t in types)
    assert stats.kernels["padding-as-causal"] == expected
    assert any(verdicts) or expected == 0  # (Gemma3 also builds a full mask its sliding layers never use)


def test_prefix_rows_refuses_to_keep_positions():
    _, fast = _pair("llama")
    with pytest.raises(ValueError, match="keep_positions=False"):
        DiagonalCapture(fast, valid=torch.ones(1, 4, dtype=torch.bool), prefix_rows=True)


# -- offline pretrained models --------------------------------------------------------------------
PROMPTS = [
    "The capital of France is Paris, which is known for the Eiffel Tower.",
    "Hi there",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "Once upon a time, in a land far away, there lived a king who had three daughters and a very old dog.",
    "One two three four five.",
]
_FAST: dict[str, object] = {}


def _fast(alias: str):
    if alias not in _FAST:
        _FAST[alias] = load_model(alias, device="cpu", dtype="float32", attention="fast")
    return _FAST[alias]


def _lse_route(loaded, prompts):
    """analyze's numbers for `prompts`, one padded batch, statistics by the lse route."""
    from types import SimpleNamespace

    ids = [loaded.tokenizer(p, return_tensors="pt")["input_ids"] for p in prompts]
    caps = capture_batch(loaded.model, loaded.adapter.blocks, ids, exact_below=0)
    return SimpleNamespace(prompts=[SimpleNamespace(text=t, **c.__dict__) for t, c in zip(prompts, caps)])


def _assert_results_equal(got, want, rtol):
    assert [p.n_tokens for p in got.prompts] == [p.n_tokens for p in want.prompts]
    assert [p.text for p in got.prompts] == [p.text for p in want.prompts]
    for g, w in zip(got.prompts, want.prompts):
        for f in FIELDS:
            assert rel_err(getattr(g, f), getattr(w, f)) <= rtol, (f, g.n_tokens)


@pytest.mark.parametrize("alias", ["smollm2-135m", "gemma3-270m", "minilm-l6"])
def test_offline_fast_equals_eager(offline_model, alias):
    """analyze() end to end (automatic batches of prompts of different lengths) and logits."""
    eager, fast = offline_model(alias), _fast(alias)
    assert fast.attention_path == "fast" and eager.attention_path == "eager"
    want = analyze(eager, PROMPTS)
    got = analyze(fast, PROMPTS)
    assert got.info["attention_path"] == "fast" and want.info["attention_path"] == "eager"
    assert got.info["batch_size"] == len(PROMPTS)  # automatic: one CPU batch of 8 at most
    _assert_results_equal(got, want, RTOL)
    # Short prompts take the dense exact route; force the lse route (with its exact
    # recomputation of self-attending rows) on the same batch.
    _assert_results_equal(_lse_route(fast, PROMPTS), want, RTOL)
    ids = eager.tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a = eager.model(input_ids=ids, use_cache=False)
        b = fast.model(input_ids=ids, use_cache=False)
    key = "logits" if "logits" in a else "last_hidden_state"
    assert (a[key] - b[key]).abs().max() <= RTOL * a[key].abs().max()


def test_offline_qwen_fast_equals_exact_reference(offline_model, monkeypatch):
    """Qwen2.5 has attention logits near 1500 (its large q/k biases): one float32 rounding of a
    logit (eps32 * 1500 ~ 2e-4) moves A by ~1e-4 relative, so no two float32 computations
    (eager included, which downcasts its softmax to float32 even in a float64 model) agree to
    1e-5 on every head. Checked instead: in float64 against eager with an exact float64 softmax,
    to 1e-6 (not 1e-12: even float64 rounding differences grow ~10x per layer after layer 13,
    to ~1e-8 in the last layers); and in float32, the fast path is no further from that exact
    reference than eager float32 is (plus 1e-5)."""
    alias = "qwen2.5-coder-0.5b"
    fast = load_model(alias, device="cpu", dtype="float32", attention="fast")
    eager32 = analyze(offline_model(alias), PROMPTS)
    fast32 = analyze(fast, PROMPTS)
    fast32_lse = _lse_route(fast, PROMPTS)
    fast.model.double()
    fast64 = analyze(fast, PROMPTS)
    assert fast64.info["attention_path"] == "fast"

    softmax = torch.nn.functional.softmax

    def exact_softmax(x, dim=None, _stacklevel=3, dtype=None):
        return softmax(x, dim=dim, dtype=None if x.dtype == torch.float64 else dtype)

    monkeypatch.setattr(torch.nn.functional, "softmax", exact_softmax)
    fast.model.set_attn_implementation("eager")
    exact = analyze(fast, PROMPTS)
    assert exact.info["attention_path"] == "eager"
    _assert_results_equal(fast64, exact, 1e-6)
    for f in FIELDS:
        err_eager = max(rel_err(getattr(g, f), getattr(w, f)) for g, w in zip(eager32.prompts, exact.prompts))
        for run in (fast32, fast32_lse):
            err_fast = max(rel_err(getattr(g, f), getattr(w, f)) for g, w in zip(run.prompts, exact.prompts))
            assert err_fast <= RTOL + 2 * err_eager, (f, err_fast, err_eager)
    del fast


# -- memory, fallbacks, batching, errors -----------------------------------------------------------
@pytest.mark.parametrize("name,kernel", [("llama", "chunked"), ("mistral", "auto"), ("mistral", "chunked")])
def test_chunked_memory_is_linear_in_n(name, kernel):
    """n = 4096 in blocks of 128 query rows: no tensor anywhere near n x n is allocated (the
    profiler's largest single CPU allocation) and the implementation's own bookkeeping says
    no block had more than 128 rows. One n x n float32 matrix would be 64 MiB, eager's
    per-layer attention 8 x 64 MiB. The mistral runs build the sliding-window mask in
    blocks too, with key ranges a few columns wider than the window."""
    n, rows = 4096, 128
    _, fast = _pair(name)
    heads = fast.config.num_attention_heads
    ids = _ids(n, 4)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with torch.no_grad(), DiagonalCapture(fast, kernel=kernel, chunk_rows=rows) as cap:
            fast.base_model(input_ids=ids, use_cache=False)
    largest = max(e.cpu_memory_usage for e in prof.events())
    assert cap.max_block[0] <= rows and cap.max_block[1] <= n
    assert largest <= heads * rows * n * 4 < n * n * 4, largest
    if name == "mistral":
        assert cap.max_block[1] <= rows + fast.config.sliding_window
    assert len(cap.off) == 2 and cap.off[0].shape == (1, heads, n)
    assert all(torch.isfinite(t).all() for t in cap.off + cap.sink)


def test_long_sequence_fused_equals_chunked():
    """At n = 1024 the fused kernel (one call, causal) and the chunked torch path agree."""
    _, fast = _pair("llama")
    blocks = adapter_for(fast).blocks
    ids = _ids(1024, 5)
    (a,) = capture_batch(fast, blocks, [ids])
    (b,) = capture_batch(fast, blocks, [ids], kernel="chunked", chunk_rows=100)
    for f in FIELDS:
        assert rel_err(a.__dict__[f], b.__dict__[f]) <= RTOL


@pytest.mark.parametrize("options", [{}, {"hold_bytes": 0}, {"hold_bytes": 0, "defer": True}],
                         ids=["layers-together", "per-layer", "per-layer-deferred"])
@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_tiny_budgets_split_the_work_not_the_numbers(monkeypatch, name, options):
    """A 4096-element budget splits every step (row blocks of 8, refinement pieces of a few
    rows of one group), and REFINE_BELOW > 1 sends every row through the exact recomputation
    (every valid row of every head and layer but row 0, which sees only itself): the numbers
    stay those of the lse route with ordinary budgets, whether the layers' statistics are
    computed together (layers stacked along the batch) or one layer at a time."""
    import sheafscope.diag_stats as ds
    from sheafscope.capture_fast import BatchStats

    _, fast = _pair(name)
    blocks = adapter_for(fast).blocks
    ids = [_ids(512, 8), _ids(300, 9)]
    ref = capture_batch(fast, blocks, ids, exact_below=0)
    monkeypatch.setattr(ds, "CPU_BLOCK_ELEMENTS", 1 << 12)
    monkeypatch.setattr(ds, "REFINE_BELOW", 1.01)
    stats = BatchStats()
    got = capture_batch(fast, blocks, ids, stats, exact_below=0, **options)
    heads, layers = fast.config.num_attention_heads, fast.config.num_hidden_layers
    assert stats.refined_rows == heads * layers * (511 + 299)
    for a, b in zip(got, ref):
        for f in FIELDS:
            assert rel_err(getattr(a, f), getattr(b, f)) <= RTOL, f


@pytest.mark.parametrize("name", UNSUPPORTED)
def test_unsupported_family_loads_eager_and_says_why(tmp_path, offline_model, name):
    tok = offline_model("smollm2-135m").tokenizer
    cls_name, kwargs = TINY_CONFIGS[name]
    config = getattr(transformers, cls_name)(**{**kwargs, "vocab_size": len(tok)})
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), device="cpu", dtype="float32", attention="fast")
    assert loaded.model.config._attn_implementation == "eager"
    assert loaded.attention_path == f"eager (fallback: {loaded.adapter.fast_path_note})"
    assert "ALiBi" in loaded.attention_path
    res = analyze(loaded, PROMPTS[:2])
    assert res.info["attention_path"] == loaded.attention_path
    # A load path that cannot look at the family first (a GGUF file) gets the fast
    # implementation, and is switched afterwards, although the model refuses the switch.
    from sheafscope.models.loading import LoadedModel, _settle_attention

    late = LoadedModel(build_tiny(name, attn_implementation=FAST_ATTENTION), tok, "late", "late", "gguf-file")
    _settle_attention(late, "fast")
    assert late.model.config._attn_implementation == "eager" and late.attention_path == loaded.attention_path


def test_analyze_batches_keep_order_and_back_off_on_oom(monkeypatch, offline_model):
    """Batches of 4, then an out-of-memory error for any batch of more than one prompt: the
    batch is halved (4, 2, 1) and retried; results keep the prompts' order; progress counts
    every prompt (skipped ones too)."""

    fast = _fast("smollm2-135m")
    real = cf.launch_batch

    def flaky(model, blocks, prompts, *a, **k):
        if len(prompts) > 1:
            raise torch.OutOfMemoryError("simulated")
        return real(model, blocks, prompts, *a, **k)

    monkeypatch.setattr(cf, "launch_batch", flaky)
    done = []
    prompts = [*PROMPTS, "x"]  # "x" is one token: skipped with a warning
    got = analyze(fast, prompts, batch_size=4, progress=done.append)
    assert sum(done) == len(prompts)
    assert got.info["batch_size"] == 1 and got.info["oom_backoffs"] == 2
    assert got.info["batch_size_requested"] == 4
    assert len(got.warnings) >= 1 and "prompt 6" in got.warnings[0]
    monkeypatch.setattr(cf, "launch_batch", real)
    want = analyze(offline_model("smollm2-135m"), PROMPTS)
    _assert_results_equal(got, want, RTOL)


def test_nan_in_the_forward_pass_raises():
    _, fast = _pair("llama")
    with torch.no_grad():
        fast.model.layers[1].self_attn.q_proj.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="layer 1"):
        capture_batch(fast, adapter_for(fast).blocks, [_ids(9, 6)])


# -- CUDA (skipped without a GPU) ------------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _cuda_captures(name, dtype, prompts, **options):
    from sheafscope.capture_fast import BatchStats

    fast = build_tiny(name, attn_implementation=FAST_ATTENTION).to("cuda", dtype)
    stats = BatchStats()
    caps = capture_batch(fast, adapter_for(fast).blocks, [p.cuda() for p in prompts], stats, **options)
    return caps, stats


def _fused_cuda_ran(name, stats) -> None:
    """A fused CUDA kernel ran, and the only fallback is soft-capping's (gemma2: by design,
    no fused kernel soft-caps logits, so every gemma2 layer runs the chunked path)."""
    assert set(stats.fallbacks) <= {"logit soft-capping"}, stats.fallbacks
    if not stats.fallbacks:
        assert stats.kernels.get("fused-cuda", 0) > 0, dict(stats.kernels)


@cuda
@pytest.mark.parametrize("route", ["dense", "lse", "lse-per-layer", "fused"])
@pytest.mark.parametrize("name", FAMILIES)
def test_cuda_float32_fast_equals_eager(name, route):
    """Fused CUDA kernels (flash is half-precision only: memory-efficient attention with
    log-sum-exp, causal flag or mask bias) against the CPU eager reference; a padded batch.
    "lse-per-layer" processes each layer mid-forward: its flags reach the host asynchronously."""
    torch.backends.cuda.matmul.allow_tf32 = False
    eager = build_tiny(name)
    layers = adapter_for(eager).geometry.n_layers
    prompts = [_ids(n, 20 + n) for n in (19, 12, 3, 7)]
    caps, stats = _cuda_captures(name, torch.float32, prompts, **ROUTES[route])
    if route in ("lse", "lse-per-layer"):
        _fused_cuda_ran(name, stats)
    if route == "fused":
        assert stats.kernels.get("fused-rows", 0) == (0 if name == "gemma2" else layers), dict(stats.kernels)
    for p, cap in zip(prompts, caps):
        ref = capture_eager(eager, p, layers)
        for f in FIELDS:
            assert rel_err(getattr(cap, f), getattr(ref, f)) <= RTOL, (f, p.shape[1])


@cuda
@pytest.mark.parametrize("name", FAMILIES)
def test_cuda_bfloat16_fused_agrees_with_chunked(name):
    """bfloat16: flash (no mask) and memory-efficient attention (mask) against the chunked torch
    path on the same GPU. The two forward passes round differently in bfloat16, so later layers
    differ by bfloat16 noise: agreement to 3e-2, and exactly the kernels expected."""
    prompts = [_ids(n, 30 + n) for n in (19, 12, 5)]
    fused, stats = _cuda_captures(name, torch.bfloat16, prompts, kernel="auto", exact_below=0, fused_rows=False)
    _fused_cuda_ran(name, stats)
    chunked, _ = _cuda_captures(name, torch.bfloat16, prompts, kernel="chunked", exact_below=0)
    for a, b in zip(fused, chunked):
        for f in ("offdiag_mass", "first_token_mass"):
            assert rel_err(getattr(a, f), getattr(b, f)) <= 3e-2, f


@cuda
@pytest.mark.parametrize("name", FAMILIES)
def test_cuda_bfloat16_default_route_is_fused_rows(name):
    """bfloat16 on a GPU, default options: every layer of a padded batch and of a long prompt
    (300 tokens, several tiles of the kernel; 64 for families with learned positions, their
    tiny twins' limit) takes the fused-rows kernel (soft-capped gemma2 excepted), and its
    numbers equal those of the other routes (dense; at 300 tokens the lse route with its
    refinement) on the same forward pass's queries and keys, to float32 score rounding."""
    layers = adapter_for(build_tiny(name)).geometry.n_layers
    long = 64 if name in ("bert", "gpt2", "opt", "opt_postnorm") else 300
    for prompts in ([_ids(n, 70 + n) for n in (19, 12, 5)], [_ids(long, 9)]):
        fused, stats = _cuda_captures(name, torch.bfloat16, prompts)
        assert stats.kernels.get("fused-rows", 0) == (0 if name == "gemma2" else layers), dict(stats.kernels)
        other, _ = _cuda_captures(name, torch.bfloat16, prompts, fused_rows=False)
        for a, b in zip(fused, other):
            for f in FIELDS:
                assert rel_err(getattr(a, f), getattr(b, f)) <= 1e-4, (f, a.n_tokens)


@cuda
def test_cuda_batches_in_flight_equal_eager():
    """Two batches launched before either is collected (as analyze pipelines them): each
    prompt's numbers still equal the eager reference's, whatever is queued behind them."""
    from sheafscope.capture_fast import BatchStats, launch_batch

    torch.backends.cuda.matmul.allow_tf32 = False
    eager = build_tiny("llama")
    layers = adapter_for(eager).geometry.n_layers
    fast = build_tiny("llama", attn_implementation=FAST_ATTENTION).to("cuda")
    blocks = adapter_for(fast).blocks
    first, second = [_ids(n, 40 + n) for n in (17, 9, 4)], [_ids(n, 50 + n) for n in (600, 33)]
    stats = BatchStats()
    launched = [launch_batch(fast, blocks, [p.cuda() for p in batch]) for batch in (first, second)]
    for batch, pending in zip((first, second), launched):
        for p, cap in zip(batch, pending.result(stats)):
            ref = capture_eager(eager, p, layers)
            for f in FIELDS:
                assert rel_err(getattr(cap, f), getattr(ref, f)) <= RTOL, (f, p.shape[1])
    assert stats.kernels.get("fused-cuda", 0) > 0  # the 600-token batch took the lse route


@cuda
@pytest.mark.parametrize("name", FAMILIES)
def test_cuda_padding_as_causal_equals_reading_the_mask(name):
    """bfloat16, default route (the fused kernel): a right-padded batch's statistics computed
    as causal attention (prefix_rows, the default) equal those computed with its padding mask
    read, on the same forward pass; the families without a window shorter than the prompts
    take it in every layer."""
    layers = adapter_for(build_tiny(name)).geometry.n_layers
    prompts = [_ids(n, 80 + n) for n in (19, 12, 5)]
    causal, stats = _cuda_captures(name, torch.bfloat16, prompts)
    masked, masked_stats = _cuda_captures(name, torch.bfloat16, prompts, prefix_rows=False)
    assert masked_stats.kernels["padding-as-causal"] == 0
    if name in ("gpt2", "gpt_neox", "llama", "opt", "opt_postnorm", "qwen2", "gemma"):
        assert stats.kernels["padding-as-causal"] == layers, dict(stats.kernels)
    for a, b in zip(causal, masked):
        for f in FIELDS:
            assert rel_err(getattr(a, f), getattr(b, f)) <= 1e-6, (f, a.n_tokens)


@cuda
@pytest.mark.parametrize("n", [300, 1024])
def test_cuda_bfloat16_kernel_choice_by_length(n):
    """Unmasked bfloat16 calls of up to FLASH_MAX_ROWS rows take their lse from flash; longer
    ones from the kernel sdpa picks for a plain forward where that is cuDNN. Either way the
    statistics agree with the chunked torch path to bfloat16 noise."""
    from sheafscope.capture_fast import FLASH_MAX_ROWS

    ids = [_ids(n, 11)]
    fused, stats = _cuda_captures("llama", torch.bfloat16, ids, kernel="auto", exact_below=0, fused_rows=False)
    chunked, _ = _cuda_captures("llama", torch.bfloat16, ids, kernel="chunked", exact_below=0)
    model = build_tiny("llama")
    cfg = model.config
    d = cfg.hidden_size // cfg.num_attention_heads
    q = torch.zeros(1, n, cfg.num_attention_heads, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    kv = torch.zeros(1, n, cfg.num_key_value_heads, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    sdpa_pick = torch.nn.attention.SDPBackend(int(torch._fused_sdp_choice(q, kv, kv, None, 0.0, True, scale=d**-0.5,
                                                                          enable_gqa=True)))
    layers = cfg.num_hidden_layers
    if n <= FLASH_MAX_ROWS:
        assert stats.kernels.get("kernel:flash") == layers, dict(stats.kernels)
    elif sdpa_pick == torch.nn.attention.SDPBackend.CUDNN_ATTENTION:
        assert stats.kernels.get("kernel:cudnn") == layers, dict(stats.kernels)
    for f in ("offdiag_mass", "first_token_mass"):
        assert rel_err(getattr(fused[0], f), getattr(chunked[0], f)) <= 3e-2, f


@cuda
@pytest.mark.parametrize("name", ["llama", "mistral", "gemma3"])
def test_cuda_long_sequence_fused_equals_chunked(name):
    """n = 2048 (sliding windows: mask blocks with key ranges) in float32: fused == chunked."""
    torch.backends.cuda.matmul.allow_tf32 = False
    ids = [_ids(2048, 7)]
    a, stats = _cuda_captures(name, torch.float32, ids, kernel="auto")
    _fused_cuda_ran(name, stats)
    b, _ = _cuda_captures(name, torch.float32, ids, kernel="chunked", chunk_rows=256)
    for f in FIELDS:
        assert rel_err(getattr(a[0], f), getattr(b[0], f)) <= RTOL, f


def _exact_row_scores(q, k):
    """float64 s_ii and s_i0, and the float32-accumulation bound d * eps32 * sum |q_j k_j|."""
    qd, kd = q.double(), k.double().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    terms = torch.stack((qd * kd, qd * kd[:, :, :1]), dim=-2)  # (b, h, n, 2, d)
    return terms.sum(-1), q.shape[-1] * 2.0**-24 * terms.abs().sum(-1)


@pytest.mark.parametrize("model_layout", [True, False])
def test_half_row_scores_layout(monkeypatch, model_layout):
    """The GPU route of s_ii and s_i0 (batched products per (batch, row, KV head) and per
    batch element, grouped heads, one batch element per call), with its float32-output
    product emulated on the CPU: exact products of bfloat16 values summed in float32
    (bfloat16 -> float32 is exact). Both memory layouts: (b, n, h, d), as models make q and
    k and capture_fast stacks them, and (b, h, n, d)."""
    import sheafscope.diag_stats as ds

    monkeypatch.setattr(ds, "ROW_PRODUCTS", 300 * 2)  # n * h_kv: one batch element per call
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(3, 8, 300, 64, generator=g) * 3).to(torch.bfloat16)
    k = (torch.randn(3, 2, 300, 64, generator=g) * 3).to(torch.bfloat16)
    if model_layout:
        q, k = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k))
    got = ds._row_scores_half(q, k, lambda a, b: torch.bmm(a.float(), b.float()))
    want, bound = _exact_row_scores(q, k)
    assert got.dtype == torch.float32 and got.shape == (3, 8, 300, 2)
    assert ((got.double() - want).abs() <= bound).all()


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_half_row_scores_are_float32_sums_of_exact_products(dtype):
    """s_ii and s_i0 of half-precision q and k (grouped heads, the model's memory layout), from the
    float32-accumulating batched products, equal the float64 dot products up to float32
    accumulation (d * eps32 * sum |q_j k_j|), as the float32 elementwise path does."""
    from sheafscope.diag_stats import _row_scores, _row_scores_half_cuda

    g = torch.Generator(device="cuda").manual_seed(0)
    q = (torch.randn(3, 8, 300, 64, device="cuda", generator=g) * 3).to(dtype)
    k = (torch.randn(3, 2, 300, 64, device="cuda", generator=g) * 3).to(dtype)
    q, k = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k))
    got = _row_scores_half_cuda(q, k)
    assert got is not None and got.dtype == torch.float32 and got.shape == (3, 8, 300, 2)
    want, bound = _exact_row_scores(q, k)
    for scores in (got, _row_scores(q, k, 128)):
        assert ((scores.double() - want).abs() <= bound).all()


@pytest.mark.parametrize("sink", ["s_aux", "sinks"])
@pytest.mark.parametrize("captured", [False, True])
def test_attention_sinks_are_refused_by_name(sink, captured):
    """A family with attention sinks (gpt-oss passes s_aux) would get softmax rows the fast
    path does not compute: refused, naming the argument and the fix, with or without a
    capture and on every call (a plan made by a call without sinks does not let one through)."""
    from sheafscope.capture_fast import sheafscope_attention
    from sheafscope.errors import SheafscopeError

    model = build_tiny("llama", attn_implementation=FAST_ATTENTION)
    module = adapter_for(model).attention(0)
    q = k = v = torch.randn(1, model.config.num_attention_heads, 6, 8)
    context = DiagonalCapture(model) if captured else contextlib.nullcontext()
    with torch.no_grad(), pytest.raises(SheafscopeError, match=rf"sinks \({sink}\).*attention='eager'"), context:
        if captured:  # a first call without sinks makes a plan
            sheafscope_attention(module, q, k, v, None, scaling=0.125)
        sheafscope_attention(module, q, k, v, None, scaling=0.125, **{sink: torch.zeros(q.shape[1])})


def test_a_second_forward_inside_one_capture_is_refused():
    """Two forward passes inside one DiagonalCapture would record each layer twice: the
    second raises, naming the fix. A new capture then works (the layer index cache is copied,
    not shared)."""
    from sheafscope.errors import SheafscopeError

    model = build_tiny("llama", attn_implementation=FAST_ATTENTION)
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    with torch.no_grad(), pytest.raises(SheafscopeError, match="one capture per forward pass"):
        with DiagonalCapture(model) as cap:
            model(ids)
            model(ids)
    with torch.no_grad(), DiagonalCapture(model) as cap:
        model(ids)
    assert sorted(cap.records) == list(range(model.config.num_hidden_layers))


class _PlantNaN(torch.nn.Module):
    def forward(self, x):
        x = x.clone()
        x[1, 3, 2] = float("nan")
        return x


@pytest.mark.parametrize("hold_bytes", [None, 0])  # streams reduced together, or one by one
@pytest.mark.parametrize("device,dtype", [("cpu", torch.float32), ("cuda", torch.float32), ("cuda", torch.bfloat16)])
def test_hidden_max_propagates_nan(device, dtype, hold_bytes):
    """max |h| per stream and batch element equals a float64 reference, and a NaN in a hidden
    state stays NaN in its element's maxima (check_finite then names it) on every device."""
    from sheafscope.capture_fast import HiddenMax

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    blocks = [torch.nn.Identity(), _PlantNaN(), torch.nn.Identity()]
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    streams = [x]
    with torch.no_grad(), HiddenMax(blocks, hold_bytes=hold_bytes) as hm:
        for block in blocks:
            streams.append(block(streams[-1]))
        hm.final(streams[-1])
    got = hm.result()
    want = torch.stack([s.double().abs().amax(dim=(-1, -2)).cpu() for s in streams], dim=1)
    want[1, 2:] = float("nan")  # amax skips nothing: element 1 from stream 2 on
    assert got.shape == want.shape == (2, 4)
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got[~got.isnan()], want[~want.isnan()])


def test_hidden_max_leaves_the_blocks_as_it_found_them():
    """HiddenMax wraps the blocks' forward while entered: on exit, also after an error inside,
    each block's forward is what it was (the class's, or an instance-level wrapper such as
    accelerate installs), and the maxima equal max |h| of the model's own hidden_states."""
    from sheafscope.capture_fast import HiddenMax

    model = build_tiny("llama")
    blocks = adapter_for(model).blocks
    calls = []
    original = blocks[1].forward

    def outer(*args, **kwargs):  # stands in for an accelerate hook on block 1
        calls.append(1)
        return original(*args, **kwargs)

    blocks[1].forward = outer
    ids = torch.randint(0, model.config.vocab_size, (1, 10))
    with torch.no_grad():
        ref = model.model(ids, output_hidden_states=True)
        calls.clear()
        with HiddenMax(blocks) as hm:
            out = model.model(ids)
            hm.final(out[0])
        got = hm.result()
    want = torch.stack([h.abs().amax(dim=(-1, -2)) for h in ref.hidden_states], dim=1).double()
    assert torch.allclose(got, want, rtol=1e-6, atol=0)
    assert len(calls) == 1  # the instance wrapper still ran, inside HiddenMax's
    assert blocks[1].forward is outer and "forward" not in blocks[0].__dict__
    with pytest.raises(RuntimeError, match="inside"), torch.no_grad(), HiddenMax(blocks):
        raise RuntimeError("inside")
    assert blocks[1].forward is outer and all("forward" not in b.__dict__ for b in blocks if b is not blocks[1])
