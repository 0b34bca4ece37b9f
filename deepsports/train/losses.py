"""Training loss: MSE on the normalised targets minus a differentiable Spearman on the final score.

``loss = mse_weight * MSE(outputs, targets) - spcoef_weight * soft_spearman(pred_final, true_final)``
with ``final = out0 * out1 * 30`` (targets are ``[final / difficulty / 30, difficulty]``, 30 = 3
judges x 10 points, so the product recovers the final score).

Unlike the original, the soft ranks are taken over the *batch* of final scores (one vector of B
values, torchsort shape ``(1, B)``) and stay on the tensors' own device (torchsort dispatches to its
CUDA kernel for CUDA tensors), so there is no CPU round trip.

torchsort is an optional dependency (the ``spearman`` extra, docs/install.md): it is imported only when
a soft rank is needed. Without it the default loss (``spcoef_weight=0``) trains as before and the
monitored ``soft_spearman`` part is the exact (hard-rank) Spearman of the batch.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from deepsports.config import require_torchsort, torchsort_installed

log = logging.getLogger(__name__)

#: Scores are normalised by 30 = 3 judges x 10 points (the original's target normalisation).
SCORE_SCALE = 30.0

#: Soft-rank regularisation in units of one rank step (see :func:`soft_spearman`). At 1.0 every
#: clip of a batch of 4-64 receives a gradient while the soft value stays within ~0.05 (B=8) /
#: ~0.03 (B=16) of the exact Spearman (measured on random data; smaller values approach hard ranks,
#: whose gradient is zero almost everywhere).
DEFAULT_REGULARIZATION_STRENGTH = 1.0

#: Below this spread (in the units of the values, i.e. score points) the predictions are treated as
#: tied instead of being blown up to unit variance; it bounds the gradient of a collapsed model.
_MIN_SCALE = 1e-3

_warned_single_clip = False


def final_scores(values: torch.Tensor) -> torch.Tensor:
    """``(B, 2)`` outputs or targets ``[score/difficulty/30, difficulty]`` -> ``(B,)`` final scores."""
    return values[:, 0] * values[:, 1] * SCORE_SCALE


def _rank_scale(values: torch.Tensor) -> torch.Tensor:
    """``(B,)`` -> ``(B,)`` standardised to the spread of the ranks 1..B.

    torchsort's regularisation strength is measured in the units of its input. Final scores span
    ~20-100 points, so ranking them raw with strength 1 is nearly a hard rank (zero gradient), and
    the right strength would depend on how spread the predictions happen to be. Standardising and
    then scaling to the standard deviation of 1..B makes the strength mean "one rank step"
    whatever the score scale or batch size.
    """
    size = values.shape[-1]
    centred = values - values.mean()
    # +tiny inside the sqrt keeps the gradient finite when every value is equal (sqrt'(0) = inf).
    scale = (centred.pow(2).mean() + 1e-12).sqrt().clamp_min(_MIN_SCALE)
    return centred / scale * math.sqrt((size * size - 1) / 12.0)


def _average_ranks(values: torch.Tensor) -> torch.Tensor:
    """``(B,)`` -> ``(B,)`` exact ranks with ties averaged (as scipy's ``rankdata``), on the same device."""
    less = (values.unsqueeze(0) < values.unsqueeze(1)).sum(dim=1)
    equal = (values.unsqueeze(0) == values.unsqueeze(1)).sum(dim=1)
    return less.to(values.dtype) + (equal.to(values.dtype) + 1.0) / 2.0


def _exact_spearman(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``(B,)``, ``(B,)`` -> the exact Spearman (tie-averaged ranks) as a scalar tensor; 0 for B < 2 or no spread."""
    if pred.shape[0] < 2:
        return pred.sum() * 0.0
    ranks = [_average_ranks(v.float()) for v in (pred, target)]
    pred_rank, true_rank = (F.normalize(r - r.mean(), dim=0, eps=1e-8) for r in ranks)
    return (pred_rank * true_rank).sum()


def soft_spearman(pred: torch.Tensor, target: torch.Tensor,
                  regularization_strength: float = DEFAULT_REGULARIZATION_STRENGTH) -> torch.Tensor:
    """Differentiable Spearman correlation of ``pred`` ``(B,)`` against ``target`` ``(B,)`` -> scalar in [-1, 1].

    ``pred`` is standardised (see :func:`_rank_scale`) and soft-ranked with ``torchsort.soft_rank``
    (L2 regularisation, ``regularization_strength`` in rank steps). ``target`` needs no gradient, so
    its exact tie-averaged ranks are used, which makes the optimum the evaluation metric itself.
    Both rank vectors are centred and L2-normalised; the dot product is the correlation.

    Degenerate batches give 0, never NaN: B < 2, or constant targets (zero-variance ranks; the
    normalisation's epsilon turns the zero vector into zeros and the gradient is zero).
    """
    if pred.ndim != 1 or target.shape != pred.shape:
        raise ValueError(f"soft_spearman expects two (B,) tensors, got {tuple(pred.shape)} and {tuple(target.shape)}")
    if pred.shape[0] < 2:
        return pred.sum() * 0.0
    require_torchsort("the soft-Spearman loss (soft_spearman)")
    import torchsort

    pred = pred.float()
    pred_rank = torchsort.soft_rank(_rank_scale(pred).unsqueeze(0),
                                    regularization_strength=regularization_strength).squeeze(0)
    true_rank = _average_ranks(target.detach().float())
    pred_rank = F.normalize(pred_rank - pred_rank.mean(), dim=0, eps=1e-8)
    true_rank = F.normalize(true_rank - true_rank.mean(), dim=0, eps=1e-8)
    return (pred_rank * true_rank).sum()


def aqa_loss(outputs: torch.Tensor, targets: torch.Tensor, mse_weight: float = 1.0, spcoef_weight: float = 0.0,
             regularization_strength: float = DEFAULT_REGULARIZATION_STRENGTH
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of a batch: ``outputs`` and ``targets`` are ``(B, 2)`` = ``[final/difficulty/30, difficulty]``.

    Returns ``(loss, parts)``; ``parts`` holds detached scalar tensors ``mse``, ``soft_spearman`` and
    ``loss`` (tensors, so the training loop decides when to pay for a device sync with ``.item()``).
    The soft Spearman is computed for monitoring even when ``spcoef_weight`` is 0 (without gradient;
    the exact Spearman where torchsort is not installed).

    A batch of one clip has no ranking: with ``spcoef_weight != 0`` its Spearman term contributes 0
    (a warning is logged once per process) and the loss is the weighted MSE alone.
    The loss is computed in float32 even under autocast.
    """
    if outputs.ndim != 2 or outputs.shape[1] != 2 or targets.shape != outputs.shape:
        raise ValueError(f"aqa_loss expects outputs and targets of shape (B, 2), got {tuple(outputs.shape)} "
                         f"and {tuple(targets.shape)}")
    outputs, targets = outputs.float(), targets.float()
    mse = F.mse_loss(outputs, targets)
    pred_final, true_final = final_scores(outputs), final_scores(targets)
    if outputs.shape[0] < 2 and spcoef_weight != 0:
        _warn_single_clip_once()
    if spcoef_weight != 0:
        spearman = soft_spearman(pred_final, true_final, regularization_strength)
        loss = mse_weight * mse - spcoef_weight * spearman
    else:
        with torch.no_grad():
            spearman = (soft_spearman(pred_final, true_final, regularization_strength) if torchsort_installed()
                        else _exact_spearman(pred_final, true_final))
        loss = mse_weight * mse
    parts = {"mse": mse.detach(), "soft_spearman": spearman.detach(), "loss": loss.detach()}
    return loss, parts


def _warn_single_clip_once() -> None:
    global _warned_single_clip
    if not _warned_single_clip:
        _warned_single_clip = True
        log.warning("a batch holds a single clip: its soft-Spearman term is 0 (a ranking needs two clips); "
                    "the loss of that batch is the weighted MSE only")
