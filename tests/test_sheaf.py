"""The closed forms of DESIGN.md section 1 against an explicitly built sheaf Laplacian (float64),
on a real layer of a pretrained model, and the D6 fact that sum(A) - n is rounding noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sheafscope import analyze
from sheafscope.sheaf import (
    explicit_sheaf_laplacian,
    kronecker_spectrum,
    notebook001_quantity,
    offdiag_mass,
    row_stats_from_lse,
    row_stats_from_scores,
    sheaf_trace,
)

PROMPT = "Paris is in France."
LAYER, HEAD = 7, 4


@pytest.fixture(scope="module")
def smollm2_layer(offline_model):
    loaded = offline_model("smollm2-135m")
    ids = loaded.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    before = loaded.model.config._attn_implementation
    loaded.model.set_attn_implementation("eager")  # the explicit matrices
    try:
        with torch.no_grad():
            out = loaded.model(input_ids=ids, output_attentions=True, use_cache=False)
    finally:
        loaded.model.set_attn_implementation(before)
    attn = out.attentions[LAYER][0, HEAD].double().numpy()
    wv = loaded.adapter.head_value_weights(LAYER)[HEAD].double().numpy()
    return loaded, attn, wv, out


def test_explicit_laplacian_trace_equals_closed_form_and_pipeline(smollm2_layer):
    loaded, attn, wv, _ = smollm2_layer
    n = attn.shape[0]
    assert 4 <= n <= 8  # small enough to build (n * d_model)^2 entries
    lf = explicit_sheaf_laplacian(attn, wv)
    explicit = np.trace(lf)
    closed = sheaf_trace(attn, wv)
    expected = (n - np.trace(attn)) * np.sum(wv**2)
    assert explicit == pytest.approx(closed, rel=1e-10)
    assert explicit == pytest.approx(expected, rel=1e-6)
    res = analyze(loaded, [PROMPT])
    assert res.prompts[0].trace[LAYER, HEAD] == pytest.approx(explicit, rel=1e-6)
    assert res.wv_norm_sq[LAYER, HEAD] == pytest.approx(np.sum(wv**2), rel=1e-9)


def test_explicit_laplacian_is_psd_and_symmetric(smollm2_layer):
    _, attn, wv, _ = smollm2_layer
    lf = explicit_sheaf_laplacian(attn, wv)
    assert np.allclose(lf, lf.T)
    assert np.linalg.eigvalsh(lf).min() > -1e-8 * np.abs(lf).max()


def test_kronecker_spectrum_equals_explicit_eigenvalues(smollm2_layer):
    _, attn, wv, _ = smollm2_layer
    explicit = np.linalg.eigvalsh(explicit_sheaf_laplacian(attn, wv))
    kron = kronecker_spectrum(attn, wv)
    assert explicit.shape == kron.shape
    np.testing.assert_allclose(kron, explicit, atol=1e-8 * explicit.max())


def test_attention_rows_sum_to_one(smollm2_layer, offline_model):
    _, _, _, out = smollm2_layer
    for a in out.attentions:
        np.testing.assert_allclose(a[0].double().sum(-1).numpy(), 1.0, atol=1e-5)
    bert = offline_model("minilm-l6")  # bidirectional: every row over all tokens
    ids = bert.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        for a in bert.model(input_ids=ids, output_attentions=True).attentions:
            np.testing.assert_allclose(a[0].double().sum(-1).numpy(), 1.0, atol=1e-5)
            assert (a[0, :, 0, -1] > 0).all()  # not causal


def test_notebook001_quantity_is_rounding_noise(smollm2_layer):
    """D6: sum(A) - n is zero up to rounding, so (sum(A) - n) * ||W||^2 measures noise; the
    off-diagonal mass is O(n). A trace built on the former must never come back."""
    _, _, _, out = smollm2_layer
    for a in out.attentions:
        a = a[0]
        n = a.shape[-1]
        noise = notebook001_quantity(a).abs()
        mass = offdiag_mass(a)
        assert (noise <= 1e-5 * n).all()
        assert (mass >= 0.05).all()
        assert (noise / mass).max() < 1e-4
    # In bfloat16 the "quantity" is a different noise altogether, the off-diagonal mass is not.
    a32 = out.attentions[LAYER][0]
    a16 = a32.to(torch.bfloat16)
    assert torch.allclose(offdiag_mass(a16), offdiag_mass(a32), rtol=2e-2)


def test_row_statistics_from_scores_and_from_lse_equal_the_explicit_matrix():
    """Both definitions of a row's statistics (exact from its scores, and -expm1(s_ii - lse_i)
    from its log-sum-exp) against the explicit softmax matrix, float64."""
    rng = np.random.default_rng(0)
    scores = torch.tensor(rng.normal(size=(3, 6, 6)) * 4)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    a = torch.softmax(scores, dim=-1)
    own = torch.arange(6).expand(3, 6)
    off, first = row_stats_from_scores(scores, own)
    np.testing.assert_allclose(off.sum(-1).numpy(), offdiag_mass(a).numpy(), rtol=1e-12)
    np.testing.assert_allclose(first.numpy(), a[..., 0].numpy(), rtol=1e-12)
    lse = torch.logsumexp(scores, dim=-1)
    off_lse, first_lse = row_stats_from_lse(scores.diagonal(dim1=-2, dim2=-1), scores[..., 0], lse)
    np.testing.assert_allclose(off_lse.sum(-1).numpy(), offdiag_mass(a).numpy(), rtol=1e-12)
    np.testing.assert_allclose(first_lse.numpy(), a[..., 0].numpy(), rtol=1e-12)


def test_row_statistics_from_scores_keep_precision_where_a_head_attends_to_itself():
    """D6 at the row level: where A_ii = 1 - 1e-12, 1 - A_ii comes out to full relative
    precision, not as the rounding noise of 1 - (something near 1)."""
    scores = torch.tensor([[0.0, -30.0, -float("inf")], [-40.0, 0.0, -float("inf")]], dtype=torch.float64)
    off, _ = row_stats_from_scores(scores, torch.tensor([0, 1]))
    want = torch.tensor([np.exp(-30.0) / (1 + np.exp(-30.0)), np.exp(-40.0) / (1 + np.exp(-40.0))], dtype=torch.float64)
    np.testing.assert_allclose(off.numpy(), want.numpy(), rtol=1e-12)


def test_offdiag_mass_in_float32_matches_float64_recomputation():
    """The pipeline's float32 masses against the same tiny model run in float64."""
    from tiny_models import build_tiny
    from sheafscope.analysis import target_of
    from sheafscope.capture import capture

    ids = torch.tensor([3, 9, 27, 81, 11, 33, 99, 5])
    m32 = build_tiny("mistral")
    m64 = build_tiny("mistral").double()
    c32 = capture(target_of(m32), [ids], "eager").prompts[0].offdiag_mass
    c64 = capture(target_of(m64), [ids], "eager").prompts[0].offdiag_mass
    np.testing.assert_allclose(c32, c64, rtol=1e-5)


