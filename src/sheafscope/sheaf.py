"""The mathematics (DESIGN.md section 1), as pure functions with no I/O.

For one head: nodes are the n tokens, the edge {i, j} carries w_ij = (A[i,j] + A[j,i]) / 2,
every node has stalk R^d_model, every edge R^d_head, and both restriction maps are R (the
head's value projection W_V^h, or another choice, see restriction.py). Then

    L_F = delta^T W delta = L_G (x) (R^T R),   Tr L_F = Tr L_G * ||R||_F^2 = (n - sum_i A[i,i]) ||R||_F^2.

Shapes are written in the names: `attn` is (..., n, n) row-stochastic, `diag` is (..., n).
"""

from __future__ import annotations

import numpy as np
import torch


def offdiag_mass(attn: torch.Tensor) -> torch.Tensor:
    """sum_{i != j} A[i, j] over the last two axes, in float64: (..., n, n) -> (...).

    Summed from the off-diagonal entries themselves (all >= 0), never as sum(A) - n or
    n - sum(diag): those subtract numbers close to n and leave rounding noise (D6).
    """
    a = attn.double()
    n = a.shape[-1]
    eye = torch.eye(n, dtype=torch.bool, device=a.device)
    return a.masked_fill(eye, 0.0).sum(dim=(-1, -2))


def row_stats_from_scores(scores: torch.Tensor, own: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The statistics of softmax rows, exactly: scores (..., kv) as the softmax sees them (masked
    keys at -inf), own (...,) the column of each row's own token.

    Returns (1 - A[i,i], A[i,0]). The off-diagonal mass is summed from the off-diagonal
    entries (all >= 0), so it keeps full precision where A[i,i] is close to 1 (D6).
    """
    e = (scores - scores.amax(dim=-1, keepdim=True)).exp_()
    total = e.sum(dim=-1)
    first = e[..., 0] / total
    # in place: e is ours, and a copy of it would double this function's memory traffic
    return e.scatter_(-1, own[..., None], 0.0).sum(dim=-1) / total, first


def row_stats_from_lse(own_score: torch.Tensor, first_score: torch.Tensor,
                       lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same statistics from a row's log-sum-exp, without the row: (1 - A[i,i], A[i,0]) =
    (-expm1(s_ii - lse_i), exp(s_i0 - lse_i)).

    The rounding of lse_i is absolute, so 1 - A[i,i] from it is trustworthy only where it is
    not small: `LSE_TRUSTED_FROM` is the smallest value a caller may keep without recomputing
    the row exactly.
    """
    return -torch.expm1((own_score - lse).clamp(max=0.0)), torch.exp(first_score - lse)


LSE_TRUSTED_FROM = 0.5


def notebook001_quantity(attn: torch.Tensor) -> torch.Tensor:
    """(sum A - n) as notebook 001 computes it: rows sum to 1, so this is rounding noise (D6).

    Kept only so that tests can show it is noise; never used for results.
    """
    n = attn.shape[-1]
    return attn.sum(dim=(-1, -2)) - n


def graph_laplacian(attn: np.ndarray) -> np.ndarray:
    """Weighted graph Laplacian of the symmetrised attention graph: (n, n) -> (n, n)."""
    w = (attn + attn.T) / 2.0
    np.fill_diagonal(w, 0.0)
    return np.diag(w.sum(axis=1)) - w


def coboundary(n: int, restriction: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """The coboundary delta: C^0 = (R^d_model)^n -> C^1 = (R^d_head)^edges, for the complete graph.

    (delta x)_e = R (x_j - x_i) for the edge e = (i, j), i < j. Returns delta of shape
    (E * d_head, n * d_model) and the edge list.
    """
    d_head, d_model = restriction.shape
    edges = [(i, j) for i in range(n) for j in range(i + 1, n)]
    delta = np.zeros((len(edges) * d_head, n * d_model))
    for e, (i, j) in enumerate(edges):
        rows = slice(e * d_head, (e + 1) * d_head)
        delta[rows, j * d_model : (j + 1) * d_model] = restriction
        delta[rows, i * d_model : (i + 1) * d_model] = -restriction
    return delta, edges


def explicit_sheaf_laplacian(attn: np.ndarray, restriction: np.ndarray) -> np.ndarray:
    """L_F = delta^T W delta built entry by entry (for checking the closed forms on small n)."""
    n = attn.shape[0]
    d_head = restriction.shape[0]
    delta, edges = coboundary(n, restriction)
    weights = np.array([(attn[i, j] + attn[j, i]) / 2.0 for i, j in edges])
    w = np.repeat(weights, d_head)
    return delta.T @ (w[:, None] * delta)


def sheaf_trace(attn: np.ndarray, restriction: np.ndarray) -> float:
    """Closed form Tr L_F = (sum_{i != j} A[i, j]) * ||R||_F^2."""
    off = attn.sum() - np.trace(attn)
    return float(off * np.sum(restriction.astype(np.float64) ** 2))


def kronecker_spectrum(attn: np.ndarray, restriction: np.ndarray) -> np.ndarray:
    """Eigenvalues of L_F = L_G (x) R^T R from those of L_G and the squared singular values of R.

    R^T R (d_model x d_model) has the d_head squared singular values of R and d_model - d_head
    zeros. Returns all n * d_model eigenvalues, sorted ascending.
    """
    lg = np.linalg.eigvalsh(graph_laplacian(attn.astype(np.float64)))
    sv2 = np.linalg.svd(restriction.astype(np.float64), compute_uv=False) ** 2
    d_model = restriction.shape[1]
    rtr = np.concatenate([sv2, np.zeros(d_model - len(sv2))])
    return np.sort(np.outer(lg, rtr).ravel())
