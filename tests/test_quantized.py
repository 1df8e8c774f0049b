"""D5: 4-bit weights are packed bytes, 8-bit ones int8 codes with row scales; ||W_V|| must
come from dequantized weights.

bitsandbytes quantizes on the CPU too (4-bit and 8-bit, with forward passes), so this runs
everywhere CI runs. Each width is checked the same way: the dequantized value weights against
the quantized model's own forward pass, and their norms against the unquantized model within
the quantizer's rounding.
"""

from __future__ import annotations

import copy

import pytest

pytestmark = pytest.mark.integration
import torch
import transformers

from sheafscope import analyze, load_model
from sheafscope.models import offline
from sheafscope.models.adapters import dense_weight
from tiny_models import TINY_CONFIGS
from valuecheck import value_vector_errors


PROMPT = "The capital of France is Paris."


def _checkpoint(tmp_path_factory, family: str, **overrides):
    cls, kw = TINY_CONFIGS[family]
    cfg = getattr(transformers, cls)(**{**kw, **overrides, "vocab_size": 30522})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    path = tmp_path_factory.mktemp(family)
    model.save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(str(offline.model_dir("minilm-l6"))).save_pretrained(path)
    return path, model


@pytest.fixture(scope="module")
def llama_checkpoint(tmp_path_factory):
    return _checkpoint(tmp_path_factory, "llama", hidden_size=128, intermediate_size=256)


@pytest.fixture(scope="module")
def quantized_and_reference(llama_checkpoint):
    path, model = llama_checkpoint
    # eager: the value-vector check reads the model's own attention matrices
    q = load_model(str(path), device="cpu", dtype="float32", quantize="4bit")
    return q, model


@pytest.fixture(scope="module")
def quantized8_and_reference(llama_checkpoint):
    path, model = llama_checkpoint
    q = load_model(str(path), device="cpu", dtype="float32", quantize="8bit")
    return q, model


def test_packed_bytes_are_not_weights_and_dequantized_ones_are(quantized_and_reference):
    q, ref = quantized_and_reference
    v_q = q.model.model.layers[0].self_attn.v_proj
    v_ref = ref.model.layers[0].self_attn.v_proj.weight.detach()
    assert type(v_q.weight).__name__ == "Params4bit" and v_q.weight.dtype == torch.uint8
    packed = v_q.weight.data.float()  # what the notebook read
    assert packed.shape[1] == 1 and packed.numel() * 2 == v_ref.numel()
    assert packed.pow(2).sum() / v_ref.pow(2).sum() > 1e5  # D5: off by orders of magnitude
    w = dense_weight(v_q)
    assert w.shape == v_ref.shape
    assert (w - v_ref).norm() / v_ref.norm() < 0.15  # nf4 rounding, not bytes
    assert w.pow(2).sum() / v_ref.pow(2).sum() == pytest.approx(1.0, abs=0.05)


def test_quantized_model_value_vectors_match_its_own_forward_pass(quantized_and_reference):
    q, _ = quantized_and_reference
    ids = q.tokenizer("The capital of France is Paris.", return_tensors="pt")["input_ids"]
    errors = value_vector_errors(q.model, q.adapter, ids)
    v_proj = q.model.model.layers[0].self_attn.v_proj
    # On a CPU with AVX512-BF16, bitsandbytes repacks the weight at the first forward and its
    # kernel then computes in bfloat16 (unit roundoff 2^-8); a wrong layout gives errors ~1.
    bf16_kernel = getattr(v_proj.weight.quant_state, "packing_format_for_cpu", False)
    assert max(errors) < (1e-2 if bf16_kernel else 1e-4)


