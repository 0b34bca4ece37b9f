"""Evaluation metrics on the final score (Spearman, relative L2, MSE) and the difficulty (MAE).

Definitions follow the AQA literature so figures are comparable with published tables:

* ``spearman``: ``scipy.stats.spearmanr`` (ties get averaged ranks; the original's own formula
  on argsort ranks did not average ties).
* ``rel_l2`` (R-l2): ``100 * mean(((pred - true) / (true.max() - true.min()))**2)``. CoRe
  (``yuxumin/CoRe`` ``tools/runner.py``, also used by TPT) divides by the max minus the min of the
  *true scores of the evaluated set*, not by a fixed score range; papers print the value x100, so we
  store it x100 too. Pass ``score_range`` to use a fixed range instead (e.g. the whole dataset's).
* ``mse``: mean squared error of the final score in points^2 (CoRe's "L2").
* ``difficulty_mae``: mean absolute error of the predicted difficulty.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
from scipy import stats

from deepsports.errors import TrainingError


def _as_vector(name: str, values: Any) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor, possibly on an accelerator
        values = values.detach().float().cpu().numpy()
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(array)):
        bad = int(np.sum(~np.isfinite(array)))
        raise TrainingError(f"{name} holds {bad} non-finite value(s) out of {array.size}; metrics need finite numbers")
    return array


def spearman(pred: Any, true: Any) -> float:
    """Spearman rank correlation with averaged ties.

    Returns 0.0 (not NaN) when either side is constant or has fewer than two values: the
    correlation is undefined there, and 0 ("no ranking information") keeps "best epoch" choices
    and Optuna objectives well defined; a model that predicts one value for every clip is no
    better than chance at ranking them.
    """
    pred, true = _as_vector("pred", pred), _as_vector("true", true)
    if pred.shape != true.shape:
        raise ValueError(f"spearman: pred has {pred.size} values but true has {true.size}")
    if pred.size < 2 or np.ptp(pred) == 0 or np.ptp(true) == 0:
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        rho = float(stats.spearmanr(pred, true).statistic)
    return 0.0 if math.isnan(rho) else rho


def relative_l2(pred: Any, true: Any, score_range: float | None = None) -> float:
    """R-l2 x 100 (see the module docstring); NaN when the true scores have no spread and no range is given."""
    pred, true = _as_vector("pred", pred), _as_vector("true", true)
    if pred.shape != true.shape:
        raise ValueError(f"relative_l2: pred has {pred.size} values but true has {true.size}")
    if pred.size == 0:
        return math.nan
    span = float(score_range) if score_range is not None else float(true.max() - true.min())
    if span <= 0:
        return math.nan
    return float(100.0 * np.mean(((pred - true) / span) ** 2))


def regression_metrics(pred_final: Any, true_final: Any, pred_difficulty: Any, true_difficulty: Any,
                       score_range: float | None = None) -> dict[str, float]:
    """Metrics of one evaluation pass. Inputs are ``(N,)`` arrays/tensors/lists of the N clips.

    Returns ``{"spearman", "rel_l2", "mse", "difficulty_mae"}`` as Python floats.
    """
    pred_final, true_final = _as_vector("pred_final", pred_final), _as_vector("true_final", true_final)
    pred_difficulty = _as_vector("pred_difficulty", pred_difficulty)
    true_difficulty = _as_vector("true_difficulty", true_difficulty)
    sizes = {pred_final.size, true_final.size, pred_difficulty.size, true_difficulty.size}
    if len(sizes) != 1:
        raise ValueError(f"regression_metrics: inputs differ in length ({pred_final.size}, {true_final.size}, "
                         f"{pred_difficulty.size}, {true_difficulty.size})")
    if pred_final.size == 0:
        raise ValueError("regression_metrics: no predictions to evaluate")
    return {
        "spearman": spearman(pred_final, true_final),
        "rel_l2": relative_l2(pred_final, true_final, score_range),
        "mse": float(np.mean((pred_final - true_final) ** 2)),
        "difficulty_mae": float(np.mean(np.abs(pred_difficulty - true_difficulty))),
    }


# --- The literature's "with DD" protocol and bootstrap intervals ------------------------------

def score_with_true_difficulty(pred_execution: Any, true_difficulty: Any) -> np.ndarray:
    """Final score under the literature's "w/ DD" protocol: predicted execution x *ground-truth* DD.

    CoRe, TPT and MUSDL multiply their predicted execution (final / DD) by the true difficulty at test
    time; DeepSports' own ``spearman`` uses its predicted difficulty, a harder task.
    """
    pred_execution = _as_vector("pred_execution", pred_execution)
    true_difficulty = _as_vector("true_difficulty", true_difficulty)
    if pred_execution.shape != true_difficulty.shape:
        raise ValueError(f"score_with_true_difficulty: {pred_execution.size} executions but "
                         f"{true_difficulty.size} difficulties")
    return pred_execution * true_difficulty


def spearman_rows(pred: np.ndarray, true: np.ndarray, axis: int = -1) -> np.ndarray:
    """:func:`spearman` of every row along ``axis`` at once (averaged ties; 0 where a row is constant).

    The vectorised form lets :func:`bootstrap_interval` score thousands of resamples in one call.
    """
    pred_rank = stats.rankdata(np.moveaxis(np.asarray(pred, dtype=np.float64), axis, -1), axis=-1)
    true_rank = stats.rankdata(np.moveaxis(np.asarray(true, dtype=np.float64), axis, -1), axis=-1)
    pred_rank -= pred_rank.mean(axis=-1, keepdims=True)
    true_rank -= true_rank.mean(axis=-1, keepdims=True)
    denom = np.sqrt((pred_rank ** 2).sum(axis=-1) * (true_rank ** 2).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (pred_rank * true_rank).sum(axis=-1) / denom
    return np.where(denom > 0, rho, 0.0)


def rel_l2_rows(pred: np.ndarray, true: np.ndarray, axis: int = -1) -> np.ndarray:
    """:func:`relative_l2` (x100, range of each row's true scores) of every row along ``axis``; NaN for no spread."""
    pred = np.moveaxis(np.asarray(pred, dtype=np.float64), axis, -1)
    true = np.moveaxis(np.asarray(true, dtype=np.float64), axis, -1)
    span = np.ptp(true, axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        value = 100.0 * np.mean(((pred - true) / span) ** 2, axis=-1)
    return np.where(span[..., 0] > 0, value, math.nan)


#: Bootstrap settings of every logged interval (stated in the run's tags and docs/model-quality.md).
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_CONFIDENCE = 0.95
BOOTSTRAP_SEED = 0
BOOTSTRAP_METHOD = "BCa"


def bootstrap_interval(statistic, pred: Any, true: Any, *, n_resamples: int = BOOTSTRAP_RESAMPLES,
                       confidence: float = BOOTSTRAP_CONFIDENCE, seed: int = BOOTSTRAP_SEED,
                       method: str = BOOTSTRAP_METHOD) -> tuple[float, float]:
    """Bootstrap ``confidence`` interval of ``statistic(pred, true, axis)`` resampling clips (pairs).

    ``statistic`` is vectorised like :func:`spearman_rows`. ``scipy.stats.bootstrap`` with the
    bias-corrected and accelerated (BCa) interval by default, whose coverage is closer to nominal
    than the percentile interval for a skewed statistic such as a Spearman near 1. Seeded, so the
    same predictions give the same interval. NaN bounds where the interval is undefined (fewer than
    3 clips, or every resample gives the same value).
    """
    pred, true = _as_vector("pred", pred), _as_vector("true", true)
    if pred.shape != true.shape:
        raise ValueError(f"bootstrap_interval: pred has {pred.size} values but true has {true.size}")
    if pred.size < 3:
        return math.nan, math.nan
    with warnings.catch_warnings():
        # Degenerate resamples (all equal) make BCa undefined: scipy warns and returns NaN bounds.
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        result = stats.bootstrap((pred, true), statistic, paired=True, vectorized=True, n_resamples=n_resamples,
                                 confidence_level=confidence, method=method, batch=250,
                                 rng=np.random.default_rng(seed))
    low, high = result.confidence_interval
    return float(low), float(high)
