"""Errors a user can cause. Each message names the cause and the fix."""

from __future__ import annotations


class SheafscopeError(Exception):
    """Base class: a problem with the user's input or environment, reported without a traceback."""


class UnknownModelError(SheafscopeError):
    """The model spec is neither an alias, a catalog name, a path nor a hub id."""


class UnsupportedArchitectureError(SheafscopeError):
    """No adapter knows where this architecture keeps its value weights."""


class PromptError(SheafscopeError):
    """A prompt or prompts file that cannot be analysed (empty, too short, too long, missing)."""


class NonFiniteError(SheafscopeError):
    """The forward pass produced NaN or Inf (typically float16 overflow)."""


class ModelLoadError(SheafscopeError):
    """Weights could not be loaded (missing package, no network, bad file)."""


class ConfigError(SheafscopeError):
    """A bad option or suite file."""


class ResultsError(SheafscopeError):
    """A run directory whose results.json is missing, truncated or not sheafscope results."""


class OutputWriteError(SheafscopeError):
    """A result file could not be written (full disk, quota, permissions, read-only file system)."""
