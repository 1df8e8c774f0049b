"""bitsandbytes quantization for --quantize: where it may apply, the from_pretrained arguments
that ask for it, and the check that it really replaced the linear layers."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from sheafscope.errors import ConfigError, ModelLoadError

if TYPE_CHECKING:
    import torch

    from sheafscope.models.loading import LoadedModel

QUANTIZE = ("4bit", "8bit")


def quantization_kwargs(quantize: str | None, dtype: torch.dtype) -> dict:
    if quantize is None:
        return {}
    from transformers import BitsAndBytesConfig

    if quantize == "4bit":
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    else:
        q = BitsAndBytesConfig(load_in_8bit=True)
    return {"quantization_config": q, "device_map": "auto"}


_NOT_QUANTIZABLE = {
    "random-init": "a random-init twin is built from a config, not loaded from a checkpoint; quantizing random weights "
                   "measures nothing. Drop --quantize, or quantize a trained checkpoint (a hub id or a local directory)",
    "offline-package": "the offline models are GGUF files, already quantized (Q4) and dequantized by transformers at load; "
                       "bitsandbytes cannot apply to them. Drop --quantize (the alias is measured from its GGUF weights), "
                       "or pass a hub id or a local transformers directory",
    "gguf-file": "a GGUF file is already quantized and is dequantized by transformers at load; bitsandbytes cannot "
                 "apply to it. Drop --quantize, or pass a hub id or a local transformers directory",
}


def check_quantize(spec: str, kind: str, quantize: str | None) -> None:
    """--quantize applies to hub and local-directory checkpoints, or is refused here, before loading."""
    if quantize is None:
        return
    if quantize not in QUANTIZE:
        raise ConfigError(f"--quantize must be 4bit or 8bit, not '{quantize}'")
    if kind in _NOT_QUANTIZABLE:
        raise ConfigError(f"--quantize {quantize} does not apply to '{spec}' ({kind}): {_NOT_QUANTIZABLE[kind]}")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(f"--quantize {quantize} needs the bitsandbytes package: pip install bitsandbytes") from None


def verify_quantized(loaded: "LoadedModel", quantize: str) -> str:
    """That bitsandbytes really replaced the linear layers; the note that says so."""
    import bitsandbytes as bnb

    cls = bnb.nn.Linear4bit if quantize == "4bit" else bnb.nn.Linear8bitLt
    n = sum(isinstance(m, cls) for m in loaded.model.modules())
    if n == 0:
        raise ModelLoadError(
            f"--quantize {quantize} did not apply to '{loaded.spec}': the loaded model has no bitsandbytes "
            f"{cls.__name__} layer (transformers or bitsandbytes skipped the quantization). Load it without --quantize"
        )
    if isinstance(loaded.adapter.value_input_module(0), cls):
        return f"bitsandbytes {quantize}: {n} linear layers quantized; value weights dequantized for ||W_V||"
    return f"bitsandbytes {quantize}: {n} linear layers quantized, not the value projections (read as stored)"


class _OncePerMessage(logging.Filter):
    """bitsandbytes' 8-bit matmul warns about the float16 cast on every call of every layer."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if msg in self.seen:
            return False
        self.seen.add(msg)
        return True


_BNB_FILTER = _OncePerMessage()


def quiet_bitsandbytes() -> None:
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if _BNB_FILTER not in logger.filters:
        logger.addFilter(_BNB_FILTER)
