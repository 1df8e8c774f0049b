"""Shared fixtures. Offline models load once per session (the first load dequantizes a GGUF
into the cache, ~/.cache/sheafscope unless $SHEAFSCOPE_CACHE says otherwise; later loads read
plain safetensors)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

_LOADED: dict[str, object] = {}


@pytest.fixture(scope="session")
def offline_model():
    """offline_model(alias) -> LoadedModel, float32, cached for the session."""
    from sheafscope import load_model

    def get(alias: str):
        if alias not in _LOADED:
            _LOADED[alias] = load_model(alias, device="cpu", dtype="float32")
        return _LOADED[alias]

    return get


def pytest_collection_modifyitems(items):
    """Tests in files that mix kinds are told apart by what they load: a real offline model
    makes a test an integration test, tiny in-memory twins a unit test."""
    kinds = {"unit", "integration", "gpu"}
    for item in items:
        if not kinds & {m.name for m in item.iter_markers()}:
            offline = "offline_model" in getattr(item, "fixturenames", ())
            item.add_marker(pytest.mark.integration if offline else pytest.mark.unit)
