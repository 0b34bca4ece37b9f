"""The TimeSformer video backbone (Bertasius et al., 2021), written for this project.

Parameter names match the official ``timesformer/models/vit.py`` (cls_token, pos_embed, time_embed,
patch_embed.proj, blocks.N.*, norm), so the published ``.pyth`` checkpoints load by key once their
``model.`` prefix is stripped (see :mod:`deepsports.model.pretrained`). The official classifier
``head`` has no counterpart; instead ``feature_proj`` maps the backbone width to ``embed_dim``, the
size of the feature handed to the scoring head (the original DeepSports built TimeSformer with
``num_classes=768`` and used that classifier as this projection).

Differences from the official code, none of which change a loaded model's outputs in eval mode:
patches are ordered frame-major inside the backbone; drop-path drops whole samples (the official
code drops per patch-tube / per frame); attention dropout is absent (the official value is 0);
embeddings are resized bicubic/linear instead of nearest.
"""

from __future__ import annotations

import torch
from einops import rearrange, reduce
from torch import nn

from deepsports.config import ATTENTION_TYPES
from deepsports.model.blocks import Block, DividedSpaceTimeBlock
from deepsports.model.embeddings import PatchEmbed, resize_pos_embed, resize_time_embed
from deepsports.model.presets import BackbonePreset

_BLOCKS = {"divided_space_time": DividedSpaceTimeBlock, "space_only": Block, "joint_space_time": Block}


class TimeSformer(nn.Module):
    """Video transformer: ``(B, C, T, H, W)`` clips to a ``(B, embed_dim)`` feature.

    Args:
        preset: widths (``width``, ``depth``, ``num_heads``, ...), see :mod:`deepsports.model.presets`.
        patch_size: patch side in pixels.
        num_frames: frames the time embedding is built for (other counts are interpolated).
        img_size: frame side the position embedding is built for (other sizes are interpolated).
        attention_type: ``divided_space_time`` | ``space_only`` | ``joint_space_time``.
        embed_dim: size of the output feature (``feature_proj``: width -> embed_dim).
        drop_path_rate: stochastic depth of the last block (linearly increasing from 0).
    """

    def __init__(self, preset: BackbonePreset, *, patch_size: int = 16, num_frames: int = 8, img_size: int = 224,
                 attention_type: str = "divided_space_time", embed_dim: int = 768, drop_path_rate: float = 0.0,
                 in_chans: int = 3) -> None:
        super().__init__()
        if attention_type not in ATTENTION_TYPES:
            raise ValueError(f"attention_type {attention_type!r} is not one of {ATTENTION_TYPES}")
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        width = preset.width
        self.preset = preset
        self.attention_type = attention_type
        self.num_frames = num_frames
        self.grid = (img_size // patch_size, img_size // patch_size)
        self.width = width
        self.embed_dim = embed_dim

        self.patch_embed = PatchEmbed(patch_size, width, in_chans)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid[0] * self.grid[1], width))
        # space_only never mixes frames, so (as in the official model) it has no time embedding.
        if attention_type == "space_only":
            self.register_parameter("time_embed", None)
        else:
            self.time_embed = nn.Parameter(torch.zeros(1, num_frames, width))
        block = _BLOCKS[attention_type]
        rates = [drop_path_rate * i / max(preset.depth - 1, 1) for i in range(preset.depth)]
        self.blocks = nn.ModuleList(block(width, preset.num_heads, preset.mlp_ratio, preset.qkv_bias, preset.norm_eps,
                                          rate) for rate in rates)
        self.norm = nn.LayerNorm(width, eps=preset.norm_eps)
        self.feature_proj = nn.Linear(width, embed_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        # As the official model: truncated normal (std 0.02) for tokens and linear layers, the conv
        # keeps PyTorch's default, time embedding zero.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for block in list(self.blocks)[1:]:
            if isinstance(block, DividedSpaceTimeBlock):
                nn.init.zeros_(block.temporal_fc.weight)
                nn.init.zeros_(block.temporal_fc.bias)

    def body_parameters(self) -> list[nn.Parameter]:
        """Every parameter except the output projection (what ``freeze`` freezes)."""
        proj = {id(p) for p in self.feature_proj.parameters()}
        return [p for p in self.parameters() if id(p) not in proj]

    def _embed(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The class token ``(B, 1, D)`` and the patches ``(B, T, N, D)``, with position (and time) embeddings."""
        patches, grid = self.patch_embed(video)
        pos = resize_pos_embed(self.pos_embed, self.grid, grid)
        cls = self.cls_token + pos[:, :1]
        # Position and time embeddings are summed at (T, N) size first: one pass over the patches.
        embed = pos[:, None, 1:]
        if self.time_embed is not None:
            embed = embed + rearrange(resize_time_embed(self.time_embed, patches.shape[1]), "1 t d -> 1 t 1 d")
        return cls.expand(patches.shape[0], -1, -1), patches + embed

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """``(B, C, T, H, W) -> (B, L, width)``: the token sequence after the last block, before the final norm.

        L = 1 + T*N (class token first, patches ordered ``(t n)``); for ``space_only`` the per-frame
        sequences are averaged over time, as in the official model, so L = 1 + N.
        """
        cls, frames = self._embed(video)
        batch, num_frames = frames.shape[:2]
        if self.attention_type == "divided_space_time":
            for block in self.blocks:
                cls, frames = block.forward_split(cls, frames)
            return torch.cat([cls, frames.flatten(1, 2)], dim=1)
        if self.attention_type == "space_only":
            x = torch.cat([cls.repeat_interleave(num_frames, 0), frames.flatten(0, 1)], dim=1)
        else:
            x = torch.cat([cls, frames.flatten(1, 2)], dim=1)
        for block in self.blocks:
            x = block(x, num_frames)
        if self.time_embed is None:
            x = reduce(x, "(b t) l d -> b l d", "mean", t=num_frames)
        return x

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """``(B, C, T, H, W) -> (B, embed_dim)``: the projected class-token feature."""
        return self.feature_proj(self.norm(self.encode(video)[:, 0]))

    def forward_features(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, C, T, H, W) -> ((B, embed_dim), (B, L, embed_dim))``: class-token feature and all projected tokens.

        The token sequence (class token first, see :meth:`encode`) is what the decoder head attends over.
        """
        tokens = self.feature_proj(self.norm(self.encode(video)))
        return tokens[:, 0], tokens

