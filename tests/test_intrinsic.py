"""The intrinsic-dimension profile: scikit-dimension's TwoNN through our function on data of known
dimension; the pooled hidden states of both capture paths against the model's own
`output_hidden_states`; no estimate from too few prompts; and a run merged from units giving the
same profile as `analyze` on the same prompts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from sheafscope import analyze, load_model
from sheafscope.analysis import target_of
from sheafscope.capture import capture
from sheafscope.measures import intrinsic
from sheafscope.measures.intrinsic import id_profile, twonn
from sheafscope.runner import ModelEntry, RunOptions, run
from sheafscope import units
from tiny_models import TINY_CONFIGS, build_tiny

RTOL = 1e-5
P = 500


def _rotated(x: np.ndarray, d: int, rng: np.random.Generator) -> np.ndarray:
    # an orthonormal embedding into R^d: distances, and so the dimension, are unchanged
    q, _ = np.linalg.qr(rng.standard_normal((d, x.shape[1])))
    return (x @ q.T).astype(np.float32)


def _subspace(k: int, rng: np.random.Generator, d: int = 64) -> np.ndarray:
    return _rotated(rng.standard_normal((P, k)), d, rng)


def _sphere(rng: np.random.Generator, d: int = 64) -> np.ndarray:
    x = rng.standard_normal((P, 3))
    return _rotated(x / np.linalg.norm(x, axis=1, keepdims=True), d, rng)


@pytest.mark.unit
def test_twonn_finds_known_dimensions():
    rng = np.random.default_rng(0)
    assert twonn(_subspace(5, rng)) == pytest.approx(5, rel=0.15)
    assert twonn(_sphere(rng)) == pytest.approx(2, rel=0.15)


@pytest.mark.unit
def test_profile_per_stream_and_peak_layer():
    """Streams of dimension 2, 3, 5, 2: the peak is stream 2, the output of layer 1 (0-based)."""
    rng = np.random.default_rng(1)
    streams = [_sphere(rng), _subspace(3, rng), _subspace(5, rng), _subspace(2, rng)]
    out = id_profile(np.stack(streams, axis=1))
    assert out["per_stream"] == pytest.approx([2, 3, 5, 2], rel=0.15)
    assert out["peak_layer"] == 1
    assert out["n_points"] == P and out["estimator"] == "skdim TwoNN" and out["why_none"] is None
    json.dumps(out)  # plain JSON values


@pytest.mark.unit
def test_too_few_prompts_give_no_dimension_and_say_why():
    rng = np.random.default_rng(2)
    out = id_profile(rng.standard_normal((intrinsic.MIN_POINTS - 1, 3, 16)).astype(np.float32))
    assert out["per_stream"] == [None, None, None] and out["peak_layer"] is None
    assert out["n_points"] == intrinsic.MIN_POINTS - 1
    assert f"at least {intrinsic.MIN_POINTS}" in out["why_none"]
    enough = id_profile(rng.standard_normal((intrinsic.MIN_POINTS, 3, 16)).astype(np.float32))
    assert enough["why_none"] is None and enough["peak_layer"] is not None


def _reference_pooled(model, prompts: list[torch.Tensor]) -> list[np.ndarray]:
    """Each prompt alone through the model's own forward pass: every hidden state's mean over
    positions 1..n-1, float32, (layers + 1, d)."""
    out = []
    with torch.no_grad():
        for p in prompts:
            hs = model.base_model(input_ids=p[None], output_hidden_states=True).hidden_states
            means = [h[0, 1:].float().mean(dim=0) for h in hs]
            # OPT's projected last stream is narrower: zero columns keep every distance
            width = max(m.shape[-1] for m in means)
            out.append(torch.stack([torch.cat([m, m.new_zeros(width - m.shape[-1])]) for m in means]).numpy())
    return out


@pytest.mark.unit
@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("path", ["fast", "eager"])
def test_pooled_streams_equal_output_hidden_states(name, path):
    """Three prompts of different lengths in one right-padded batch: padding never reaches a
    prompt's pooled streams, and position 0 is left out."""
    model = build_tiny(name)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 128, (n,), generator=g) for n in (12, 5, 9)]
    want = _reference_pooled(model, prompts)
    got = capture(target_of(model), prompts, path).prompts
    for cap, ref in zip(got, want):
        assert cap.pooled.dtype == np.float32 and cap.pooled.shape == ref.shape
        err = np.max(np.abs(cap.pooled - ref)) / np.max(np.abs(ref))
        assert err <= RTOL, (name, path, err)


