"""Restriction maps: which linear map of a head stands on both ends of an edge.

||W_V^h||_F is not a property of the function the model computes (scale W_V by c and W_O by
1/c: nothing else changes), so the choice is the user's and every result records it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from sheafscope.errors import ConfigError, SheafscopeError

# The CLI lists these maps in its --help: importing them must not import torch.
if TYPE_CHECKING:
    import torch

    from sheafscope.models.adapters import Adapter


@dataclass(frozen=True)
class RestrictionMap:
    name: str
    definition: str
    norm_sq: Callable[[Adapter, int], torch.Tensor]  # (adapter, layer) -> (n_heads,) float64


def _fold(adapter: Adapter, layer: int, wv: torch.Tensor) -> torch.Tensor:
    gain = adapter.norm_gain(layer)
    # Post-norm layers (BERT, OPT-350m) have no gain before attention: nothing to fold.
    return wv if gain is None else wv * gain.to(wv.device)[None, None, :]


def _frob_sq(w: torch.Tensor) -> torch.Tensor:
    return w.double().pow(2).sum(dim=(-1, -2))


def _ov_frob_sq(wo: torch.Tensor, wv: torch.Tensor) -> torch.Tensor:
    # ||W_O W_V||_F^2 = <W_O^T W_O, W_V W_V^T>: two d_head x d_head Gram matrices, never d_model^2.
    wo, wv = wo.double(), wv.double()
    go = wo.transpose(-1, -2) @ wo
    gv = wv @ wv.transpose(-1, -2)
    return (go * gv).sum(dim=(-1, -2))


def _raw(adapter: Adapter, layer: int) -> torch.Tensor:
    return _frob_sq(adapter.head_value_weights(layer))


def _raw_norm(adapter: Adapter, layer: int) -> torch.Tensor:
    return _frob_sq(_fold(adapter, layer, adapter.head_value_weights(layer)))


def _ov(adapter: Adapter, layer: int) -> torch.Tensor:
    wv = adapter.head_value_weights(layer)
    return _ov_frob_sq(adapter.output_weight(layer).to(wv.device), wv)


def _ov_norm(adapter: Adapter, layer: int) -> torch.Tensor:
    wv = _fold(adapter, layer, adapter.head_value_weights(layer))
    return _ov_frob_sq(adapter.output_weight(layer).to(wv.device), wv)


RESTRICTION_MAPS: dict[str, RestrictionMap] = {
    m.name: m
    for m in [
        RestrictionMap("raw_wv", "R_h = W_V^h (d_head x d_model), the head's value projection (the notebooks')", _raw),
        RestrictionMap("raw_wv_norm", "R_h = W_V^h diag(g), g the gain of the norm before attention (post-norm: none)", _raw_norm),
        RestrictionMap("ov", "R_h = W_O^h W_V^h (d_model x d_model), the OV circuit: invariant to W_V -> cW_V, W_O -> W_O/c", _ov),
        RestrictionMap("ov_norm", "R_h = W_O^h W_V^h diag(g), OV circuit with the pre-attention norm gain folded in", _ov_norm),
    ]
}


def get_restriction_map(name: str) -> RestrictionMap:
    try:
        return RESTRICTION_MAPS[name]
    except KeyError:
        raise ConfigError(
            f"unknown restriction map '{name}'; choose one of {', '.join(RESTRICTION_MAPS)}"
        ) from None


def norms_sq(adapter: Adapter, name: str = "raw_wv") -> torch.Tensor:
    """||R_h||_F^2 for every layer and head: (n_layers, n_heads), float64. Once per model.
    Weights offloaded by accelerate are read through its hooks, a layer at a time."""
    import torch

    rmap = get_restriction_map(name)
    out = []
    with torch.no_grad():
        for layer in range(adapter.geometry.n_layers):
            with adapter.onloaded(layer):
                norm_sq = rmap.norm_sq(adapter, layer)
            if norm_sq.is_meta:
                raise SheafscopeError(f"layer {layer}'s weights are on the meta device without an accelerate offload "
                                      "hook to load them: load the model with load_model(device_map=...), or "
                                      "dispatch it with accelerate before wrapping it")
            out.append(norm_sq.cpu())
    return torch.stack(out)