def test_dequantizes_bitsandbytes_cpu_packed_layout():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    import bitsandbytes as bnb

    torch.manual_seed(1)
    w = torch.randn(64, 256)
    layer = bnb.nn.Linear4bit(256, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4").to("cpu")
    before = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    # The layout bitsandbytes switches to on an AVX512-BF16 CPU, forced here on any CPU.
    packed, state = bnbf._convert_weight_packed_for_cpu(layer.weight.data.clone(), copy.deepcopy(layer.weight.quant_state))
    layer.weight.data, layer.weight.quant_state = packed, state
    after = dense_weight(layer)
    assert after.shape == w.shape
    # Only the block scales change: rounded to bfloat16 (relative 2^-9 at most).
    assert ((after - before).abs() <= before.abs() * 2.0**-8 + 1e-7).all()
    assert (after - w).norm() / w.norm() < 0.15


def test_quantized_traces_use_dequantized_norms(quantized_and_reference):
    q, ref = quantized_and_reference
    res = analyze(q, ["The capital of France is Paris."])
    w = ref.model.layers[0].self_attn.v_proj.weight.detach().double()
    per_kv = w.view(2, 16, 128).pow(2).sum(dim=(1, 2))  # 2 KV heads of head_dim 16, 4 query heads each
    expected = per_kv.repeat_interleave(4).numpy()
    assert res.wv_norm_sq[0] == pytest.approx(expected, rel=0.1)
    assert "bitsandbytes 4bit" in " ".join(res.info["notes"])


# -- 8-bit (LLM.int8(): int8 codes CB, one absmax per output row SCB) -------------------------------
def _manual_int8(codes: torch.Tensor, scb: torch.Tensor) -> torch.Tensor:
    return codes.float() * scb.float()[:, None] / 127.0


def test_8bit_codes_are_not_weights_and_dequantized_ones_are(quantized8_and_reference):
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    q, ref = quantized8_and_reference
    v_q = q.model.model.layers[0].self_attn.v_proj
    v_ref = ref.model.layers[0].self_attn.v_proj.weight.detach()
    assert isinstance(v_q, bnb.nn.Linear8bitLt) and type(v_q.weight).__name__ == "Int8Params"
    assert v_q.weight.dtype == torch.int8 and v_q.weight.shape == v_ref.shape
    codes = v_q.weight.data.float()  # what `.data.float()` reads: codes in [-127, 127]
    assert codes.abs().max() == 127 and codes.pow(2).sum() / v_ref.pow(2).sum() > 1e3
    scb = v_q.weight.SCB if v_q.weight.SCB is not None else v_q.state.SCB
    w = dense_weight(v_q)
    # Exactly bitsandbytes' own dequantization of Int8Params (CB * SCB / 127) ...
    torch.testing.assert_close(w, _manual_int8(v_q.weight.data, scb), rtol=1e-6, atol=0)
    torch.testing.assert_close(w, bnbf.int8_vectorwise_dequant(v_q.weight.data, scb).float(), rtol=1e-6, atol=0)
    # ... and the original weights within the quantizer's rounding: half a step (absmax / 127) per
    # row, after the float16 cast bitsandbytes quantizes from.
    step = scb.float()[:, None] / 127.0
    assert ((w - v_ref).abs() <= 0.5 * step * (1 + 1e-3) + v_ref.abs() * 2.0**-10).all()


def test_8bit_scales_are_found_before_and_after_the_first_forward_pass():
    """Before its first forward pass a Linear8bitLt keeps SCB on the weight; the pass moves it
    (and CB) to layer.state and leaves weight.SCB None. Both must dequantize the same."""
    bnb = pytest.importorskip("bitsandbytes")

    torch.manual_seed(2)
    w = torch.randn(48, 128)
    layer = bnb.nn.Linear8bitLt(128, 48, bias=False, has_fp16_weights=False, threshold=6.0)
    layer.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
    layer = layer.to("cpu").eval()  # quantizes: weight.data = CB (int8), weight.SCB = row absmax
    assert layer.weight.dtype == torch.int8 and layer.weight.SCB is not None
    before = dense_weight(layer)
    torch.testing.assert_close(before, _manual_int8(layer.weight.data, layer.weight.SCB), rtol=1e-6, atol=0)
    # Inputs whose int8 quantization is exact (k / 127, each row's absmax 1): the layer's output is
    # then x @ (its effective weight)^T, and that weight must be the dequantized one.
    k = torch.randint(-127, 128, (5, 128))
    k[:, 0] = 127
    x = k.float() / 127.0
    out = layer(x)
    assert layer.weight.SCB is None and layer.state.SCB is not None  # moved by the forward pass
    after = dense_weight(layer)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    torch.testing.assert_close(out.float(), x @ after.T, rtol=1e-4, atol=1e-5)
    assert (after - w).norm() / w.norm() < 0.01  # int8 rounding, not codes


def test_8bit_model_value_vectors_match_its_own_forward_pass(quantized8_and_reference):
    q, ref = quantized8_and_reference
    ids = q.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    errors = value_vector_errors(q.model, q.adapter, ids)
    # The 8-bit forward pass also rounds each token's activations to int8 (absmax / 127 per row),
    # which bounds the agreement at about 1e-2; codes read as weights, or a wrong scale, give ~1.
    assert max(errors) < 2e-2
    codes_as_weights = value_vector_errors(
        q.model, q.adapter, ids, weights=lambda layer: _raw_codes(q, layer))
    assert min(codes_as_weights) > 0.5


def _raw_codes(q, layer):
    g = q.adapter.geometry
    v = q.model.model.layers[layer].self_attn.v_proj
    w = v.weight.data.float().view(g.n_kv_heads, g.head_dim, g.d_model)
    return w[q.adapter.kv_head_index()]


def test_8bit_traces_use_dequantized_norms(quantized8_and_reference):
    q, ref = quantized8_and_reference
    res = analyze(q, [PROMPT])
    g = q.adapter.geometry
    for layer in range(g.n_layers):
        w = ref.model.layers[layer].self_attn.v_proj.weight.detach().double()
        expected = w.view(g.n_kv_heads, g.head_dim, g.d_model).pow(2).sum(dim=(1, 2))
        expected = expected.repeat_interleave(g.group_size).numpy()
        # ||W||^2 moves by at most 2 ||W|| ||dW|| + ||dW||^2, ||dW|| bounded by half a step per entry.
        v = q.model.model.layers[layer].self_attn.v_proj
        scb = v.weight.SCB if v.weight.SCB is not None else v.state.SCB
        half_step = (0.5 * scb.double() / 127.0).view(g.n_kv_heads, g.head_dim)
        dw = (half_step.pow(2).sum(dim=1) * g.d_model).sqrt().repeat_interleave(g.group_size).numpy()
        bound = 2 * expected**0.5 * dw + dw**2 + expected * 2.0**-9
        assert (abs(res.wv_norm_sq[layer] - expected) <= bound).all(), layer
        assert res.wv_norm_sq[layer] == pytest.approx(expected, rel=0.02)
    notes = " ".join(res.info["notes"])
    assert "bitsandbytes 8bit" in notes and "value weights dequantized" in notes


@pytest.mark.parametrize("quantize", ["4bit", "8bit"])
def test_quantized_gpt2_reads_the_transposed_bitsandbytes_weight(tmp_path_factory, quantize):
    """GPT-2 keeps c_attn as a Conv1D (in, out); quantized, it becomes a bitsandbytes Linear
    holding (out, in): the adapter must dequantize it and not transpose it again."""
    path, ref = _checkpoint(tmp_path_factory, "gpt2", n_embd=64, n_head=4)
    q = load_model(str(path), device="cpu", dtype="float32", quantize=quantize)
    ids = q.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    assert max(value_vector_errors(q.model, q.adapter, ids)) < 2e-2
    ref_w = ref.transformer.h[0].attn.c_attn.weight.detach()[:, 128:].T.reshape(4, 16, 64)
    w = q.adapter.value_weight(0)
    assert w.shape == ref_w.shape and (w - ref_w).norm() / ref_w.norm() < (0.15 if quantize == "4bit" else 0.01)
