"""Model specs: classification, the hub path's arguments, offline weights' integrity."""

from __future__ import annotations

import pytest
import torch
import transformers

from sheafscope import load_model, offline
from sheafscope.errors import ConfigError, UnknownModelError
from sheafscope.loading import classify_spec
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
