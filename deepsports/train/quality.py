"""Honest evaluation of one set of predictions: both protocols, bootstrap intervals, per-group table.

On the same predictions of a split this computes

* the metrics on the final score **as predicted** (``spearman``, ``rel_l2``, ``mse``,
  ``difficulty_mae``: predicted execution x predicted difficulty) and under the literature's
  **"with DD"** protocol (``spearman_dd``, ``rel_l2_dd``: predicted execution x ground-truth
  difficulty, as CoRe/TPT/MUSDL score);
* a bootstrap interval (:data:`~deepsports.train.metrics.BOOTSTRAP_RESAMPLES` resamples of clips,
  BCa, seeded) of each Spearman and R-l2, as ``<metric>_ci_low`` / ``<metric>_ci_high``;
* a per-group table (dive position, rotation type, armstand, somersaults, twists: the MTL-AQA
  annotation fields; and bins of the true difficulty): count, Spearman of each protocol where the
  group has at least :data:`MIN_GROUP_CLIPS` clips, MAE of the final score and of the difficulty.

Field codes are the annotation file's own (MTL-AQA's integer codes; the synthetic set's are
described in :mod:`deepsports.data.synth`). A field that no clip carries is left out of the table.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deepsports.tags import BOOTSTRAP_TAG, GROUP_MIN_CLIPS_TAG
from deepsports.train.metrics import (
    BOOTSTRAP_CONFIDENCE,
    BOOTSTRAP_METHOD,
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    bootstrap_interval,
    rel_l2_rows,
    relative_l2,
    score_with_true_difficulty,
    spearman,
    spearman_rows,
)

#: A group's Spearman is reported only from this many clips on: below it the 95 % interval of a
#: rank correlation spans most of [-1, 1] and the number would mean nothing.
MIN_GROUP_CLIPS = 20

#: Annotation fields grouped on, with the label used in the table and the plot.
GROUP_FIELDS = (("position", "position"), ("rotation_type", "rotation type"), ("armstand", "armstand"),
                ("ss_no", "somersaults (half turns)"), ("tw_no", "twists (half turns)"))

#: Edges of the true-difficulty bins (DD ranges about 1.2-4.1 on MTL-AQA, 1.6-3.7 on the synthetic set);
#: fixed, not quantiles, so the bins of two runs or splits are the same.
DIFFICULTY_EDGES = (2.0, 2.5, 3.0, 3.5)

#: Metrics that get a bootstrap interval, and the statistic each is (vectorised over resamples).
INTERVAL_METRICS = {"spearman": spearman_rows, "spearman_dd": spearman_rows, "rel_l2": rel_l2_rows,
                    "rel_l2_dd": rel_l2_rows}

GROUP_COLUMNS = ("field", "group", "count", "spearman", "spearman_dd", "score_mae", "score_dd_mae",
                 "difficulty_mae", "mean_true_score")


@dataclass
class QualityReport:
    """``metrics``: flat name -> value (no split prefix); ``groups``: rows of :data:`GROUP_COLUMNS`."""

    metrics: dict[str, float]
    groups: list[dict[str, Any]] = field(default_factory=list)

    def prefixed(self, split: str) -> dict[str, float]:
        return {f"{split}_{k}": v for k, v in self.metrics.items()}


def bootstrap_description(n_resamples: int = BOOTSTRAP_RESAMPLES) -> str:
    return (f"{BOOTSTRAP_METHOD} bootstrap over clips, {n_resamples} resamples, seed {BOOTSTRAP_SEED}, "
            f"{BOOTSTRAP_CONFIDENCE:.0%} interval")


def assess(preds, clips: Sequence[Any] | None = None, n_resamples: int = BOOTSTRAP_RESAMPLES) -> QualityReport:
    """The :class:`QualityReport` of ``preds`` (:class:`~deepsports.train.evaluation.Predictions`).

    ``clips``: the split's annotations (anything with ``video``, ``clip`` and an ``extra`` mapping),
    for the per-group table; without them only the metrics are computed.
    """
    metrics = dict(preds.metrics())
    score_dd = score_with_true_difficulty(preds.pred_execution, preds.true_difficulty)
    metrics["spearman_dd"] = spearman(score_dd, preds.true_score)
    metrics["rel_l2_dd"] = relative_l2(score_dd, preds.true_score)
    for name, statistic in INTERVAL_METRICS.items():
        pred = score_dd if name.endswith("_dd") else preds.pred_score
        low, high = bootstrap_interval(statistic, pred, preds.true_score, n_resamples=n_resamples)
        metrics[f"{name}_ci_low"], metrics[f"{name}_ci_high"] = low, high
    groups = group_table(preds, clips) if clips is not None else []
    return QualityReport(metrics=metrics, groups=groups)


def _group_labels(preds, clips: Sequence[Any]) -> dict[str, np.ndarray]:
    """Per annotation field, the value of each prediction's clip (as text; "" where a clip lacks it)."""
    by_key = {(int(c.video), int(c.clip)): c for c in clips}
    keys = list(zip(preds.video.tolist(), preds.clip.tolist()))
    missing = [k for k in keys if k not in by_key]
    if missing:
        raise ValueError(f"group_table: {len(missing)} predicted clip(s) have no annotation, e.g. {missing[0]}")
    labels = {}
    for name, _ in GROUP_FIELDS:
        values = [by_key[k].extra.get(name) for k in keys]
        if all(v is None for v in values):
            continue
        labels[name] = np.array(["" if v is None else str(int(v)) for v in values], dtype=object)
    return labels


