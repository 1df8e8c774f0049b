"""The capture core: the fast path against the eager reference (explicit attention matrices)
and float64 recomputations, through the public interface (capture, capture_all, analyze)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from sheafscope import analyze, load_model
from sheafscope.analysis import target_of
from sheafscope.capture import capture, fast
from sheafscope.capture import batching
from sheafscope.capture.batching import capture_all, token_batches
from sheafscope.errors import NonFiniteError, SheafscopeError
from sheafscope.models.adapters import adapter_class
from tiny_models import TINY_CONFIGS, build_tiny

RTOL = 1e-5
FIELDS = ("offdiag_mass", "first_token_mass", "max_abs_hidden")
PROMPTS = [
    "The capital of France is Paris, which is known for the Eiffel Tower.",
    "Once upon a time",
    "def add(a, b):\n    return a + b",
    "Die Katze sitzt auf der Matte und schaut aus dem Fenster.",
    "1 2 3 4 5 6 7 8 9 10",
]


def _supported(name: str) -> bool:
    cls_name, kwargs = TINY_CONFIGS[name]
    return adapter_class(getattr(transformers, cls_name)(**kwargs).model_type).fast_path_supported


FAMILIES = [n for n in sorted(TINY_CONFIGS) if _supported(n)]
UNSUPPORTED = [n for n in sorted(TINY_CONFIGS) if not _supported(n)]


def rel_err(x, ref) -> float:
    x, ref = np.asarray(x, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return float(np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-30))


def _prompts(lengths, seed=0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (n,), generator=g) for n in lengths]


def _assert_close(got, want, rtol=RTOL) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.n_tokens == w.n_tokens
        for f in FIELDS:
            assert rel_err(getattr(g, f), getattr(w, f)) <= rtol, (f, rel_err(getattr(g, f), getattr(w, f)))


@pytest.fixture(params=["exact-rows", "exact-together", "lse", "lse-per-layer", "lse-together"])
def route(request, monkeypatch):
    """The routes of a fused-kernel call: every row exact (small problems), or rows from the
    kernel's log-sum-exp with untrusted ones recomputed (forced by an exact-rows limit of 0),
    after the forward pass or, past the memory held for it, layer by layer (a limit of 0); each
    layer alone or all layers settled together (the GPU's way)."""
    if request.param.startswith("lse"):
        monkeypatch.setitem(fast.EXACT_KEYS, "cpu", 0)
    if request.param == "lse-per-layer":
        monkeypatch.setitem(fast.HOLD_BYTES, "cpu", 0)
    if request.param.endswith("together"):
        monkeypatch.setitem(fast.TOGETHER, "cpu", True)
    return request.param


@pytest.mark.unit
@pytest.mark.parametrize("name", FAMILIES)
def test_fast_equals_eager_in_padded_batches(name, route):
    """Every family's tiny twin, three prompts of different lengths in one right-padded batch
    (sliding windows of 4 tokens, which the longer prompts pass; gemma2 soft-caps its logits,
    so it takes the chunked route; BERT is bidirectional and gets the padding mask)."""
    target = target_of(build_tiny(name))
    prompts = _prompts([12, 5, 9])
    got = capture(target, prompts, "fast")
    want = capture(target, prompts, "eager")
    _assert_close(got.prompts, want.prompts)
    assert want.ran == {"eager": 3}
    if name == "gemma2":
        assert got.fallbacks == ["logit soft-capping"] and got.ran["chunked"] > 0
    else:
        assert got.fallbacks == [] and got.ran["flash-cpu"] == target.n_layers
        if route.startswith("exact"):
            assert got.ran["exact-rows"] == target.n_layers
        elif target.causal:
            assert got.ran["rows-recomputed"] > 0  # the refinement ran: early rows attend to themselves


@pytest.mark.unit
@pytest.mark.parametrize("name", FAMILIES)
def test_padding_never_changes_a_prompts_numbers(name, route):
    target = target_of(build_tiny(name))
    prompts = _prompts([14, 3, 8, 11], seed=1)
    together = capture(target, prompts, "fast").prompts
    alone = [capture(target, [p], "fast").prompts[0] for p in prompts]
    _assert_close(together, alone, rtol=1e-6)


@pytest.mark.unit
@pytest.mark.parametrize("together", [False, True], ids=["loop", "together"])
def test_rows_that_attend_to_themselves_keep_full_precision(monkeypatch, together):
    """Query and key weights scaled up so that heads put almost all their mass on the diagonal
    (1 - A_ii down to ~1e-8), where 1 - A_ii from a float32 log-sum-exp would be noise: the lse
    route must recompute those rows, and its masses equal an eager run head by head."""
    monkeypatch.setitem(fast.EXACT_KEYS, "cpu", 0)
    monkeypatch.setitem(fast.TOGETHER, "cpu", together)
    model = build_tiny("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(30.0)
            layer.self_attn.k_proj.weight.copy_(layer.self_attn.q_proj.weight.view(2, 4, 8, 64)[:, 0].reshape(16, 64))
    prompts = _prompts([10, 7], seed=2)
    got32 = capture(target_of(model), prompts, "fast")
    model.double()
    got64 = capture(target_of(model), prompts, "fast")
    want = capture(target_of(model), prompts, "eager")
    assert got32.ran["rows-recomputed"] > 0 and got64.ran["rows-recomputed"] > 0
    assert min(w.offdiag_mass.min() for w in want.prompts) < 1e-6  # the case this test is about
    for g32, g64, w in zip(got32.prompts, got64.prompts, want.prompts):
        # eager's softmax is float32 even in a float64 model: equal to its rounding
        np.testing.assert_allclose(g64.offdiag_mass, w.offdiag_mass, rtol=RTOL)
        # float32's forward pass rounds the scores (~1e-7 of ~20) before any statistic
        np.testing.assert_allclose(g32.offdiag_mass, w.offdiag_mass, rtol=1e-4)


@pytest.mark.unit
@pytest.mark.parametrize("name", FAMILIES)
def test_the_capture_leaves_the_model_as_it_found_it(name):
    model = build_tiny(name)
    ids = _prompts([9])[0][None]
    before = model.config._attn_implementation
    with torch.no_grad():
        want = model(input_ids=ids)[0]
    hooks = [dict(m._forward_pre_hooks) for m in model.modules()]  # the capture's kind of hook
    capture(target_of(model), [ids[0]], "fast")
    capture(target_of(model), [ids[0]], "eager")
    assert model.config._attn_implementation == before
    assert [dict(m._forward_pre_hooks) for m in model.modules()] == hooks
    with torch.no_grad():
        got = model(input_ids=ids)[0]
    assert torch.equal(got, want)


@pytest.mark.unit
def test_the_registered_attention_computes_what_sdpa_computes():
    """Outside a capture the registered function is sdpa; inside, its output is the fused
    kernel's: the model's logits equal sdpa's to float32 rounding either way."""
    model = build_tiny("mistral")
    ids = _prompts([12])[0][None]
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        want = model(input_ids=ids).logits
        model.set_attn_implementation(fast.register())
        outside = model(input_ids=ids).logits
        with fast.Recorder({id(layer.self_attn): i for i, layer in enumerate(model.model.layers)},
                           torch.ones(1, 12, dtype=torch.bool)):
            inside = model(input_ids=ids, use_cache=False).logits
    assert torch.equal(outside, want)
    assert (inside - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.unit
@pytest.mark.parametrize("name", UNSUPPORTED)
def test_a_family_outside_the_attention_interface_runs_eager(name):
    target = target_of(build_tiny(name))
    got = capture(target, _prompts([6, 9]), "fast")
    assert got.ran == {"eager": 2}


@pytest.mark.unit
@pytest.mark.parametrize("sink", ["s_aux", "sinks"])
def test_attention_sinks_are_refused_by_name(sink):
    model = build_tiny("llama")
    q = torch.zeros(1, 8, 3, 8)
    k = torch.zeros(1, 2, 3, 8)
    with pytest.raises(SheafscopeError, match=sink):
        fast.attention(model.model.layers[0].self_attn, q, k, k, None, **{sink: torch.zeros(8)})


@pytest.mark.unit
def test_nan_in_the_forward_pass_raises_with_the_fix():
    model = build_tiny("llama")
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="NaN/Inf"):
        capture(target_of(model), _prompts([9]), "fast")


# -- batching ---------------------------------------------------------------------------------------
@pytest.mark.unit
def test_token_batches_respect_the_budget_and_the_padding_share():
    rng = np.random.default_rng(0)
    lengths = [int(x) for x in rng.integers(7, 400, size=300)]
    batches = token_batches(lengths, budget=2048, max_padding=0.2)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        longest = max(lengths[i] for i in b)
        assert lengths[b[0]] == longest
        if len(b) > 1:
            assert longest * len(b) <= 2048
            assert longest * len(b) - sum(lengths[i] for i in b) <= 0.2 * longest * len(b)
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    assert padded - sum(lengths) <= 0.2 * padded


@pytest.mark.unit
def test_out_of_memory_halves_the_batch_and_keeps_the_order(monkeypatch):
    real = batching.launch

    def flaky(target, prompts, attention):
        if len(prompts) > 1:
            raise torch.OutOfMemoryError("simulated")
        return real(target, prompts, attention)

    target = target_of(build_tiny("qwen2"))
    prompts = _prompts([9, 12, 10, 11], seed=3)
    monkeypatch.setattr(batching, "launch", flaky)
    done = []
    got, info = capture_all(target, prompts, "fast", progress=done.append)
    assert info["oom_backoffs"] == 3 and info["batch_size"] == 1 and sum(done) == 4
    monkeypatch.setattr(batching, "launch", real)
    _assert_close(got, [capture(target, [p], "eager").prompts[0] for p in prompts])


# -- offline models: real weights -------------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.parametrize("alias", ["smollm2-135m", "gemma3-270m", "minilm-l6"])
def test_offline_fast_equals_eager(offline_model, alias, route):
    """analyze() end to end: a token-budget batch of prompts of different lengths, real weights."""
    loaded = offline_model(alias)
    got = analyze(loaded, PROMPTS, attention="fast")
    want = analyze(loaded, PROMPTS, attention="eager")
    assert got.info["attention_path"] == "fast" and want.info["attention_path"] == "eager"
    assert got.info["batch_size"] > 1
    _assert_close(got.prompts, want.prompts)


@pytest.mark.integration
def test_offline_qwen_fast_equals_a_float64_recomputation(route, monkeypatch):
    """Qwen2.5's attention logits reach ~1500 (large q/k biases), so one float32 rounding of a
    logit moves A by ~1e-4: no two float32 computations agree to 1e-5 on every head. Checked
    instead in float64: the fast path against eager attention with its softmax kept in float64
    (transformers' eager softmax is float32 even in a float64 model), to 1e-6."""
    loaded = load_model("qwen2.5-coder-0.5b", device="cpu", dtype="float32")
    loaded.model.double()
    got = analyze(loaded, PROMPTS[:3], attention="fast")
    softmax = torch.nn.functional.softmax

    def float64_softmax(x, dim=None, _stacklevel=3, dtype=None):
        return softmax(x, dim=dim, dtype=None if x.dtype == torch.float64 else dtype)

    monkeypatch.setattr(torch.nn.functional, "softmax", float64_softmax)
    want = analyze(loaded, PROMPTS[:3], attention="eager")
    _assert_close(got.prompts, want.prompts, rtol=1e-6)


@pytest.mark.integration
def test_unsupported_family_by_path_runs_eager_and_says_why(tmp_path, offline_model):
    tok = offline_model("smollm2-135m").tokenizer
    cls_name, kwargs = TINY_CONFIGS["bloom"]
    config = getattr(transformers, cls_name)(**{**kwargs, "vocab_size": len(tok)})
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), device="cpu", dtype="float32")
    res = analyze(loaded, PROMPTS[:2])
    assert res.info["attention_path"] == f"eager (fallback: {loaded.adapter.fast_path_note})"
    assert "ALiBi" in res.info["attention_path"]


