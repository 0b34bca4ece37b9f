"""Transformer blocks of the TimeSformer, one class per attention type.

Parameter names mirror the official ``timesformer/models/vit.py`` (norm1, attn, temporal_norm1,
temporal_attn, temporal_fc, norm2, mlp.fc1, mlp.fc2) so its checkpoints load by key.

Token layout inside the backbone: one class token followed by the patch tokens of every frame,
frame-major, ``(B, 1 + T*N, D)`` with patches ordered ``(t n)``. (The official code orders them
``(n t)``; attention does not depend on the order, and frame-major makes the per-frame view free.)
"""

from __future__ import annotations

import torch
from einops import rearrange, reduce, repeat
from torch import nn

from deepsports.model.attention import Attention


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch for whole samples (dim 0) during training."""

    def __init__(self, rate: float = 0.0) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 (the transformer feed-forward), ``(..., D) -> (..., D)``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm ViT block: every token of a sequence attends to every other.

    Used by ``joint_space_time`` (the sequence is the class token and all T*N patches) and by
    ``space_only`` (each frame is its own sequence with its own class token).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, norm_eps: float,
                 drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        """``(S, L, D) -> (S, L, D)``; ``num_frames`` is not needed by this block."""
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class DividedSpaceTimeBlock(Block):
    """Temporal attention (each patch over the T frames), then spatial attention (each frame over its
    N patches plus the class token), then the MLP.

    The class token joins every frame's spatial attention; its T results are averaged. The temporal
    result passes through ``temporal_fc`` before its residual (zero-initialised in all but the first
    block, so a fresh block starts as a purely spatial one).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, norm_eps: float,
                 drop_path: float) -> None:
        super().__init__(dim, num_heads, mlp_ratio, qkv_bias, norm_eps, drop_path)
        self.temporal_norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.temporal_attn = Attention(dim, num_heads, qkv_bias)
        self.temporal_fc = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        """``(B, 1 + T*N, D) -> (B, 1 + T*N, D)`` with patches ordered ``(t n)``; T = ``num_frames``."""
        # split (not slicing) so the backward pass concatenates gradients instead of zero-filling copies
        cls, patches = x.split([1, x.shape[1] - 1], dim=1)

        by_patch = rearrange(patches, "b (t n) d -> (b n) t d", t=num_frames)
        temporal = self.temporal_attn(self.temporal_norm1(by_patch))
        temporal = rearrange(temporal, "(b n) t d -> b (t n) d", b=x.shape[0])
        patches = patches + self.drop_path(self.temporal_fc(temporal))

        by_frame = torch.cat([repeat(cls, "b 1 d -> (b t) 1 d", t=num_frames),
                              rearrange(patches, "b (t n) d -> (b t) n d", t=num_frames)], dim=1)
        cls_spatial, patch_spatial = self.attn(self.norm1(by_frame)).split([1, by_frame.shape[1] - 1], dim=1)
        cls_update = reduce(cls_spatial, "(b t) 1 d -> b 1 d", "mean", t=num_frames)
        patch_update = rearrange(patch_spatial, "(b t) n d -> b (t n) d", t=num_frames)
        x = torch.cat([cls, patches], dim=1) + self.drop_path(torch.cat([cls_update, patch_update], dim=1))

        return x + self.drop_path(self.mlp(self.norm2(x)))
