"""Backbone size presets (config key ``backbone``).

- ``base``: the published TimeSformer-B (ViT-B/16 widths): the official checkpoints load into it.
  Its backbone has 121,258,752 parameters at 8 frames x 224 px with divided attention.
- ``small``: ViT-S/16 widths (384 wide, 12 deep, 6 heads), so ImageNet ViT-S/16 weights in timm's
  layout initialise its spatial blocks; about a quarter of ``base``'s compute.
- ``tiny``: ViT-Ti widths (192 wide, 3 heads) cut to 4 blocks, so it trains at several clips/s on a
  2-core CPU at 8x112x112; the demo and the tests use it.

``patch_size``, ``frame_num``, ``spatial_size`` and ``attention_type`` come from the config for
every preset. All presets use qkv bias, MLP ratio 4 and LayerNorm eps 1e-6, as the original.
"""

from __future__ import annotations

from dataclasses import dataclass

from deepsports.errors import ConfigError


@dataclass(frozen=True)
class BackbonePreset:
    """Widths of a TimeSformer; ``width`` is the transformer's token size (768 for ``base``)."""

    name: str
    width: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    norm_eps: float = 1e-6


PRESETS: dict[str, BackbonePreset] = {
    "tiny": BackbonePreset("tiny", width=192, depth=4, num_heads=3),
    "small": BackbonePreset("small", width=384, depth=12, num_heads=6),
    "base": BackbonePreset("base", width=768, depth=12, num_heads=12),
}


def get_preset(name: str) -> BackbonePreset:
    """The preset called ``name`` (one of ``config.BACKBONES``)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"backbone={name!r} is invalid: expected one of {', '.join(PRESETS)}") from None
