"""Loss (soft Spearman on the batch's final scores), evaluation metrics and the plot/CSV writers."""

from __future__ import annotations

import csv
import logging
import math

import numpy as np
import pytest
import torch
from scipy import stats

from deepsports.errors import TrainingError
from deepsports.train import losses
from deepsports.train.losses import aqa_loss, final_scores, soft_spearman
from deepsports.train.metrics import regression_metrics, relative_l2, spearman
from deepsports.train.plots import PREDICTION_COLUMNS, plot_curves, plot_scatter, write_predictions_csv


def _targets(final: torch.Tensor, difficulty: torch.Tensor) -> torch.Tensor:
    """(B,) final scores and difficulties -> (B, 2) targets [final/difficulty/30, difficulty]."""
    return torch.stack([final / difficulty / 30.0, difficulty], dim=1)


# --- soft Spearman ---------------------------------------------------------------------------

def test_soft_spearman_tracks_the_exact_spearman():
    gen = torch.Generator().manual_seed(0)
    for size in (4, 8, 16, 32):
        true = torch.rand(size, generator=gen) * 80 + 20
        pred = true + torch.randn(size, generator=gen) * 15
        exact = stats.spearmanr(pred.numpy(), true.numpy()).statistic
        assert abs(soft_spearman(pred, true).item() - exact) < 0.12, size


def test_soft_spearman_of_perfect_and_reversed_orders():
    true = torch.tensor([20.0, 35.0, 50.0, 61.0, 80.0, 95.0])
    assert soft_spearman(true * 0.5 + 3, true).item() > 0.95
    assert soft_spearman(-true, true).item() < -0.95


def test_soft_spearman_is_independent_of_the_score_scale():
    # Standardising first makes the regularisation strength mean "rank steps", not score points.
    true = torch.tensor([30.0, 42.0, 47.0, 66.0, 71.0, 88.0, 90.0, 93.0])
    pred = torch.tensor([33.0, 40.0, 52.0, 60.0, 79.0, 75.0, 91.0, 89.0])
    assert soft_spearman(pred, true).item() == pytest.approx(soft_spearman(pred / 100, true).item(), abs=1e-5)


def test_soft_spearman_uses_tie_averaged_target_ranks():
    true = torch.tensor([50.0, 60.0, 60.0, 80.0])
    pred = torch.tensor([10.0, 20.0, 30.0, 40.0])
    # Hard limit: as the regularisation goes to 0 the value approaches scipy's tie-averaged rho.
    value = soft_spearman(pred, true, regularization_strength=1e-3).item()
    assert value == pytest.approx(math.sqrt(0.9), abs=1e-4)


# --- aqa_loss --------------------------------------------------------------------------------

def test_loss_is_weighted_mse_minus_weighted_spearman():
    outputs = torch.tensor([[0.60, 2.0], [0.70, 2.5], [0.55, 3.0], [0.90, 3.2]])
    targets = torch.tensor([[0.65, 2.0], [0.75, 2.4], [0.50, 3.1], [0.85, 3.3]])
    loss, parts = aqa_loss(outputs, targets, mse_weight=2.0, spcoef_weight=0.5)
    mse = torch.mean((outputs - targets) ** 2)
    rho = soft_spearman(final_scores(outputs), final_scores(targets))
    assert loss.item() == pytest.approx((2.0 * mse - 0.5 * rho).item(), rel=1e-6)
    assert parts["mse"].item() == pytest.approx(mse.item(), rel=1e-6)
    assert parts["soft_spearman"].item() == pytest.approx(rho.item(), rel=1e-6)
    assert parts["loss"].item() == pytest.approx(loss.item())


def test_final_score_is_out0_times_out1_times_30():
    values = torch.tensor([[0.5, 2.0], [1.0, 3.5]])
    assert final_scores(values).tolist() == pytest.approx([30.0, 105.0])


