"""Optimizers (the original's four, with its arguments) and the learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from deepsports.config import Config


def build_optimizer(config: Config, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """Adam/AdamW take ``amsgrad``; SGD/RMSProp take ``momentum`` (as in the original train.py)."""
    params = [p for p in params if p.requires_grad]
    lr, wd = config.learning_rate, config.weight_decay
    if config.optimizer == "Adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd, amsgrad=config.amsgrad)
    if config.optimizer == "AdamW":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd, amsgrad=config.amsgrad)
    if config.optimizer == "SGD":
        return torch.optim.SGD(params, lr=lr, weight_decay=wd, momentum=config.momentum)
    if config.optimizer == "RMSProp":
        return torch.optim.RMSprop(params, lr=lr, weight_decay=wd, momentum=config.momentum)
    raise AssertionError(f"unhandled optimizer {config.optimizer!r}")  # Config validated it


def build_scheduler(config: Config, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule: constant (``none``) or linear warm-up then cosine decay to 1% of the peak."""
    total = max(1, config.epochs * steps_per_epoch)
    warmup = config.warmup_epochs * steps_per_epoch if config.lr_scheduler != "none" else 0

    def factor(step: int) -> float:
        if config.lr_scheduler == "none":
            return 1.0
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