# -- CUDA (the gpu marker; skipped without a GPU) ----------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", FAMILIES)
def test_cuda_fast_equals_eager(name, dtype):
    """On the GPU, in float32 (to 1e-5) and bfloat16 (to the rounding of bfloat16 inputs: both
    paths see the same bf16 q and k, but sum them in different orders)."""
    target = target_of(build_tiny(name).to("cuda", dtype))
    prompts = [p.cuda() for p in _prompts([40, 17, 33], seed=4)]
    got = capture(target, prompts, "fast")
    want = capture(target, prompts, "eager")
    rtol = RTOL if dtype == torch.float32 else 2e-2
    _assert_close(got.prompts, want.prompts, rtol=rtol)
    if name != "gemma2":
        assert got.fallbacks == [], got.fallbacks


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("name", ["llama", "mistral", "gemma3", "bert"])
def test_cuda_lse_route_equals_exact_rows(name, monkeypatch):
    """Long enough for the lse route on the GPU; the same prompts with every row exact."""
    target = target_of(build_tiny(name).to("cuda"))
    prompts = [p.cuda() for p in _prompts([60, 45], seed=5)]
    monkeypatch.setitem(fast.EXACT_KEYS, "cuda", 0)
    lse = capture(target, prompts, "fast")
    monkeypatch.setitem(fast.EXACT_KEYS, "cuda", 1 << 40)
    exact = capture(target, prompts, "fast")
    assert exact.ran["exact-rows"] > 0 and "exact-rows" not in lse.ran
    _assert_close(lse.prompts, exact.prompts)


