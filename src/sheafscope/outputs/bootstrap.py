"""Bootstrap intervals: one sample (:func:`bootstrap_ci`), and errors over models whose every
number is itself measured over prompts (:func:`nested_bootstrap`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np



def bootstrap_ci(
    samples: np.ndarray,
    statistic: Callable[[np.ndarray], float],
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Percentile bootstrap confidence interval.

    Resamples ``samples`` along axis 0 (e.g. prompts, with any trailing axes
    such as layers kept intact) with replacement, ``n_boot`` times, and
    evaluates ``statistic`` on each resample.

    Args:
        samples: array whose first axis indexes the independent units.
        statistic: maps an array shaped like ``samples`` to a number.
        n_boot: number of resamples.
        level: coverage of the interval, in (0, 1).
        seed: seed for ``np.random.default_rng``; equal seeds give equal results.

    Returns:
        ``(estimate, low, high)``: ``statistic(samples)`` and the
        ``(1-level)/2`` and ``(1+level)/2`` percentiles of the resampled
        statistic.  Resamples whose statistic is not finite are ignored; if none
        is finite the bounds are NaN.  With a single sample there is nothing to
        resample and ``(estimate, estimate, estimate)`` is returned.

    Raises:
        ValueError: on zero samples, a 0-d input, ``n_boot < 1`` or ``level``
            outside (0, 1).
    """
    data = np.asarray(samples)
    if data.ndim == 0:
        raise ValueError("bootstrap_ci: samples must be an array with the units along axis 0, got a scalar")
    n = data.shape[0]
    if n == 0:
        raise ValueError("bootstrap_ci: no samples to bootstrap (axis 0 has length 0)")
    if n_boot < 1:
        raise ValueError(f"bootstrap_ci: n_boot must be >= 1, got {n_boot}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"bootstrap_ci: level must be in (0, 1), got {level}")

    estimate = float(statistic(data))
    if n == 1:
        return estimate, estimate, estimate

    rng = np.random.default_rng(seed)
    # All indices drawn up front so the resamples depend only on the seed, not
    # on what the statistic does with the generator state.
    indices = rng.integers(0, n, size=(n_boot, n))
    boot = np.array([float(statistic(data[idx])) for idx in indices])
    boot = boot[np.isfinite(boot)]
    if boot.size == 0:
        return estimate, math.nan, math.nan
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(boot, [alpha, 1.0 - alpha])
    return estimate, float(low), float(high)


def _percentile(values: np.ndarray, level: float) -> list[float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return [math.nan, math.nan]
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(finite, [alpha, 1.0 - alpha])
    return [float(low), float(high)]


def _nanmean_rows(values: np.ndarray) -> np.ndarray:
    # Row means over the finite entries; a row with none is NaN (no warning: that is data, not a bug).
    finite = np.isfinite(values)
    counts = finite.sum(axis=1)
    sums = np.where(finite, values, 0.0).sum(axis=1)
    return np.divide(sums, counts, out=np.full(len(values), np.nan), where=counts > 0)


def nested_bootstrap(
    units: Sequence[Mapping[str, np.ndarray]],
    measure: Callable[[int, Mapping[str, np.ndarray]], Mapping[str, float | None]],
    errors_of: Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]],
    pairs: Sequence[tuple[str, str]] = (),
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Percentile intervals of mean errors over models, each model measured over its prompts.

    Args:
        units: one mapping per model of arrays whose axis 0 indexes that model's prompts.
        measure: ``measure(j, arrays)``, model j's quantities (e.g. ``{"lstar": 12.3}``, None
            where it has none) from its arrays, called on the full arrays and on every prompt
            resample (rows kept together).
        errors_of: per-model errors keyed by name, from the quantities of all models stacked
            (each an array over models); NaN where a model is not scored.
        pairs: ``(key, reference)`` pairs: also the paired difference ``key - reference`` per model.
        n_boot, level, seed: resamples, coverage in (0, 1), and the generator's seed.

    Returns:
        For every error key (and ``"key - reference"`` for each pair): ``estimate`` (mean over
        the ``n`` models with a finite error), ``n``, and three intervals: ``ci_models`` (those n
        models resampled with replacement, their errors fixed), ``ci_prompts`` (models fixed,
        each model's prompts resampled and everything downstream recomputed, refits included)
        and ``ci`` (both at once, the interval to quote). Intervals are NaN when n is 0.
    """
    if n_boot < 1:
        raise ValueError(f"nested_bootstrap: n_boot must be >= 1, got {n_boot}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"nested_bootstrap: level must be in (0, 1), got {level}")
    n_models = len(units)
    rng = np.random.default_rng(seed)

    def stacked(per_model: list[Mapping[str, float | None]]) -> dict[str, np.ndarray]:
        keys = per_model[0].keys() if per_model else ()
        return {k: np.array([_float(q.get(k)) for q in per_model]) for k in keys}

    def with_pairs(errors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {k: np.asarray(v, dtype=float) for k, v in errors.items()}
        for key, ref in pairs:
            out[f"{key} - {ref}"] = out[key] - out[ref]
        return out

    point = with_pairs(errors_of(stacked([measure(j, u) for j, u in enumerate(units)])))
    # All draws made up front so the intervals depend on the seed alone.
    prompt_idx = [rng.integers(0, _n_prompts(u), size=(n_boot, _n_prompts(u))) for u in units]
    model_u = rng.random((n_boot, n_models))
    boot = [
        with_pairs(errors_of(stacked([
            measure(j, {k: np.asarray(a)[prompt_idx[j][b]] for k, a in u.items()}) for j, u in enumerate(units)
        ])))
        for b in range(n_boot)
    ]

    out: dict[str, dict[str, Any]] = {}
    for key, errors in point.items():
        scored = np.flatnonzero(np.isfinite(errors))
        n = int(scored.size)
        if n == 0:
            nan2 = [math.nan, math.nan]
            out[key] = {"estimate": math.nan, "n": 0, "ci": nan2, "ci_models": nan2, "ci_prompts": nan2}
            continue
        # Models are redrawn among the scored ones only, so every resample has n models.
        pick = scored[np.minimum((model_u[:, :n] * n).astype(int), n - 1)]
        by_prompts = np.vstack([b[key][scored] for b in boot])
        both = np.vstack([b[key][pick[i]] for i, b in enumerate(boot)])
        out[key] = {
            "estimate": float(errors[scored].mean()),
            "n": n,
            "ci": _percentile(_nanmean_rows(both), level),
            "ci_models": _percentile(errors[pick].mean(axis=1), level),
            "ci_prompts": _percentile(_nanmean_rows(by_prompts), level),
        }
    return out


def _n_prompts(unit: Mapping[str, np.ndarray]) -> int:
    sizes = {len(np.asarray(a)) for a in unit.values()}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(f"nested_bootstrap: a model's arrays must share one non-zero prompt axis, got {sorted(sizes)}")
    return sizes.pop()


def _float(value: Any) -> float:
    return math.nan if value is None else float(value)