def _difficulty_bins(true_difficulty: np.ndarray) -> np.ndarray:
    names = [f"<{DIFFICULTY_EDGES[0]:.1f}"]
    names += [f"{a:.1f}-{b:.1f}" for a, b in zip(DIFFICULTY_EDGES, DIFFICULTY_EDGES[1:])]
    names.append(f">={DIFFICULTY_EDGES[-1]:.1f}")
    # right=False: a DD equal to an edge belongs to the bin it starts (2.0 is in "2.0-2.5").
    return np.array(names, dtype=object)[np.digitize(true_difficulty, DIFFICULTY_EDGES, right=False)]


def group_table(preds, clips: Sequence[Any]) -> list[dict[str, Any]]:
    """Rows of :data:`GROUP_COLUMNS`, one per (field, value) present, in field order then value order."""
    labels = _group_labels(preds, clips)
    labels["difficulty"] = _difficulty_bins(preds.true_difficulty)
    score_dd = score_with_true_difficulty(preds.pred_execution, preds.true_difficulty)
    rows = []
    for name, values in labels.items():
        present = [v for v in np.unique(values.astype(str)) if v != ""]
        order = sorted(present, key=_sort_key)
        for value in order:
            mask = values == value
            count = int(mask.sum())
            enough = count >= MIN_GROUP_CLIPS
            true = preds.true_score[mask]
            rows.append({
                "field": name, "group": value, "count": count,
                "spearman": spearman(preds.pred_score[mask], true) if enough else math.nan,
                "spearman_dd": spearman(score_dd[mask], true) if enough else math.nan,
                "score_mae": float(np.mean(np.abs(preds.pred_score[mask] - true))),
                "score_dd_mae": float(np.mean(np.abs(score_dd[mask] - true))),
                "difficulty_mae": float(np.mean(np.abs(preds.pred_difficulty[mask] - preds.true_difficulty[mask]))),
                "mean_true_score": float(np.mean(true)),
            })
    return rows


def _sort_key(value: str) -> tuple[float, str]:
    """Integer codes numerically, difficulty bins by their lower edge."""
    text = value.lstrip("<>=")
    head = text.split("-")[0]
    try:
        number = float(head) - (1e-9 if value.startswith("<") else 0.0)
    except ValueError:
        number = math.inf
    return number, value


def write_group_csv(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """The per-group table as CSV (columns :data:`GROUP_COLUMNS`; an empty Spearman cell = too few clips)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=GROUP_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if isinstance(row[k], float) and math.isnan(row[k]) else row[k])
                             for k in GROUP_COLUMNS})
    return path


def plot_groups(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, title: str = "") -> Path:
    """One panel per field: Spearman (as predicted and w/ DD) and score MAE of each group, with counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fields = list(dict.fromkeys(row["field"] for row in rows))
    fig, axes = plt.subplots(len(fields), 2, figsize=(10, 2.2 * max(1, len(fields))), squeeze=False)
    try:
        for (ax_rho, ax_mae), name in zip(axes, fields):
            part = [row for row in rows if row["field"] == name]
            x = np.arange(len(part))
            ticks = [f"{row['group']}\n(n={row['count']})" for row in part]
            ax_rho.bar(x - 0.2, [row["spearman"] for row in part], 0.4, label="as predicted")
            ax_rho.bar(x + 0.2, [row["spearman_dd"] for row in part], 0.4, label="w/ true DD")
            shown = [r[k] for r in part for k in ("spearman", "spearman_dd") if not math.isnan(r[k])]
            ax_rho.set_ylim(min([0.0, *shown]), 1.0)  # negative correlations stay visible
            ax_rho.set_ylabel(f"{name}\nSpearman")
            ax_mae.bar(x, [row["score_mae"] for row in part], 0.6, color="tab:red")
            ax_mae.set_ylabel("score MAE")
            for ax in (ax_rho, ax_mae):
                ax.set_xticks(x, ticks, fontsize=7)
        axes[0][0].legend(fontsize=7, loc="lower left")
        fig.suptitle(f"{title} (Spearman only for groups of >= {MIN_GROUP_CLIPS} clips)", fontsize=9)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=90)
    finally:
        plt.close(fig)
    return path


def log_report(tracker, split: str, report: QualityReport, step: int, tmp_dir: Path,
               n_resamples: int = BOOTSTRAP_RESAMPLES) -> None:
    """Log ``report`` as ``<split>_...`` metrics at ``step`` and its table as ``quality/groups_<split>.{csv,png}``."""
    tracker.log_metrics(report.prefixed(split), step=step)
    tracker.set_tags({BOOTSTRAP_TAG: bootstrap_description(n_resamples),
                      GROUP_MIN_CLIPS_TAG: str(MIN_GROUP_CLIPS)})
    if report.groups:
        csv_path = write_group_csv(report.groups, tmp_dir / f"groups_{split}.csv")
        tracker.log_artifact(csv_path, "quality")
        png = plot_groups(report.groups, tmp_dir / f"groups_{split}.png", title=f"{split} split by dive group")
        tracker.log_artifact(png, "quality")


def summary_line(metrics: Mapping[str, float], split: str = "test") -> str:
    """``Spearman 0.855 [0.81, 0.89]; w/ true DD 0.871 [...]`` from logged ``<split>_...`` metrics."""
    def one(name: str) -> str:
        value = metrics.get(f"{split}_{name}")
        low, high = metrics.get(f"{split}_{name}_ci_low"), metrics.get(f"{split}_{name}_ci_high")
        if value is None:
            return "n/a"
        interval = f" [{low:.3f}, {high:.3f}]" if low is not None and high is not None else ""
        return f"{value:.4f}{interval}"

    return f"{one('spearman')}  (w/ true DD: {one('spearman_dd')}; 95% bootstrap CI in brackets)"
