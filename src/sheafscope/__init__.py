"""sheafscope: the sheaf Laplacian of transformer attention, layer by layer.

Quick start::

    import sheafscope as ss
    model = ss.load_model("smollm2-135m")
    result = ss.analyze(model, ["The capital of France is Paris."])
    df = result.to_dataframe()          # one row per prompt x layer x head
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load_model", "from_model", "analyze", "LoadedModel", "ModelResult"]

_LAZY = {
    "load_model": "sheafscope.models.loading",
    "from_model": "sheafscope.models.loading",
    "LoadedModel": "sheafscope.models.loading",
    "analyze": "sheafscope.analysis",
    "ModelResult": "sheafscope.analysis",
}


def __getattr__(name: str):
    # Lazy so that `sheafscope --help` and light modules do not pay for importing torch.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)
