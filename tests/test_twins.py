"""Random twins built on the meta device and filled where each weight lives (models/twins.py):
transformers' own init decides constants and stds, the seed alone decides the values, whatever
the device map."""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from accelerate.utils import align_module_device
from tiny_models import TINY_CONFIGS

from sheafscope.models import twins
from sheafscope.models.catalog import find
from sheafscope.models.loading import model_class_for

# A reduced-depth, narrower copy of the llama-3.1-70b catalog config (its rope scaling, GQA and
# untied output layer kept).
SMALL_70B = dict(num_hidden_layers=3, hidden_size=256, intermediate_size=512, num_attention_heads=8,
                 num_key_value_heads=2, head_dim=32, vocab_size=4096)


def _twin(config, seed=0, device_map=None, offload_dir=None, dtype=torch.float32):
    model = twins.empty(config, model_class_for(config.model_type), dtype, None)
    return twins.materialize(model, seed, "cpu", device_map, offload_dir)


def _params(model) -> dict[str, torch.Tensor]:
    """Every parameter's values, read through accelerate's offload hooks where offloaded."""
    out = {}
    for name, module in model.named_modules():
        with align_module_device(module):
            for pname, p in module.named_parameters(recurse=False):
                out[f"{name}.{pname}" if name else pname] = p.detach().cpu().clone()
    return out


@pytest.mark.unit
@pytest.mark.parametrize("family", list(TINY_CONFIGS))
def test_twin_init_follows_transformers_own_init(family):
    """Against transformers' from_config: the same constants (norm gains, Gemma's zero gains,
    biases), buffers and ties, and each random weight at the std transformers draws it with."""
    cls_name, kwargs = TINY_CONFIGS[family]
    config = getattr(transformers, cls_name)(**kwargs)
    twin = _twin(config)
    torch.manual_seed(0)
    ref = model_class_for(config.model_type).from_config(config, dtype=torch.float32)
    ref_params = dict(ref.named_parameters())
    assert set(dict(twin.named_parameters())) == set(ref_params)
    for name, p in twin.named_parameters():
        r = ref_params[name]
        assert p.device.type == "cpu" and p.dtype == r.dtype
        if p.ndim == 1:
            assert torch.equal(p, r), name
        else:  # both random: compare the spread, and that the values are not transformers'
            assert p.std().item() == pytest.approx(r.std().item(), rel=0.15), name
            assert not torch.equal(p, r)
    ref_buffers = dict(ref.named_buffers())
    for name, b in twin.named_buffers():
        assert torch.equal(b, ref_buffers[name]), name
    out_emb, ref_out = twin.get_output_embeddings(), ref.get_output_embeddings()
    if ref_out is not None:
        tied = ref_out.weight is ref.get_input_embeddings().weight
        assert (out_emb.weight is twin.get_input_embeddings().weight) == tied


@pytest.mark.unit
def test_gpt2_residual_projections_take_transformers_scaled_std():
    # GPT-2 draws c_proj with initializer_range / sqrt(2 n_layer) (its _init_weights, set by the parent module)
    config = transformers.GPT2Config(n_layer=8, n_head=4, n_embd=128, vocab_size=256, n_positions=64)
    twin = _twin(config)
    block = twin.transformer.h[3]
    expected = 0.02 / math.sqrt(2 * 8)
    assert block.attn.c_proj.weight.std().item() == pytest.approx(expected, rel=0.05)
    assert block.mlp.c_proj.weight.std().item() == pytest.approx(expected, rel=0.05)
    assert block.attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.05)


@pytest.mark.unit
def test_hashed_values_are_uniform_with_the_asked_mean_and_std_and_depend_on_seed_and_name():
    a = twins.hashed_uniform_(torch.empty(1 << 20), twins.parameter_key(0, "w"), 0.5, 0.02)
    half_width = 0.02 * math.sqrt(3)
    assert a.mean().item() == pytest.approx(0.5, abs=1e-4) and a.std().item() == pytest.approx(0.02, rel=1e-2)
    assert a.min().item() >= 0.5 - half_width and a.max().item() <= 0.5 + half_width
    counts = torch.histc(a, bins=16, min=0.5 - half_width, max=0.5 + half_width)
    assert (counts / counts.mean() - 1).abs().max() < 0.02  # flat
    again = twins.hashed_uniform_(torch.empty(1 << 20), twins.parameter_key(0, "w"), 0.5, 0.02)
    assert torch.equal(a, again)
    for key in (twins.parameter_key(1, "w"), twins.parameter_key(0, "v")):
        other = twins.hashed_uniform_(torch.empty(1 << 20), key, 0.5, 0.02)
        assert torch.corrcoef(torch.stack([a, other]))[0, 1].abs() < 0.01
    # chunking does not change the values: element i depends on i alone
    short = twins.hashed_uniform_(torch.empty(1000), twins.parameter_key(0, "w"), 0.5, 0.02)
    assert torch.equal(short, a[:1000])


@pytest.mark.unit
def test_the_same_seed_gives_the_same_twin_under_any_device_map(tmp_path):
    config = find("llama-3.1-70b").build_config(**SMALL_70B)
    plain = _twin(config, seed=7)
    offloaded = _twin(config, seed=7, offload_dir=str(tmp_path), device_map={
        "model.embed_tokens": "disk", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
        "model.layers.2": "cpu", "model.norm": "disk", "lm_head": "disk"})
    sequential = _twin(config, seed=7, device_map={"model": "cpu", "lm_head": "cpu"})
    reference = _params(plain)
    for model in (offloaded, sequential):
        got = _params(model)
        assert set(got) == set(reference)
        for name, value in reference.items():
            assert torch.equal(got[name], value), name
    assert any(p.device.type == "meta" for p in offloaded.parameters())  # really offloaded
    assert len(list(tmp_path.iterdir())) == 1  # the twin's own folder inside the offload directory
    other_seed = _params(_twin(config, seed=8))
    assert not torch.equal(other_seed["model.layers.0.self_attn.v_proj.weight"],
                           reference["model.layers.0.self_attn.v_proj.weight"])
    # and the forward passes agree
    ids = torch.arange(1, 17)[None]
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, offloaded(ids).logits)


@pytest.mark.unit
def test_a_bfloat16_twin_is_the_float32_twin_rounded():
    config = find("llama-3.1-70b").build_config(**SMALL_70B)
    full, half = _params(_twin(config, seed=3)), _params(_twin(config, seed=3, dtype=torch.bfloat16))
    for name, value in full.items():
        assert torch.equal(half[name], value.to(torch.bfloat16)), name


@pytest.mark.unit
def test_weights_offloaded_to_disk_are_not_kept_in_memory(tmp_path, monkeypatch):
    import gc
    import weakref

    import accelerate.utils

    written, alive, real = [], [], accelerate.utils.offload_weight

    def spy(weight, name, folder, index=None):
        alive.append(sum(ref() is not None and ref() is not weight for ref in written))
        written.append(weakref.ref(weight))
        return real(weight, name, folder, index)

    monkeypatch.setattr(accelerate.utils, "offload_weight", spy)
    config = find("llama-3.1-70b").build_config(**SMALL_70B)
    twin = _twin(config, seed=1, device_map={"": "disk"}, offload_dir=str(tmp_path))
    gc.collect()
    assert len(written) == len(list(twin.parameters())) and all(p.device.type == "meta" for p in twin.parameters())
    assert all(ref() is None for ref in written)
    assert max(alive) <= 1  # while building: only the module's own other weight (a bias) is still held
    assert _params(twin)["lm_head.weight"].shape == (SMALL_70B["vocab_size"], SMALL_70B["hidden_size"])