# --------------------------------------------------------------------------- runs and units

WORDS = ("the a cat dog bird sees finds likes red blue small old house tree river city near over "
         "under quickly slowly sings runs sleeps green tall").split()
N_PROMPTS = units.SHARD_PROMPTS + 8  # two shards


def _prompts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    out: list[str] = []
    while len(out) < n:
        text = " ".join(rng.choice(WORDS, size=int(rng.integers(4, 9))))
        if text not in out:
            out.append(text)
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny llama saved to a local directory with a word-level tokenizer (no hub, no weights)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>")
    cls_name, kwargs = TINY_CONFIGS["llama"]
    config = getattr(transformers, cls_name)(**{**kwargs, "vocab_size": len(vocab)})
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny-llama"
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.mark.integration
def test_few_prompts_analysis_says_why(checkpoint):
    loaded = load_model(str(checkpoint), device="cpu", dtype="float32")
    res = analyze(loaded, _prompts(5))
    block = res.to_dict()["intrinsic_dimension"]
    assert block["peak_layer"] is None and block["n_points"] == 5
    assert "TwoNN needs at least" in block["why_none"]


@pytest.mark.integration
def test_run_merged_from_units_equals_analyze(checkpoint, tmp_path, monkeypatch):
    """Two shards written as units (pooled streams in .npz beside each record), merged into one
    model: the same ID profile as analyze over all the prompts at once; the units are gone."""
    import sheafscope.outputs.figures as figures
    import sheafscope.outputs.report as report

    monkeypatch.setattr(figures, "write_all_figures", lambda out_dir: [])
    monkeypatch.setattr(report, "write_report", lambda out_dir: Path(out_dir) / "report.html")
    prompts = _prompts(N_PROMPTS)
    seen: list[Path] = []
    real_merge = units.merge

    def merge_and_look(us, ps):
        seen.extend(units.pooled_path(u) for u in us if units.pooled_path(u).is_file())
        return real_merge(us, ps)

    monkeypatch.setattr("sheafscope.runner.merge", merge_and_look)
    out = tmp_path / "out"
    outcome = run([ModelEntry(str(checkpoint))], prompts, RunOptions(dtype="float32", device="cpu"), out,
                  show_progress=False)
    merged = outcome.models[0]
    assert merged["status"] == "ok" and len(merged["units"]) == 2
    assert len(seen) == 2  # each unit's pooled streams were there at the merge
    assert not (out / "units").exists() or not any((out / "units").rglob("*"))
    loaded = load_model(str(checkpoint), device="cpu", dtype="float32")
    want = analyze(loaded, prompts).info["intrinsic_dimension"]
    got = merged["intrinsic_dimension"]
    assert got["n_points"] == want["n_points"] == N_PROMPTS and got["why_none"] is None
    assert got["per_stream"] == pytest.approx(want["per_stream"], rel=1e-4)
    assert got["peak_layer"] == want["peak_layer"] is not None
    results = json.loads((out / "results.json").read_text())
    assert results["models"][0]["intrinsic_dimension"] == got
    assert "intrinsic_dimension" in results["definitions"]


@pytest.mark.unit
def test_zero_padded_streams_keep_the_dimension():
    """A narrower stream is zero-padded to the widest (OPT's projected last stream): the same
    distances, so the same TwoNN estimate."""
    x = _subspace(4, np.random.default_rng(3), d=16)
    assert twonn(np.pad(x, ((0, 0), (0, 48)))) == pytest.approx(twonn(x), rel=1e-9)