@pytest.mark.integration
def test_from_model_gives_the_numbers_of_the_same_checkpoint_by_path(tmp_path, offline_model):
    """A model the caller loaded and wrapped with from_model: the same numbers as the same
    checkpoint loaded by path, and the model unchanged afterwards (attention implementation,
    hooks, outputs)."""
    import sheafscope as ss

    tok = offline_model("smollm2-135m").tokenizer
    cls_name, kwargs = TINY_CONFIGS["llama"]
    config = getattr(transformers, cls_name)(**{**kwargs, "vocab_size": len(tok)})
    torch.manual_seed(5)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    mine = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    ids = tok(PROMPTS[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = mine(input_ids=ids).logits
    hooks = [dict(m._forward_pre_hooks) for m in mine.modules()]
    got = analyze(ss.from_model(mine, tok), PROMPTS[:3])
    want = analyze(load_model(str(tmp_path), device="cpu", dtype="float32"), PROMPTS[:3])
    _assert_close(got.prompts, want.prompts, rtol=1e-6)
    assert mine.config._attn_implementation == "sdpa"
    assert [dict(m._forward_pre_hooks) for m in mine.modules()] == hooks
    with torch.no_grad():
        assert torch.equal(mine(input_ids=ids).logits, before)


@pytest.mark.unit
def test_missing_attention_fails_loudly_on_both_paths():
    """D7: with sdpa, transformers returns attentions == () rather than None; neither path may
    read that as zero layers. The eager reference refuses it, and the fast path refuses a
    forward pass in which its attention function saw fewer layers than the model has."""
    from sheafscope.capture import eager, fast_batch

    model = build_tiny("llama", attn_implementation="sdpa")
    target = target_of(model)
    ids = _prompts([7])[0]
    with pytest.raises(SheafscopeError, match="attention weights for nothing"):
        eager.capture_one(target, ids[None])
    with pytest.raises(SheafscopeError, match="0 of 2 layers"):
        fast_batch.launch(target, [ids]).result()
