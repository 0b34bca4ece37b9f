"""Model construction: presets, parameter counts, shapes, gradients, freezing, drop-path."""

from __future__ import annotations

import pytest
import torch

from deepsports.config import ATTENTION_TYPES, BACKBONES, build_config
from deepsports.errors import ConfigError
from deepsports.model import (
    PRESETS,
    AQAModel,
    TimeSformer,
    build_model,
    count_parameters,
    get_preset,
    load_pretrained,
    trainable_parameter_count,
)
from deepsports.model.heads import DecoderHead, MLPHead

SMALL = {"spatial_size": 32, "patch_size": 16, "frame_num": 2, "embed_dim": 32, "topology": [16, 8],
         "dropout": [0.1, 0.2]}


def _config(**overrides):
    return build_config({**SMALL, **overrides})


def _video(batch=2, frames=2, size=32, seed=0):
    return torch.randn(batch, 3, frames, size, size, generator=torch.Generator().manual_seed(seed))


def _official_block_keys(index: int, divided: bool) -> set[str]:
    names = ["norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"]
    if divided:
        names += ["temporal_norm1", "temporal_attn.qkv", "temporal_attn.proj", "temporal_fc"]
    return {f"blocks.{index}.{n}.{p}" for n in names for p in ("weight", "bias")}


def _base_on_meta(num_frames=8, attention_type="divided_space_time") -> TimeSformer:
    with torch.device("meta"):
        return TimeSformer(get_preset("base"), patch_size=16, num_frames=num_frames, img_size=224,
                           attention_type=attention_type, embed_dim=768)


def test_base_preset_has_the_published_timesformer_b_parameters():
    net = _base_on_meta()
    body = count_parameters(net) - count_parameters(net.feature_proj)
    # Counted from the official vit.py (ViT-B/16 + per-block temporal norm, attention and temporal_fc).
    assert body == 121_258_752
    assert count_parameters(_base_on_meta(num_frames=96)) - count_parameters(net.feature_proj) == 121_326_336
    keys = {k for k in net.state_dict() if not k.startswith("feature_proj.")}
    expected = {"cls_token", "pos_embed", "time_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
                "norm.weight", "norm.bias"}.union(*(_official_block_keys(i, True) for i in range(12)))
    assert keys == expected
    assert net.pos_embed.shape == (1, 197, 768) and net.time_embed.shape == (1, 8, 768)
    assert net.blocks[0].norm1.eps == 1e-6 and net.blocks[0].attn.qkv.bias is not None


@pytest.mark.parametrize("attention_type", ["space_only", "joint_space_time"])
def test_other_attention_types_have_no_temporal_parameters(attention_type):
    keys = set(_base_on_meta(attention_type=attention_type).state_dict())
    assert ("time_embed" in keys) == (attention_type == "joint_space_time")
    assert not any("temporal" in k for k in keys)
    assert _official_block_keys(11, False) <= keys


@pytest.mark.parametrize("backbone", BACKBONES)
def test_presets_use_their_widths_and_config_geometry(backbone):
    config = build_config({"backbone": backbone, "spatial_size": 64, "patch_size": 8, "frame_num": 5,
                           "embed_dim": 40})
    with torch.device("meta"):
        model = build_model(config).model
    preset = PRESETS[backbone]
    net = model.backbone
    assert len(net.blocks) == preset.depth and net.width == preset.width
    assert net.blocks[0].attn.num_heads == preset.num_heads
    assert net.pos_embed.shape == (1, 1 + 8 * 8, preset.width) and net.time_embed.shape == (1, 5, preset.width)
    assert net.patch_embed.proj.kernel_size == (8, 8)
    assert net.feature_proj.in_features == preset.width and net.feature_proj.out_features == 40
    assert model.head[1].in_features == 40


