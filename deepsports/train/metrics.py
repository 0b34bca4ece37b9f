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
