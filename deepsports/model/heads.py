"""Scoring heads: backbone feature -> 2 outputs (normalised execution score, difficulty).

``MLPHead`` is exactly the original's MLP; ``DecoderHead`` replaces the original's decoder, which
fed the pooled ``(B, D)`` batch to ``nn.TransformerDecoder`` as one sequence and so let samples
attend to each other. Here a few learned queries attend over each clip's own token sequence.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from deepsports.errors import ConfigError

NUM_OUTPUTS = 2  # [final_score / difficulty / 30, difficulty]

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "none": nn.Identity, "relu": nn.ReLU, "leakyrelu": nn.LeakyReLU, "elu": nn.ELU, "gelu": nn.GELU,
}


def make_activation(name: str) -> nn.Module:
    """``none|relu|leakyrelu|elu|gelu`` (any case) as a module; ``none`` is the identity."""
    try:
        return _ACTIVATIONS[name.lower()]()
    except KeyError:
        raise ConfigError(f"activation={name!r} is invalid: expected one of {', '.join(_ACTIVATIONS)}") from None


class MLPHead(nn.Sequential):
    """For each ``(units, p)`` in ``zip(topology, dropout)``: Dropout(p) -> Linear(-> units) -> activation;
    then Dropout(dropout[-1]) -> Linear(-> 2). ``(B, in_features) -> (B, 2)``."""

    def __init__(self, in_features: int, topology: Sequence[int], dropout: Sequence[float], activation: str) -> None:
        if not topology or len(topology) != len(dropout):
            raise ConfigError(f"topology={list(topology)!r} and dropout={list(dropout)!r} must be non-empty and of "
                              "equal length (one dropout per hidden layer)")
        layers: list[nn.Module] = []
        width = in_features
        for units, p in zip(topology, dropout):
            layers += [nn.Dropout(p), nn.Linear(width, units), make_activation(activation)]
            width = units
        # As the original: the last hidden layer's dropout is applied again before the output layer.
        layers += [nn.Dropout(dropout[-1]), nn.Linear(width, NUM_OUTPUTS)]
        super().__init__(*layers)


def _decoder_heads(dim: int) -> int:
    return next(h for h in (8, 6, 4, 3, 2, 1) if dim % h == 0)


class DecoderHead(nn.Module):
    """Learned queries cross-attend over one clip's tokens; their mean goes through Linear(-> 2).

    One pre-norm ``nn.TransformerDecoder`` layer (GELU feed-forward of twice the width, as many heads
    as divide the width up to 8). ``dropout`` is used inside the decoder and before the output layer.
    """

    def __init__(self, dim: int, dropout: float, num_queries: int = 4, num_layers: int = 1) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.empty(num_queries, dim))
        nn.init.trunc_normal_(self.queries, std=0.02)
        layer = nn.TransformerDecoderLayer(dim, _decoder_heads(dim), dim_feedforward=2 * dim, dropout=dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, num_layers, norm=nn.LayerNorm(dim))
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(dim, NUM_OUTPUTS)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, L, dim) -> (B, 2)``; each sample's queries see only that sample's L tokens."""
        queries = self.queries.expand(tokens.shape[0], -1, -1)
        decoded = self.decoder(queries, tokens)
        return self.out(self.dropout(decoded.mean(dim=1)))