def test_unknown_preset_is_a_config_error():
    with pytest.raises(ConfigError, match="huge"):
        get_preset("huge")


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
@pytest.mark.parametrize("use_decoder", [False, True])
def test_forward_shape(attention_type, use_decoder):
    torch.manual_seed(0)
    model = build_model(_config(attention_type=attention_type, use_decoder=use_decoder)).model
    assert isinstance(model.head, DecoderHead if use_decoder else MLPHead)
    out = model(_video())
    assert out.shape == (2, 2) and out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
@pytest.mark.parametrize("use_decoder", [False, True])
def test_every_parameter_receives_a_gradient(attention_type, use_decoder):
    torch.manual_seed(0)
    model = build_model(_config(attention_type=attention_type, use_decoder=use_decoder, dropout=[0.0, 0.0])).model
    model(_video()).square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        # temporal_fc starts at zero in blocks 1.., so the temporal attention before it gets zero gradient
        # on the first step (temporal_fc itself does get one and moves off zero).
        starts_silent = any(f"blocks.{i}.temporal_{part}" in name for i in range(1, 4) for part in ("attn", "norm1"))
        assert (p.grad.abs().sum() > 0) != starts_silent, name


def test_temporal_fc_is_zero_except_in_the_first_block():
    torch.manual_seed(0)
    net = build_model(_config(backbone="tiny")).model.backbone
    assert net.blocks[0].temporal_fc.weight.abs().sum() > 0
    for block in list(net.blocks)[1:]:
        assert block.temporal_fc.weight.abs().sum() == 0 and block.temporal_fc.bias.abs().sum() == 0
    assert net.time_embed.abs().sum() == 0 and net.pos_embed.std() > 0


@pytest.mark.parametrize("use_decoder", [False, True])
def test_freeze_leaves_only_the_projection_and_head_trainable(use_decoder):
    torch.manual_seed(0)
    model = build_model(_config(freeze=True, use_decoder=use_decoder)).model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {"backbone.feature_proj.weight", "backbone.feature_proj.bias"} | {
        f"head.{n}" for n, _ in model.head.named_parameters()} | {
        f"feature_norm.{n}" for n, _ in model.feature_norm.named_parameters()}
    assert trainable == expected
    assert trainable_parameter_count(model) == model.trainable_parameters == (
        count_parameters(model.backbone.feature_proj) + count_parameters(model.head)
        + count_parameters(model.feature_norm))
    assert count_parameters(model, trainable_only=True) < count_parameters(model)
    model(_video()).sum().backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == expected


def test_unfrozen_model_trains_everything():
    model = build_model(_config()).model
    assert trainable_parameter_count(model) == count_parameters(model) == sum(p.numel() for p in model.parameters())


def test_drop_path_is_per_sample_and_only_in_training():
    torch.manual_seed(0)
    model = build_model(_config(drop_path_rate=0.5, dropout=[0.0, 0.0])).model
    video = _video(batch=1).expand(16, -1, -1, -1, -1)  # the same clip 16 times
    model.train()
    out = model(video)
    assert not torch.allclose(out, out[:1].expand_as(out))  # samples drew different paths
    model.eval()
    with torch.no_grad():
        first, second = model(video), model(video)
    assert torch.equal(first, second)
    torch.testing.assert_close(first, first[:1].expand_as(first))


def test_forward_accepts_other_frame_counts_and_sizes_like_a_resized_checkpoint():
    torch.manual_seed(0)
    source = build_model(_config()).model.eval()
    target = build_model(_config(spatial_size=64, frame_num=4)).model.eval()
    load_pretrained(target, {"model": source.state_dict()})
    video = _video(frames=4, size=64)
    with torch.no_grad():
        torch.testing.assert_close(source(video), target(video), rtol=0, atol=1e-6)


def test_bad_input_shape_is_reported():
    model = build_model(_config()).model
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(torch.zeros(1, 3, 2, 40, 40))
    with pytest.raises(ValueError, match=r"\(B, C, T, H, W\)"):
        model(torch.zeros(3, 2, 32, 32))


def test_model_is_an_aqa_model_with_backbone_and_head():
    model = build_model(_config()).model
    assert isinstance(model, AQAModel) and isinstance(model.backbone, TimeSformer)
    assert not model.uses_decoder
