"""Figures and tables logged as MLflow artifacts: loss/Spearman curves, predicted-vs-true scatter, predictions CSV.

The curves replace the original's ``losses.png`` (its ``output`` argument), which now goes to the
run's artifacts instead of the working directory. Matplotlib runs on the Agg backend (no display).
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: cluster nodes and CI have no display
import matplotlib.pyplot as plt  # noqa: E402

PREDICTION_COLUMNS = ("video", "clip", "true_score", "pred_score", "true_difficulty", "pred_difficulty")


def _column(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for index, row in enumerate(history, start=1):
        value = row.get(key)
        if value is not None and math.isfinite(float(value)):
            xs.append(float(row.get("epoch", index)))
            ys.append(float(value))
    return xs, ys


def plot_curves(history: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Train/val loss (left) and val Spearman (right) per epoch.

    ``history`` is one dict per epoch with ``epoch``, ``train_loss``, ``val_loss`` and ``val_spearman``
    (missing or non-finite values are left out of the lines). Writes a PNG to ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax_loss, ax_rho) = plt.subplots(1, 2, figsize=(10, 4))
    try:
        for key, label in (("train_loss", "train loss"), ("val_loss", "val loss")):
            xs, ys = _column(history, key)
            ax_loss.plot(xs, ys, marker="o", label=label)
        ax_loss.set_xlabel("epoch")
        ax_loss.set_ylabel("loss")
        ax_loss.legend()
        ax_loss.grid(alpha=0.3)
        xs, ys = _column(history, "val_spearman")
        ax_rho.plot(xs, ys, marker="o", color="tab:green", label="val Spearman")
        ax_rho.set_xlabel("epoch")
        ax_rho.set_ylabel("Spearman")
        ax_rho.set_ylim(-1.05, 1.05)
        ax_rho.legend()
        ax_rho.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)  # figures are global state in pyplot; a long study would leak them
    return path


def plot_scatter(true: Iterable[float], pred: Iterable[float], path: str | os.PathLike, title: str = "") -> Path:
    """Predicted vs true final score with the identity line; writes a PNG to ``path``."""
    true, pred = [float(v) for v in true], [float(v) for v in pred]
    if len(true) != len(pred):
        raise ValueError(f"plot_scatter: {len(true)} true scores but {len(pred)} predictions")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 5))
    try:
        ax.scatter(true, pred, s=12, alpha=0.7)
        finite = [v for v in true + pred if math.isfinite(v)]
        if finite:
            low, high = min(finite), max(finite)
            ax.plot([low, high], [low, high], color="grey", linestyle="--", linewidth=1, label="pred = true")
            ax.legend(loc="upper left")
        ax.set_xlabel("true final score")
        ax.set_ylabel("predicted final score")
        if title:
            ax.set_title(title)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path


def write_predictions_csv(rows: Iterable[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """One line per clip with columns :data:`PREDICTION_COLUMNS`; a row missing a column is an error."""
    rows = list(rows)
    for index, row in enumerate(rows):  # validate first: an error leaves no half-written file
        missing = [c for c in PREDICTION_COLUMNS if c not in row]
        if missing:
            raise ValueError(f"predictions row {index} lacks {', '.join(missing)} "
                             f"(needs {', '.join(PREDICTION_COLUMNS)})")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=PREDICTION_COLUMNS)
        writer.writeheader()
        writer.writerows({c: _cell(row[c]) for c in PREDICTION_COLUMNS} for row in rows)
    return path


def _cell(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy / torch scalars
        value = value.item()
    return value
