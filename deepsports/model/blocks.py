"""Transformer blocks of the TimeSformer, one class per attention type.

Parameter names mirror the official ``timesformer/models/vit.py`` (norm1, attn, temporal_norm1,
temporal_attn, temporal_fc, norm2, mlp.fc1, mlp.fc2) so its checkpoints load by key.

Token layout inside the backbone: one class token followed by the patch tokens of every frame,
frame-major, ``(B, 1 + T*N, D)`` with patches ordered ``(t n)``. (The official code orders them
``(n t)``; attention does not depend on the order, and frame-major makes the per-frame view free.)
Between divided blocks the class token ``(B, 1, D)`` and the patches ``(B, T, N, D)`` travel apart
(:meth:`DividedSpaceTimeBlock.forward_split`): a block joins them once, for the MLP.
"""

from __future__ import annotations

import torch
from torch import nn

from deepsports.model.attention import Attention


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch for whole samples (dim 0) during training."""

    def __init__(self, rate: float = 0.0) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(x)[0]

    def drop(self, *branches: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Residual branches of the same samples (dim 0), dropped together: one mask for all of them."""
        if self.rate == 0.0 or not self.training:
            return branches
        keep = 1.0 - self.rate
        mask = branches[0].new_empty(branches[0].shape[0]).bernoulli_(keep).div_(keep)
        return tuple(x * mask.view((-1,) + (1,) * (x.ndim - 1)) for x in branches)

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
        cls, patches = x.split([1, x.shape[1] - 1], dim=1)
        cls, frames = self.forward_split(cls, patches.unflatten(1, (num_frames, -1)))
        return torch.cat([cls, frames.flatten(1, 2)], dim=1)

    def forward_split(self, cls: torch.Tensor, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, 1, D), (B, T, N, D) -> (B, 1, D), (B, T, N, D)``: the class token and the patches of every frame.

        Kept apart between blocks, so a block joins them once (for the MLP) and splits them as views;
        every temporal <-> spatial switch is a view that the next LayerNorm, concatenation or residual
        add reads through (one copy each).
        """
        b, t, n, d = frames.shape
        # Temporal: every patch over the T frames. The residual add reads the (b n t) result transposed.
        by_patch = self.temporal_norm1(frames.transpose(1, 2)).reshape(b * n, t, d)
        temporal = self.temporal_fc(self.temporal_attn(by_patch)).view(b, n, t, d).transpose(1, 2)
        frames = frames + self.drop_path(temporal)

        # Spatial: every frame over its N patches and the class token, whose T results are averaged.
        by_frame = torch.cat([cls.unsqueeze(1).expand(b, t, 1, d), frames], dim=2).view(b * t, 1 + n, d)
        cls_spatial, patch_spatial = self.attn(self.norm1(by_frame)).view(b, t, 1 + n, d).split([1, n], dim=2)
        cls_update, patch_update = self.drop_path.drop(cls_spatial.mean(1), patch_spatial)
        # The MLP runs once over the joined tokens: its GEMMs stay whole, and a GPU launches no extra
        # small kernels for the class token (on the CPU, joined and apart measured the same).
        x = torch.cat([cls + cls_update, (frames + patch_update).flatten(1, 2)], dim=1)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        cls, patches = x.split([1, t * n], dim=1)
        return cls, patches.unflatten(1, (t, n))
