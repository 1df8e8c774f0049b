"""The model's own value vectors, captured inside its forward pass, against the adapter's W_V.

Hooks capture (1) the hidden state entering the value projection, (2) the eager attention
matrices, (3) the heads' concatenated output entering the output projection. If W_V^h, its
bias and the KV head of every query head are right, then for every head
    context_h = A_h @ (x W_V^h^T + b_h).
A wrong slice, a wrong head order, a wrong GQA map or a wrong head_dim breaks this.
"""

from __future__ import annotations

import torch


def _first_tensor(args, kwargs):
    if args:
        return args[0]
    return next(v for v in kwargs.values() if isinstance(v, torch.Tensor))


@torch.no_grad()
def value_vector_errors(model, adapter, input_ids, weights=None) -> list[float]:
    """Max relative error per layer; `weights(layer)` overrides adapter.head_value_weights."""
    g = adapter.geometry
    xs, ctxs, hooks = {}, {}, []
    for layer in range(g.n_layers):
        hooks.append(adapter.value_input_module(layer).register_forward_pre_hook(
            lambda m, a, k, layer=layer: xs.__setitem__(layer, _first_tensor(a, k)), with_kwargs=True))
        hooks.append(adapter.output_module(layer).register_forward_pre_hook(
            lambda m, a, k, layer=layer: ctxs.__setitem__(layer, _first_tensor(a, k)), with_kwargs=True))
    before = model.config._attn_implementation
    if before != "eager":  # the explicit matrices
        model.set_attn_implementation("eager")
    try:
        out = model(input_ids=input_ids, output_attentions=True, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
        if before != "eager":
            model.set_attn_implementation(before)
    errors = []
    for layer in range(g.n_layers):
        x = xs[layer][0].double()  # (n, d_model)
        ctx = ctxs[layer][0].double().view(x.shape[0], g.n_heads, g.head_dim)
        a = out.attentions[layer][0].double()  # (heads, n, n)
        w = (weights(layer) if weights else adapter.head_value_weights(layer)).double()
        b = adapter.head_value_bias(layer)
        v = torch.einsum("nd,hkd->hnk", x, w)
        if b is not None:
            v = v + b.double()[:, None, :]
        expected = torch.einsum("hij,hjk->ihk", a, v)
        errors.append(float((expected - ctx).norm() / ctx.norm()))
    return errors