def test_gradients_are_finite_and_reach_both_outputs():
    gen = torch.Generator().manual_seed(1)
    outputs = (torch.rand(8, 2, generator=gen) + 0.5).requires_grad_()
    targets = _targets(torch.rand(8, generator=gen) * 80 + 20, torch.rand(8, generator=gen) * 2 + 1.5)
    loss, _ = aqa_loss(outputs, targets, mse_weight=0.0, spcoef_weight=1.0)
    loss.backward()
    assert torch.isfinite(outputs.grad).all()
    assert (outputs.grad[:, 0].abs() > 0).all() and (outputs.grad[:, 1].abs() > 0).all()


def test_optimising_the_loss_raises_the_spearman_of_a_toy_problem():
    gen = torch.Generator().manual_seed(2)
    size = 16
    targets = _targets(torch.rand(size, generator=gen) * 80 + 20, torch.rand(size, generator=gen) * 2 + 1.5)
    outputs = (torch.rand(size, 2, generator=gen) * 0.5 + 0.5).requires_grad_()
    optimizer = torch.optim.Adam([outputs], lr=0.02)
    first = None
    for _ in range(150):
        loss, parts = aqa_loss(outputs, targets, mse_weight=0.0, spcoef_weight=1.0)
        first = parts["soft_spearman"].item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    _, parts = aqa_loss(outputs.detach(), targets, mse_weight=0.0, spcoef_weight=1.0)
    exact = stats.spearmanr(final_scores(outputs.detach()).numpy(), final_scores(targets).numpy()).statistic
    assert first < 0.5
    assert parts["soft_spearman"].item() > first + 0.3
    assert exact > 0.9


