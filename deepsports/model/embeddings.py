"""Patch embedding and the resizing of position/time embeddings.

The resize functions serve both the checkpoint filter (weights trained at another grid or frame
count) and the forward pass (an input whose grid or frame count differs from the model's).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


class PatchEmbed(nn.Module):
    """Split every frame into ``patch_size`` squares and project each to ``width`` (a strided conv)."""

    def __init__(self, patch_size: int, width: int, in_chans: int = 3) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, video: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """``(B, C, T, H, W) -> (B, T, N, D)`` with N = (H/p)*(W/p), and the patch grid ``(H/p, W/p)``."""
        if video.ndim != 5:
            raise ValueError(f"expected a video batch (B, C, T, H, W), got shape {tuple(video.shape)}")
        height, width = video.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"frame size {height}x{width} is not a multiple of the patch size {self.patch_size}")
        if video.device.type == "cpu":
            return self._as_matmul(video), (height // self.patch_size, width // self.patch_size)
        frames = rearrange(video, "b c t h w -> (b t) c h w")
        patches = self.proj(frames)
        grid = (patches.shape[-2], patches.shape[-1])
        return rearrange(patches, "(b t) d gh gw -> b t (gh gw) d", b=video.shape[0]), grid

    def _as_matmul(self, video: torch.Tensor) -> torch.Tensor:
        """The conv as one GEMM: a stride = kernel conv is a linear map of each flattened patch.

        On the CPU this skips the conv's im2col and its backward's col2im buffers, and the GEMM writes
        the ``(B, T, N, D)`` layout directly (the conv writes ``(B*T, D, H/p, W/p)``, which needs a copy).
        """
        p = self.patch_size
        patches = rearrange(video, "b c t (gh ph) (gw pw) -> b t (gh gw) (c ph pw)", ph=p, pw=p)
        return F.linear(patches, self.proj.weight.flatten(1), self.proj.bias)


def grid_of(pos_embed: torch.Tensor) -> tuple[int, int]:
    """The square patch grid of a ``(1, 1 + N, D)`` position embedding (class token first)."""
    side = math.isqrt(pos_embed.shape[1] - 1)
    if side * side != pos_embed.shape[1] - 1:
        raise ValueError(f"position embedding of shape {tuple(pos_embed.shape)} does not hold a class token "
                         "and a square grid of patches")
    return side, side


def resize_pos_embed(pos_embed: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """``(1, 1 + h*w, D) -> (1, 1 + H*W, D)``: bicubic over the patch grid, the class token kept as is."""
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    cls_pos, grid_pos = pos_embed[:, :1], pos_embed[:, 1:]
    image = rearrange(grid_pos, "1 (h w) d -> 1 d h w", h=old_grid[0], w=old_grid[1])
    shrinking = new_grid[0] < old_grid[0] or new_grid[1] < old_grid[1]
    # Antialiasing averages the rows being merged when the grid shrinks, instead of skipping them.
    image = F.interpolate(image.float(), size=tuple(new_grid), mode="bicubic", align_corners=False,
                          antialias=shrinking).to(pos_embed.dtype)
    return torch.cat([cls_pos, rearrange(image, "1 d h w -> 1 (h w) d")], dim=1)


def resize_time_embed(time_embed: torch.Tensor, num_frames: int) -> torch.Tensor:
    """``(1, T0, D) -> (1, T, D)`` by linear interpolation over frames (96 -> 48 averages frame pairs)."""
    if time_embed.shape[1] == num_frames:
        return time_embed
    series = rearrange(time_embed, "1 t d -> 1 d t").float()
    series = F.interpolate(series, size=num_frames, mode="linear", align_corners=False)
    return rearrange(series, "1 d t -> 1 t d").to(time_embed.dtype)