def test_legacy_trace_full_pairs_the_head_averaged_attention_with_head_0s_norm():
    """D8: notebook 000's trace_full is the off-diagonal mass of the head-averaged attention
    matrix times the FIRST head's ||W_V||^2 only. Rebuilt from the model's own attention
    matrices (mean over heads, then the off-diagonal entries summed), with every head given a
    different norm, so that any other head, or a mean of the norms, fails."""
    from sheafscope.models.adapters import adapter_for
    from sheafscope.analysis import prompt_result, target_of
    from sheafscope.capture import capture
    from tiny_models import build_tiny

    model = build_tiny("llama")
    layers = adapter_for(model).geometry.n_layers
    ids = torch.randint(0, model.config.vocab_size, (1, 11), generator=torch.Generator().manual_seed(3))
    norm_sq = np.random.default_rng(0).uniform(1.0, 9.0, size=(layers, model.config.num_attention_heads))
    with torch.no_grad():
        attentions = model(ids, output_attentions=True).attentions
    got = prompt_result("", capture(target_of(model), [ids[0]], "eager").prompts[0], False, norm_sq).legacy_trace_full
    off_diagonal = ~torch.eye(ids.shape[1], dtype=torch.bool)
    want = [float(a[0].double().mean(dim=0)[off_diagonal].sum()) * norm_sq[layer, 0] for layer, a in enumerate(attentions)]
    np.testing.assert_allclose(got, want, rtol=1e-12)
