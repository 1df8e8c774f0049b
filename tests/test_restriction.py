"""Restriction maps, per-head output projections W_O^h and pre-attention norm gains, each
checked against a reference that does not go through the code under test:

- W_O^h against the output projection the model runs in its own forward pass;
- norm_gain against what the model's own norm module does to an input;
- raw_wv, raw_wv_norm, ov, ov_norm against explicit float64 constructions from the module
  weights (written here from the layouts in DESIGN.md section 2, with head h reading KV head
  h // (heads / kv_heads), D3), the reference itself anchored to the forward pass;
- the invariances of DESIGN.md section 6 (W_V -> cW_V with W_O -> W_O/c; a norm gain moved
  into the projections) on edited copies of the weights, with the logits as witness.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

pytestmark = pytest.mark.unit
import torch

from sheafscope.measures.restriction import RESTRICTION_MAPS, norms_sq
from sheafscope.models.adapters import adapter_for
from tiny_models import TINY_CONFIGS, build_tiny
from valuecheck import value_vector_errors

IDS = torch.tensor([[5, 17, 3, 99, 42, 8, 61, 23, 77, 14]])
FAMILIES = sorted(TINY_CONFIGS)
MAPS = ("raw_wv", "raw_wv_norm", "ov", "ov_norm")


# --------------------------------------------------------------------------------------------
# Independent reference: where each family keeps its weights, written out by hand.
# value layouts: "conv_qkv"  GPT-2 Conv1D (in, out), columns [Q | K | V]
#                "linear"    nn.Linear (kv_heads * head_dim, D), KV head k = rows k*hd:(k+1)*hd
#                "interleaved" fused (H * 3 * hd, D) laid out per head as [q_h, k_h, v_h]
# output layouts: "conv" Conv1D (H * hd, D); "linear" nn.Linear (D, H * hd)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Ref:
    blocks: str
    value: str  # path from a block to the module holding W_V
    value_layout: str
    out: str  # path from a block to the output projection
    out_layout: str
    pre_norm: str | None  # path from a block to the norm right before attention; None: post-norm
    q: tuple[str, ...] = ()  # other projections reading the pre-attention norm's output (fold test)


_LLAMA = Ref("model.layers", "self_attn.v_proj", "linear", "self_attn.o_proj", "linear", "input_layernorm",
             q=("self_attn.q_proj", "self_attn.k_proj"))
REFS: dict[str, Ref] = {
    "gpt2": Ref("transformer.h", "attn.c_attn", "conv_qkv", "attn.c_proj", "conv", "ln_1"),
    "opt": Ref("model.decoder.layers", "self_attn.v_proj", "linear", "self_attn.out_proj", "linear",
               "self_attn_layer_norm"),
    "opt_postnorm": Ref("model.decoder.layers", "self_attn.v_proj", "linear", "self_attn.out_proj", "linear", None),
    "gpt_neox": Ref("gpt_neox.layers", "attention.query_key_value", "interleaved", "attention.dense", "linear",
                    "input_layernorm"),
    "bloom": Ref("transformer.h", "self_attention.query_key_value", "interleaved", "self_attention.dense", "linear",
                 "input_layernorm"),
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "gemma": _LLAMA,
    "gemma2": _LLAMA,
    "gemma3": _LLAMA,
    "bert": Ref("encoder.layer", "attention.self.value", "linear", "attention.output.dense", "linear", None),
}


def _get(root, dotted: str):
    for part in dotted.split("."):
        root = root[int(part)] if part.isdigit() else getattr(root, part)
    return root


def ref_block(model, name: str, layer: int):
    return _get(model, REFS[name].blocks)[layer]


def ref_module(model, name: str, layer: int, field: str):
    return _get(ref_block(model, name, layer), getattr(REFS[name], field))


def ref_counts(model) -> tuple[int, int]:
    cfg = model.config
    n_heads = int(cfg.num_attention_heads)
    return n_heads, int(getattr(cfg, "num_key_value_heads", None) or n_heads)


def ref_value_weights(model, name: str, layer: int) -> torch.Tensor:
    """W_V^h for every query head, (H, hd, D) float64, head h reading KV head h // (H / kv)."""
    n_heads, n_kv = ref_counts(model)
    w = ref_module(model, name, layer, "value").weight.detach().double()
    layout = REFS[name].value_layout
    if layout == "conv_qkv":  # (D, 3 * H * hd)
        d_model, three_inner = w.shape
        inner = three_inner // 3
        v = w[:, 2 * inner :].T  # (H * hd, D)
        return v.reshape(n_heads, inner // n_heads, d_model)
    if layout == "interleaved":  # (H * 3 * hd, D)
        rows, d_model = w.shape
        return w.reshape(n_heads, 3, rows // (3 * n_heads), d_model)[:, 2]
    rows, d_model = w.shape  # linear: (kv * hd, D)
    head_dim = rows // n_kv
    group = n_heads // n_kv
    return torch.stack([w[(h // group) * head_dim : (h // group + 1) * head_dim] for h in range(n_heads)])


def ref_output_weights(model, name: str, layer: int) -> torch.Tensor:
    """W_O^h for every query head, (H, D, hd) float64: the columns of the output projection
    that multiply head h's slice of the concatenated context."""
    n_heads, _ = ref_counts(model)
    w = ref_module(model, name, layer, "out").weight.detach().double()
    if REFS[name].out_layout == "conv":  # Conv1D (in = H * hd, out = D)
        w = w.T
    d_model, inner = w.shape
    hd = inner // n_heads
    return torch.stack([w[:, h * hd : (h + 1) * hd] for h in range(n_heads)])


def _norm_eps(norm) -> float:
    for attr in ("eps", "variance_epsilon", "epsilon"):
        if hasattr(norm, attr):
            return float(getattr(norm, attr))
    raise AssertionError(f"no epsilon on {type(norm).__name__}")


@torch.no_grad()
def probed_gain(norm, d_model: int) -> torch.Tensor:
    """The elementwise gain a norm module applies, measured by running it.

    With x = (+1, -1, +1, ...) (mean 0, mean square 1), both LayerNorm and RMSNorm normalise x to
    x / sqrt(1 + eps); the bias cancels in y(x) - y(-x) = 2 g x / sqrt(1 + eps). So whatever the
    module does with its weight (Gemma: 1 + w), this is the gain it applies.
    """
    assert d_model % 2 == 0
    x = torch.ones(d_model)
    x[1::2] = -1.0
    y = norm(x[None].float()).double()[0] - norm(-x[None].float()).double()[0]
    return y * x.double() * (1.0 + _norm_eps(norm)) ** 0.5 / 2.0


def ref_gain(model, name: str, layer: int) -> torch.Tensor | None:
    path = REFS[name].pre_norm
    if path is None:
        return None
    return probed_gain(ref_module(model, name, layer, "pre_norm"), model.config.hidden_size)


def ref_norms_sq(model, name: str) -> dict[str, torch.Tensor]:
    """Every restriction map from the reference weights, the OV circuit as the explicit
    d_model x d_model product: {map: (layers, heads) float64}."""
    n_layers = len(_get(model, REFS[name].blocks))
    out = {m: [] for m in MAPS}
    for layer in range(n_layers):
        wv = ref_value_weights(model, name, layer)  # (H, hd, D)
        wo = ref_output_weights(model, name, layer)  # (H, D, hd)
        ov = wo @ wv  # (H, D, D)
        assert ov.shape[-2:] == (model.config.hidden_size, model.config.hidden_size)
        g = ref_gain(model, name, layer)
        wv_g = wv if g is None else wv * g[None, None, :]
        ov_g = ov if g is None else ov * g[None, None, :]
        for key, w in (("raw_wv", wv), ("raw_wv_norm", wv_g), ("ov", ov), ("ov_norm", ov_g)):
            out[key].append(w.pow(2).sum(dim=(-1, -2)))
    return {k: torch.stack(v) for k, v in out.items()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def tiny():
    """Unmodified tiny models, built once for the read-only tests of this file."""
    cache = {}

    def get(name):
        if name not in cache:
            model = build_tiny(name)
            cache[name] = (model, adapter_for(model))
        return cache[name]

    return get


# --------------------------------------------------------------------------------------------
# 1. W_O^h against the output projection of the model's own forward pass
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def output_projection_errors(model, adapter, input_ids, weights=None) -> list[tuple[float, float]]:
    """Per layer: (rel. err of sum_h W_O^h ctx_h + b against the projection's output,
    max over heads of the rel. err of W_O^h ctx_h against proj(ctx with other heads zeroed) - b).
    `weights(layer)` overrides adapter.output_weight."""
    g = adapter.geometry
    ins, outs, hooks = {}, {}, []
    for layer in range(g.n_layers):
        mod = adapter.output_module(layer)
        hooks.append(mod.register_forward_pre_hook(
            lambda m, a, k, layer=layer: ins.__setitem__(layer, (a[0] if a else next(iter(k.values()))).clone()),
            with_kwargs=True))
        hooks.append(mod.register_forward_hook(lambda m, a, o, layer=layer: outs.__setitem__(layer, o.clone())))
    try:
        model(input_ids=input_ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    errors = []
    for layer in range(g.n_layers):
        mod = adapter.output_module(layer)
        ctx, y = ins[layer][0], outs[layer][0]  # (n, H * hd), (n, D)
        n = ctx.shape[0]
        bias = mod.bias.detach().double() if getattr(mod, "bias", None) is not None else torch.zeros(y.shape[-1], dtype=torch.float64)
        wo = (weights(layer) if weights else adapter.output_weight(layer)).double()  # (H, D, hd)
        assert tuple(wo.shape) == (g.n_heads, g.d_model, g.head_dim)
        heads = ctx.double().view(n, g.n_heads, g.head_dim)
        share = torch.einsum("hdk,nhk->hnd", wo, heads)  # (H, n, D)
        total_err = _rel(share.sum(0) + bias, y)
        head_errs = []
        for h in range(g.n_heads):
            masked = torch.zeros_like(ctx).view(n, g.n_heads, g.head_dim)
            masked[:, h] = ctx.view(n, g.n_heads, g.head_dim)[:, h]
            alone = mod(masked.view(1, n, -1)).double()[0] - bias
            head_errs.append(_rel(share[h], alone))
        errors.append((total_err, max(head_errs)))
    return errors


@pytest.mark.parametrize("name", FAMILIES)
def test_output_projection_per_head_matches_forward_pass(name, tiny):
    model, adapter = tiny(name)
    for layer in range(adapter.geometry.n_layers):
        assert adapter.output_module(layer) is ref_module(model, name, layer, "out")
    errors = output_projection_errors(model, adapter, IDS)
    assert max(max(e) for e in errors) <= 1e-5, errors


@pytest.mark.parametrize("name", ["gpt2", "llama", "gemma"])
def test_output_projection_check_catches_a_wrong_head_layout(name, tiny):
    """The check above must fail for a plausible wrong slicing: head-minor columns."""
    model, adapter = tiny(name)
    g = adapter.geometry

    def wrong(layer):
        o = ref_output_weights(model, name, layer).permute(1, 0, 2).reshape(g.d_model, -1)  # (D, H*hd), right
        return o.view(g.d_model, g.head_dim, g.n_heads).permute(2, 0, 1).float()  # columns h::H, wrong

    errors = output_projection_errors(model, adapter, IDS, weights=wrong)
    # (the sum includes the output bias, which the wrong layout keeps: hence the lower bound)
    assert min(e[0] for e in errors) > 1e-2 and min(e[1] for e in errors) > 0.1, errors


@pytest.mark.parametrize("name", FAMILIES)
def test_reference_weights_match_forward_pass(name, tiny):
    """The explicit W_V^h / W_O^h this file builds its references from are the model's own."""
    model, adapter = tiny(name)
    assert max(value_vector_errors(model, adapter, IDS, weights=lambda l: ref_value_weights(model, name, l).float())) <= 1e-5
    errors = output_projection_errors(model, adapter, IDS, weights=lambda l: ref_output_weights(model, name, l))
    assert max(max(e) for e in errors) <= 1e-5, errors


# --------------------------------------------------------------------------------------------
# 2. Norm gain against the model's own norm module
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [n for n in FAMILIES if REFS[n].pre_norm])
@torch.no_grad()
def test_norm_gain_is_the_gain_the_norm_module_applies(name, tiny):
    model, adapter = tiny(name)
    torch.manual_seed(1)
    for layer in range(adapter.geometry.n_layers):
        norm = ref_module(model, name, layer, "pre_norm")
        gain = adapter.norm_gain(layer)
        assert gain is not None and tuple(gain.shape) == (adapter.geometry.d_model,)
        gain = gain.double()
        x = (3.0 * torch.randn(2, 7, adapter.geometry.d_model) + 0.7).double()  # mean != 0
        y = norm(x.float()).double()
        eps = _norm_eps(norm)
        if isinstance(norm, torch.nn.LayerNorm):
            xhat = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + eps)
            expected = xhat * gain + norm.bias.detach().double()
        else:  # RMSNorm, no bias
            assert getattr(norm, "bias", None) is None
            expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * gain
        assert _rel(expected, y) <= 1e-5, (layer, _rel(expected, y))
        # the perturbed tiny gains are far from 1 (and Gemma's stored weight is far from its gain)
        assert _rel(gain, torch.ones_like(gain)) > 0.02


@pytest.mark.parametrize("name", ["gemma", "gemma2", "gemma3"])
def test_gemma_gain_includes_the_plus_one(name, tiny):
    model, adapter = tiny(name)
    norm = ref_module(model, name, 0, "pre_norm")
    w = norm.weight.detach().double()
    gain = adapter.norm_gain(0).double()
    assert torch.allclose(gain, 1.0 + w, atol=1e-6)
    assert not torch.allclose(gain, w, atol=0.5)
    assert torch.allclose(gain, probed_gain(norm, adapter.geometry.d_model), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["bert", "opt_postnorm"])
def test_post_norm_families_have_no_gain(name, tiny):
    _, adapter = tiny(name)
    assert all(adapter.norm_gain(layer) is None for layer in range(adapter.geometry.n_layers))


@pytest.mark.parametrize("name", FAMILIES)
@torch.no_grad()
def test_reference_pre_norm_is_what_feeds_the_values(name, tiny):
    """Pre-norm: the value projection's input is pre_norm(block input). Post-norm: it is the
    block input itself (no norm to fold). Anchors REFS and the None of post-norm families."""
    model, adapter = tiny(name)
    blk_in, v_in, hooks = {}, {}, []
    for layer in range(adapter.geometry.n_layers):
        hooks.append(ref_block(model, name, layer).register_forward_pre_hook(
            lambda m, a, k, layer=layer: blk_in.__setitem__(layer, a[0] if a else k["hidden_states"]), with_kwargs=True))
        hooks.append(ref_module(model, name, layer, "value").register_forward_pre_hook(
            lambda m, a, k, layer=layer: v_in.__setitem__(layer, a[0] if a else next(iter(k.values()))), with_kwargs=True))
    try:
        model(input_ids=IDS, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    for layer in range(adapter.geometry.n_layers):
        if REFS[name].pre_norm:
            expected = ref_module(model, name, layer, "pre_norm")(blk_in[layer])
        else:
            expected = blk_in[layer]
        assert _rel(v_in[layer], expected) <= 1e-6, layer


# --------------------------------------------------------------------------------------------
# 3. The restriction maps against explicit float64 constructions
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
def test_restriction_maps_match_explicit_construction(name, tiny):
    model, adapter = tiny(name)
    ref = ref_norms_sq(model, name)
    g = adapter.geometry
    for m in MAPS:
        got = norms_sq(adapter, m)
        assert got.dtype == torch.float64 and tuple(got.shape) == (g.n_layers, g.n_heads), m
        assert torch.allclose(got, ref[m], rtol=1e-5, atol=0), (m, got, ref[m])
    if REFS[name].pre_norm is None:
        assert torch.equal(norms_sq(adapter, "raw_wv_norm"), norms_sq(adapter, "raw_wv"))
        assert torch.equal(norms_sq(adapter, "ov_norm"), norms_sq(adapter, "ov"))
    else:  # the gains are not trivial, so folding them must show
        assert _rel(ref["raw_wv_norm"], ref["raw_wv"]) > 1e-2
        assert _rel(ref["ov_norm"], ref["ov"]) > 1e-2


def test_every_restriction_map_is_covered():
    assert set(RESTRICTION_MAPS) == set(MAPS)


# --------------------------------------------------------------------------------------------
# 4. Grouped-query attention (D3)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "gemma", "gemma2", "gemma3"])
def test_grouped_query_heads_use_their_kv_heads_value(name, tiny):
    model, adapter = tiny(name)
    n_heads, n_kv = ref_counts(model)
    assert n_kv < n_heads
    group = n_heads // n_kv
    v_proj = ref_module(model, name, 0, "value").weight.detach().double().view(n_kv, -1, model.config.hidden_size)
    raw = norms_sq(adapter, "raw_wv")[0]
    for h in range(n_heads):
        assert torch.allclose(raw[h], v_proj[h // group].pow(2).sum(), rtol=1e-6)
    # the other plausible mapping (h -> h % kv) is distinguishable here, so the test can fail
    if n_kv > 1:
        tiled = torch.stack([v_proj[h % n_kv].pow(2).sum() for h in range(n_heads)])
        assert not torch.allclose(raw, tiled, rtol=1e-3)
    # ov: heads of one group share W_V but not W_O
    ov = norms_sq(adapter, "ov")[0]
    assert not torch.allclose(ov[0], ov[1], rtol=1e-3)


# --------------------------------------------------------------------------------------------
# Invariances (DESIGN.md section 6) on edited copies of the weights
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def scale_value_head(model, name: str, layer: int, kv_head: int, c_v: float, c_o: float) -> list[int]:
    """Scale KV head `kv_head`'s W_V (and value bias) by c_v and the W_O columns of every query
    head reading it by c_o, in place. Returns those query heads."""
    n_heads, n_kv = ref_counts(model)
    group = n_heads // n_kv
    heads = [h for h in range(n_heads) if h // group == kv_head]
    vmod, omod = ref_module(model, name, layer, "value"), ref_module(model, name, layer, "out")
    layout = REFS[name].value_layout
    if layout == "conv_qkv":
        inner = vmod.weight.shape[1] // 3
        hd = inner // n_heads
        cols = slice(2 * inner + kv_head * hd, 2 * inner + (kv_head + 1) * hd)
        vmod.weight[:, cols] *= c_v
        vmod.bias[cols] *= c_v
    elif layout == "interleaved":
        hd = vmod.weight.shape[0] // (3 * n_heads)
        vmod.weight.view(n_heads, 3, hd, -1)[kv_head, 2] *= c_v
        if vmod.bias is not None:
            vmod.bias.view(n_heads, 3, hd)[kv_head, 2] *= c_v
    else:
        hd = vmod.weight.shape[0] // n_kv
        vmod.weight[kv_head * hd : (kv_head + 1) * hd] *= c_v
        if vmod.bias is not None:
            vmod.bias[kv_head * hd : (kv_head + 1) * hd] *= c_v
    for h in heads:
        if REFS[name].out_layout == "conv":
            omod.weight[h * hd : (h + 1) * hd, :] *= c_o
        else:
            omod.weight[:, h * hd : (h + 1) * hd] *= c_o
    return heads


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS, use_cache=False).logits.double()


@pytest.mark.parametrize("name", ["gpt2", "llama", "gpt_neox", "qwen2"])
def test_ov_is_invariant_to_rescaling_wv_against_wo(name):
    c, layer, kv_head = 3.0, 1, 1
    model = build_tiny(name)  # a fresh copy: its weights are edited below
    before = {m: norms_sq(adapter_for(model), m) for m in MAPS}
    logits = _logits(model)
    heads = scale_value_head(model, name, layer, kv_head, c, 1.0 / c)
    after = {m: norms_sq(adapter_for(model), m) for m in MAPS}
    assert _rel(_logits(model), logits) <= 1e-5  # the model computes the same function
    assert torch.allclose(after["ov"], before["ov"], rtol=1e-5, atol=0)
    assert torch.allclose(after["ov_norm"], before["ov_norm"], rtol=1e-5, atol=0)
    factor = torch.ones_like(before["raw_wv"])
    factor[layer, heads] = c**2
    assert torch.allclose(after["raw_wv"], before["raw_wv"] * factor, rtol=1e-5, atol=0)
    assert torch.allclose(after["raw_wv_norm"], before["raw_wv_norm"] * factor, rtol=1e-5, atol=0)
    # control: undo W_O's compensation; the function and ov both change, so the checks above can fail
    scale_value_head(model, name, layer, kv_head, 1.0, c)
    assert _rel(_logits(model), logits) > 1e-3
    ov = norms_sq(adapter_for(model), "ov")
    assert torch.allclose(ov, before["ov"] * factor, rtol=1e-5, atol=0)


@torch.no_grad()
def fold_into_norm(model, name: str, layer: int, s: torch.Tensor) -> None:
    """Multiply the pre-attention norm's effective gain (and LayerNorm bias) by s and divide the
    input columns of every projection reading the norm's output by s: the same function."""
    norm = ref_module(model, name, layer, "pre_norm")
    if name.startswith("gemma"):  # effective gain 1 + w
        norm.weight.copy_((1.0 + norm.weight) * s - 1.0)
    else:
        norm.weight.mul_(s)
        if getattr(norm, "bias", None) is not None:
            norm.bias.mul_(s)
    if REFS[name].value_layout == "conv_qkv":  # Conv1D (in, out): q, k and v all read rows
        ref_module(model, name, layer, "value").weight.div_(s[:, None])
        return
    blk = ref_block(model, name, layer)
    for path in (REFS[name].value, *REFS[name].q):
        _get(blk, path).weight.div_(s[None, :])


@pytest.mark.parametrize("name", ["gpt2", "llama", "gemma"])
def test_norm_folded_maps_are_invariant_to_moving_the_gain(name):
    model = build_tiny(name)
    torch.manual_seed(2)
    s = torch.exp(0.5 * torch.randn(model.config.hidden_size))
    before = {m: norms_sq(adapter_for(model), m) for m in MAPS}
    logits = _logits(model)
    fold_into_norm(model, name, 0, s)
    after = {m: norms_sq(adapter_for(model), m) for m in MAPS}
    assert _rel(_logits(model), logits) <= 1e-5
    assert torch.allclose(after["raw_wv_norm"], before["raw_wv_norm"], rtol=1e-5, atol=0)
    assert torch.allclose(after["ov_norm"], before["ov_norm"], rtol=1e-5, atol=0)
    # the un-folded maps do see the move (layer 0 only), so the equalities above can fail
    assert _rel(after["raw_wv"][0], before["raw_wv"][0]) > 1e-2
    assert _rel(after["ov"][0], before["ov"][0]) > 1e-2
    assert torch.equal(after["raw_wv"][1], before["raw_wv"][1])
