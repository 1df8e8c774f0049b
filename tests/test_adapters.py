"""Each adapter's W_V^h against the value vectors the model computes in its own forward pass."""

from __future__ import annotations

import pytest
import torch
import transformers

from sheafscope.models.adapters import ADAPTERS, adapter_for, supported_model_types
from sheafscope.errors import UnsupportedArchitectureError
from tiny_models import TINY_CONFIGS, build_tiny
from valuecheck import value_vector_errors

IDS = torch.tensor([[5, 17, 3, 99, 42, 8, 61, 23, 77, 14]])


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_value_vectors_match_forward_pass(name):
    model = build_tiny(name)
    adapter = adapter_for(model)
    errors = value_vector_errors(model, adapter, IDS)
    assert max(errors) <= 1e-5, errors


def test_every_family_of_the_issue_has_an_adapter_and_a_tiny_test():
    families = {"gpt2", "opt", "gpt_neox", "bloom", "llama", "mistral", "qwen2", "gemma", "gemma2", "gemma3", "bert"}
    assert families <= set(ADAPTERS)
    assert families <= {adapter_for(build_tiny(n)).family for n in TINY_CONFIGS}


@pytest.mark.parametrize("name", ["gpt_neox", "bloom"])
def test_notebook_value_slice_of_fused_qkv_is_wrong(name):
    """D1/D2: rows 2*hidden: of query_key_value are not W_V; the check must catch it."""
    model = build_tiny(name)
    adapter = adapter_for(model)
    g = adapter.geometry
    qkv = adapter.value_input_module(0).weight.detach().float()
    notebook = qkv[2 * g.d_model :].view(g.n_heads, g.head_dim, g.d_model)
    errors = value_vector_errors(model, adapter, IDS, weights=lambda layer: notebook if layer == 0 else adapter.head_value_weights(layer))
    assert errors[0] > 0.1, errors
    wrong_heads = [h for h in range(g.n_heads) if not torch.allclose(notebook[h], adapter.head_value_weights(0)[h])]
    assert len(wrong_heads) >= g.n_heads - 2  # only heads whose slice happens to land on a v block survive


def test_grouped_query_heads_share_their_kv_head():
    """D3: query heads of one group read the same value head; the sum counts the group factor."""
    model = build_tiny("llama")
    adapter = adapter_for(model)
    g = adapter.geometry
    assert (g.n_heads, g.n_kv_heads) == (8, 2)
    w = adapter.head_value_weights(0)
    v_proj = model.model.layers[0].self_attn.v_proj.weight.detach()
    for h in range(g.n_heads):
        kv = h // 4
        assert torch.equal(w[h], v_proj[kv * g.head_dim : (kv + 1) * g.head_dim])
    assert torch.allclose(w.pow(2).sum(), 4 * v_proj.pow(2).sum())


@pytest.mark.parametrize("name", ["gemma", "gemma2", "gemma3"])
def test_head_dim_comes_from_the_model_not_hidden_over_heads(name):
    """D4: Gemma's head_dim is not hidden/heads."""
    model = build_tiny(name)
    g = adapter_for(model).geometry
    assert g.head_dim == TINY_CONFIGS[name][1]["head_dim"] == 24
    assert g.head_dim != g.d_model // g.n_heads


def test_unsupported_architecture_names_itself_and_the_supported_ones():
    cfg = transformers.GPTJConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=32, rotary_dim=4)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(UnsupportedArchitectureError) as e:
        adapter_for(model)
    msg = str(e.value)
    assert "gptj" in msg
    for mt in supported_model_types():
        assert mt in msg


@pytest.mark.parametrize("alias", ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b", "minilm-l6"])
def test_value_vectors_of_offline_pretrained_models(offline_model, alias):
    loaded = offline_model(alias)
    ids = loaded.tokenizer("The capital of France is Paris, known for the Eiffel Tower.", return_tensors="pt")["input_ids"]
    errors = value_vector_errors(loaded.model, loaded.adapter, ids)
    assert max(errors) <= 1e-5, errors
