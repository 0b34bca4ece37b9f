"""The AQA model: TimeSformer backbone + scoring head, built from a :class:`~deepsports.config.Config`."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from deepsports.config import Config
from deepsports.model.heads import DecoderHead, MLPHead
from deepsports.model.presets import get_preset
from deepsports.model.pretrained import LoadReport, load_pretrained
from deepsports.model.timesformer import TimeSformer

log = logging.getLogger(__name__)

#: ``pretrained_model`` values meaning "start from random weights".
NO_PRETRAINED = ("scratch", "none", "")


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements of ``module`` (only those with ``requires_grad`` if asked)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def trainable_parameter_count(model: nn.Module) -> int:
    """Number of parameter elements that receive gradients."""
    return count_parameters(model, trainable_only=True)


class AQAModel(nn.Module):
    """Clip -> [normalised execution score, difficulty]: ``(B, C, T, H, W) -> (B, 2)``.

    The first output is ``final_score / difficulty / 30`` (30 = 3 judges x 10); the predicted final
    score is ``out[:, 0] * out[:, 1] * 30``.
    """

    def __init__(self, backbone: TimeSformer, head: MLPHead | DecoderHead, feature_norm: str = "none") -> None:
        super().__init__()
        self.backbone = backbone
        # A from-scratch backbone hands the head features that differ between clips by ~1 % of their
        # size (mostly background); standardising them keeps the MLP head trainable. The decoder head
        # reads the token sequence through its own LayerNorm instead.
        use_norm = feature_norm == "batchnorm" and not isinstance(head, DecoderHead)
        self.feature_norm = nn.BatchNorm1d(backbone.embed_dim) if use_norm else nn.Identity()
        self.head = head

    @property
    def uses_decoder(self) -> bool:
        return isinstance(self.head, DecoderHead)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """``(B, C, T, H, W) -> (B, 2)``."""
        return self.score(self.features(video))

    def features(self, video: torch.Tensor) -> torch.Tensor:
        """What the backbone hands the head: ``(B, D)`` pooled features, or ``(B, N, D)`` tokens for the
        decoder head. Per clip: no statistic crosses the batch."""
        if self.uses_decoder:
            return self.backbone.forward_features(video)[1]
        return self.backbone(video)

    def score(self, features: torch.Tensor) -> torch.Tensor:
        """Head (and feature normalisation, whose training statistics span the batch) -> ``(B, 2)``."""
        if self.uses_decoder:
            return self.head(features)
        return self.head(self.feature_norm(features))

    @torch.no_grad()
    def init_output_bias(self, target_mean: torch.Tensor) -> None:
        """Start the last layer's bias at the mean training target ``(2,)``.

        The targets sit far from zero (difficulty ~2.9, normalised execution ~0.7): without this the
        head's first steps only chase that offset.
        """
        last = [m for m in self.head.modules() if isinstance(m, nn.Linear)][-1]
        last.bias.copy_(torch.as_tensor(target_mean, dtype=last.bias.dtype))

    def freeze_backbone(self) -> None:
        """Stop gradients to the backbone except its output projection (the original's ``freeze``)."""
        for parameter in self.backbone.body_parameters():
            parameter.requires_grad_(False)

    @property
    def trainable_parameters(self) -> int:
        return trainable_parameter_count(self)


@dataclass(frozen=True)
class BuiltModel:
    """What :func:`build_model` made and knows about it."""

    model: AQAModel
    #: Whether the scoring head starts from random weights (the trainer then sets its output bias).
    fresh_head: bool
    #: What loading ``config.pretrained_model`` did; ``None`` when training from scratch.
    load_report: LoadReport | None = None


def build_model(config: Config) -> BuiltModel:
    """The model ``config`` describes, with ``config.pretrained_model`` loaded when it is a path.

    Uses the global torch RNG for initialisation (seed it first). Raises
    :class:`~deepsports.errors.CheckpointError` when the checkpoint cannot be read or does not fit.
    """
    backbone = TimeSformer(get_preset(config.backbone), patch_size=config.patch_size, num_frames=config.frame_num,
                           img_size=config.spatial_size, attention_type=config.attention_type,
                           embed_dim=config.embed_dim, drop_path_rate=config.drop_path_rate)
    if config.use_decoder:
        head: MLPHead | DecoderHead = DecoderHead(config.embed_dim, dropout=config.dropout[-1])
    else:
        head = MLPHead(config.embed_dim, config.topology, config.dropout, config.activation)
    model = AQAModel(backbone, head, feature_norm=config.feature_norm)
    report = None
    if config.pretrained_model.strip().lower() not in NO_PRETRAINED:
        report = load_pretrained(model, Path(config.pretrained_model).expanduser())
    if config.freeze:
        model.freeze_backbone()
    log.info("model: %s backbone (%s), %s head, %s of %s parameters trainable", config.backbone,
             config.attention_type, "decoder" if config.use_decoder else "MLP",
             f"{trainable_parameter_count(model):,}", f"{count_parameters(model):,}")
    fresh_head = report is None or any(key.startswith("head.") for key in report.initialised)
    return BuiltModel(model=model, fresh_head=fresh_head, load_report=report)
