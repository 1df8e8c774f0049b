"""D5: 4-bit weights are packed bytes; ||W_V|| must come from dequantized weights.

bitsandbytes quantizes on the CPU too, so this runs everywhere CI runs.
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


@pytest.fixture(scope="module")
def quantized_and_reference(tmp_path_factory):
    cls, kw = TINY_CONFIGS["llama"]
    cfg = getattr(transformers, cls)(**{**kw, "hidden_size": 128, "intermediate_size": 256, "vocab_size": 30522})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    path = tmp_path_factory.mktemp("q4")
    model.save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(str(offline.model_dir("minilm-l6"))).save_pretrained(path)
    # eager: the value-vector check reads the model's own attention matrices
    q = load_model(str(path), device="cpu", dtype="float32", quantize="4bit")
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