def test_single_clip_batch_falls_back_to_mse_and_warns_once(caplog, monkeypatch):
    monkeypatch.setattr(losses, "_warned_single_clip", False)
    outputs = torch.tensor([[0.6, 2.0]], requires_grad=True)
    targets = torch.tensor([[0.5, 2.5]])
    with caplog.at_level(logging.WARNING, logger="deepsports.train.losses"):
        loss, parts = aqa_loss(outputs, targets, mse_weight=1.0, spcoef_weight=0.7)
        aqa_loss(outputs, targets, mse_weight=1.0, spcoef_weight=0.7)
    loss.backward()
    assert loss.item() == pytest.approx(torch.mean((outputs - targets) ** 2).item())
    assert parts["soft_spearman"].item() == 0.0
    assert torch.isfinite(outputs.grad).all()
    assert sum("single clip" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("case", ["constant_targets", "constant_predictions"])
def test_zero_variance_batches_stay_finite(case):
    gen = torch.Generator().manual_seed(3)
    varied = _targets(torch.rand(6, generator=gen) * 80 + 20, torch.full((6,), 2.0))
    constant = _targets(torch.full((6,), 60.0), torch.full((6,), 2.0))
    if case == "constant_targets":
        outputs, targets = varied.clone(), constant
    else:
        outputs, targets = constant.clone(), varied
    outputs.requires_grad_()
    loss, parts = aqa_loss(outputs, targets, mse_weight=1.0, spcoef_weight=1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(outputs.grad).all()
    if case == "constant_targets":
        assert parts["soft_spearman"].item() == 0.0


def test_loss_accepts_bf16_outputs_and_computes_in_float32():
    outputs = torch.tensor([[0.6, 2.0], [0.7, 2.5], [0.5, 3.0]], dtype=torch.bfloat16, requires_grad=True)
    targets = torch.tensor([[0.65, 2.0], [0.75, 2.4], [0.5, 3.1]])
    loss, _ = aqa_loss(outputs, targets, 1.0, 1.0)
    loss.backward()
    assert loss.dtype == torch.float32 and outputs.grad.dtype == torch.bfloat16


def test_loss_rejects_wrong_shapes():
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        aqa_loss(torch.zeros(4, 3), torch.zeros(4, 3))


# --- metrics ---------------------------------------------------------------------------------

def test_regression_metrics_by_hand_with_ties():
    # true ranks [1, 2.5, 2.5, 4] vs predicted ranks [1, 2, 3, 4]: rho = 4.5 / sqrt(5 * 4.5) = sqrt(0.9)
    true = [50.0, 60.0, 60.0, 80.0]
    pred = [52.0, 58.0, 65.0, 75.0]
    out = regression_metrics(pred, true, [2.0, 3.0, 3.5, 2.8], [2.5, 3.0, 3.1, 3.0])
    assert out["spearman"] == pytest.approx(math.sqrt(0.9))
    # errors 2, -2, 5, -5 -> squares 4, 4, 25, 25; true range 80 - 50 = 30
    assert out["mse"] == pytest.approx(58 / 4)
    assert out["rel_l2"] == pytest.approx(100 * 58 / (4 * 900))
    assert out["difficulty_mae"] == pytest.approx((0.5 + 0 + 0.4 + 0.2) / 4)


def test_spearman_with_ties_on_both_sides_matches_the_average_rank_formula():
    pred = [1.0, 1.0, 2.0, 3.0]  # ranks 1.5 1.5 3 4
    true = [5.0, 6.0, 6.0, 9.0]  # ranks 1 2.5 2.5 4
    # deviations from 2.5: (-1, -1, .5, 1.5) and (-1.5, 0, 0, 1.5): 3.75 / sqrt(4.5 * 4.5)
    assert spearman(pred, true) == pytest.approx(3.75 / 4.5)


def test_constant_inputs_give_zero_spearman_not_nan():
    assert spearman([3.0, 3.0, 3.0], [1.0, 2.0, 3.0]) == 0.0
    assert spearman([1.0, 2.0, 3.0], [4.0, 4.0, 4.0]) == 0.0
    assert spearman([1.0], [2.0]) == 0.0


def test_relative_l2_with_a_fixed_range_and_without_spread():
    assert relative_l2([10.0, 20.0], [12.0, 18.0], score_range=100.0) == pytest.approx(100 * (4 + 4) / 2 / 1e4)
    assert math.isnan(relative_l2([1.0, 2.0], [5.0, 5.0]))


def test_metrics_accept_tensors_and_reject_non_finite_or_mismatched_input():
    out = regression_metrics(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 3.0, 2.0]),
                             torch.ones(3), torch.ones(3))
    assert out["spearman"] == pytest.approx(0.5)
    with pytest.raises(TrainingError, match="non-finite"):
        regression_metrics([1.0, float("nan")], [1.0, 2.0], [1.0, 1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="differ in length"):
        regression_metrics([1.0, 2.0], [1.0, 2.0, 3.0], [1.0, 1.0], [1.0, 1.0])


# --- plots and predictions CSV ---------------------------------------------------------------

def test_curves_and_scatter_are_png_files(tmp_path):
    history = [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.2 / e, "val_spearman": 0.2 * e} for e in (1, 2, 3)]
    history.append({"epoch": 4, "train_loss": 0.2, "val_loss": float("nan"), "val_spearman": 0.8})
    for path in (plot_curves(history, tmp_path / "out" / "losses.png"),
                 plot_scatter([50.0, 60.0, 70.0], [52.0, 57.0, 73.0], tmp_path / "scatter.png", title="val")):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_predictions_csv_round_trip_and_bad_rows(tmp_path):
    rows = [{"video": 1, "clip": 3, "true_score": 61.5, "pred_score": np.float32(60.25), "true_difficulty": 3.2,
             "pred_difficulty": torch.tensor(3.0)}]
    path = write_predictions_csv(rows, tmp_path / "p.csv")
    with open(path, newline="") as handle:
        read = list(csv.DictReader(handle))
    assert tuple(read[0]) == PREDICTION_COLUMNS
    assert read[0]["video"] == "1" and float(read[0]["pred_score"]) == 60.25
    assert float(read[0]["pred_difficulty"]) == 3.0
    with pytest.raises(ValueError, match="pred_score"):
        write_predictions_csv([{"video": 1, "clip": 2}], tmp_path / "bad.csv")
    assert not (tmp_path / "bad.csv").exists()
