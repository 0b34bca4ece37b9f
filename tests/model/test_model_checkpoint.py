"""Checkpoint loading: official .pyth files, timm image ViTs, our own checkpoints, and refusals.

Every checkpoint is built here in its real on-disk layout with ``torch.save``; nothing is downloaded.
"""

from __future__ import annotations

import os

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from deepsports.config import build_config
from deepsports.errors import CheckpointError
from deepsports.model import (
    TimeSformer,
    build_model,
    checkpoint_filter_fn,
    get_preset,
    load_pretrained,
    read_checkpoint,
)
from tests.model.test_model_reference import TEST_PRESET, official_state, randomise_, reference_features

TINY = get_preset("tiny")

#: What sits after the backbone: the feature standardisation and the scoring head (loaded as a whole).
SCORING = ("head.", "feature_norm.")


def _tiny(attention_type="divided_space_time", frames=4, size=32, patch=16, embed_dim=192, seed=0) -> TimeSformer:
    torch.manual_seed(seed)
    return TimeSformer(TINY, patch_size=patch, num_frames=frames, img_size=size, attention_type=attention_type,
                       embed_dim=embed_dim).eval()


def _save_pyth(path, backbone_state: dict, classes: int = 400) -> None:
    """The official file layout: {'model_state': {'model.<name>': tensor}, 'epoch', 'cfg', ...}."""
    width = backbone_state["cls_token"].shape[-1]
    state = {f"model.{k}": v for k, v in backbone_state.items()}
    state["model.head.weight"] = torch.randn(classes, width)
    state["model.head.bias"] = torch.zeros(classes)
    torch.save({"epoch": 15, "model_state": state, "optimizer_state": {"state": {}, "param_groups": []},
                "cfg": "TRAIN:\n  ENABLE: True\n"}, path)


def _identity_projection_(net: TimeSformer) -> TimeSformer:
    with torch.no_grad():
        net.feature_proj.weight.copy_(torch.eye(net.width))
        net.feature_proj.bias.zero_()
    return net


@pytest.mark.parametrize("attention_type", ["divided_space_time", "space_only", "joint_space_time"])
def test_official_pyth_loads_by_key_and_gives_identical_features(tmp_path, attention_type):
    source = randomise_(_tiny(attention_type), seed=3)
    path = tmp_path / "TimeSformer_divST_8x32_224_K400.pyth"
    _save_pyth(path, official_state(source))

    torch.manual_seed(123)
    model = build_model(build_config({"spatial_size": 32, "frame_num": 4, "embed_dim": 192,
                                      "attention_type": attention_type, "pretrained_model": str(path)})).model
    report = load_pretrained(model, path)
    assert report.layout == ("vit" if attention_type == "space_only" else "timesformer")
    assert report.missing == [] and report.unexpected == [] and report.resized == {} and report.derived == {}
    assert set(report.dropped) == {"head.weight", "head.bias"}
    assert set(report.initialised) == {"backbone.feature_proj.weight", "backbone.feature_proj.bias"} | {
        k for k in model.state_dict() if k.startswith(SCORING)}
    loaded = model.backbone.state_dict()
    for key, value in official_state(source).items():
        assert torch.equal(loaded[key], value), key

    video = torch.rand(2, 3, 4, 32, 32)
    with torch.no_grad():
        ours = _identity_projection_(model.backbone)(video)
        reference = reference_features(official_state(source), video, heads=3, attention_type=attention_type, patch=16)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)


def test_howto100m_96_frames_224_loads_into_48_frames_112(tmp_path):
    source = _tiny(frames=96, size=224)
    state = official_state(source)
    rows, cols = torch.meshgrid(torch.arange(14.0), torch.arange(14.0), indexing="ij")
    grid = torch.zeros(14 * 14, TINY.width)
    grid[:, 0], grid[:, 1] = rows.flatten(), cols.flatten()  # channel 0 = patch row, 1 = patch column
    state["pos_embed"] = torch.cat([torch.full((1, 1, TINY.width), 7.0), grid[None]], dim=1)
    state["time_embed"] = torch.randn(1, 96, TINY.width)
    path = tmp_path / "TimeSformer_divST_96x32_224_HowTo100M.pyth"
    _save_pyth(path, state)

    model = build_model(build_config({"spatial_size": 112, "frame_num": 48, "embed_dim": 192})).model
    report = load_pretrained(model, path)
    assert report.resized == {"backbone.pos_embed": ((1, 197, 192), (1, 50, 192)),
                              "backbone.time_embed": ((1, 96, 192), (1, 48, 192))}
    net = model.backbone
    # 96 -> 48 frames: each new frame's embedding is the mean of the two it replaces.
    torch.testing.assert_close(net.time_embed[0], state["time_embed"][0].reshape(48, 2, -1).mean(1))
    # 14x14 -> 7x7 patches: the class token is kept, new patch (i, j) sits at old (2i + 0.5, 2j + 0.5).
    assert torch.equal(net.pos_embed[0, 0], state["pos_embed"][0, 0])
    new = net.pos_embed[0, 1:].detach().reshape(7, 7, -1)
    centre = torch.arange(7.0) * 2 + 0.5
    torch.testing.assert_close(new[1:-1, 1:-1, 0], centre[1:-1, None].expand(5, 5), rtol=0, atol=0.05)
    torch.testing.assert_close(new[1:-1, 1:-1, 1], centre[None, 1:-1].expand(5, 5), rtol=0, atol=0.05)
    assert model.eval()(torch.rand(1, 3, 48, 112, 112)).shape == (1, 2)


def test_timm_image_vit_initialises_the_video_model(tmp_path):
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=16, embed_dim=192, depth=4, num_heads=3, num_classes=1000).eval()
    randomise_(vit, seed=5, std=0.1)
    path = tmp_path / "vit_tiny_patch16.pth"
    torch.save(vit.state_dict(), path)

    net = _tiny(seed=9)
    report = load_pretrained(net, path)
    assert report.layout == "vit" and report.missing == [] and report.unexpected == []
    assert set(report.dropped) == {"head.weight", "head.bias"}
    for i in range(4):
        block = net.blocks[i]
        assert torch.equal(block.temporal_attn.qkv.weight, vit.blocks[i].attn.qkv.weight)
        assert torch.equal(block.temporal_norm1.bias, vit.blocks[i].norm1.bias)
        assert block.temporal_fc.weight.abs().sum() == 0
        assert report.derived[f"blocks.{i}.temporal_attn.proj.weight"] == f"copied from blocks.{i}.attn.proj.weight"
    assert net.time_embed.abs().sum() == 0

    # With temporal_fc and the time embedding at zero, a still clip gives the image model's feature.
    image = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        still_clip = _identity_projection_(net)(image[:, :, None].expand(-1, -1, 4, -1, -1))
        expected = vit.forward_features(image)[:, 0]
    torch.testing.assert_close(still_clip, expected, rtol=0, atol=1e-5)


def test_timm_vit_at_another_resolution_is_resized(tmp_path):
    vit = VisionTransformer(img_size=32, patch_size=16, embed_dim=192, depth=4, num_heads=3)
    net = _tiny(size=64, attention_type="joint_space_time")
    report = load_pretrained(net, vit.state_dict())
    assert report.resized == {"pos_embed": ((1, 5, 192), (1, 17, 192))}
    assert report.derived == {"time_embed": "zeros (checkpoint has no time embedding)"}


def test_our_checkpoint_round_trips_and_head_loads_only_when_it_fits(tmp_path):
    config = {"spatial_size": 32, "frame_num": 4, "embed_dim": 48, "topology": [16, 8], "dropout": [0.0, 0.0]}
    torch.manual_seed(0)
    trained = randomise_(build_model(build_config(config)).model, seed=4).eval()
    path = tmp_path / "best.pt"
    torch.save({"model": trained.state_dict(), "optimizer": {"state": {}}, "epoch": 3, "config": config}, path)
    video = torch.rand(2, 3, 4, 32, 32)

    torch.manual_seed(1)
    same = build_model(build_config({**config, "pretrained_model": str(path)})).model.eval()
    with torch.no_grad():
        assert torch.equal(same(video), trained(video))

    other_head = build_model(build_config({**config, "topology": [16], "dropout": [0.0]})).model
    report = load_pretrained(other_head, path)
    assert report.layout == "deepsports" and report.missing == [] and report.unexpected == []
    assert set(report.dropped) == {k for k in trained.state_dict() if k.startswith(SCORING)}
    assert set(report.initialised) == {k for k in other_head.state_dict() if k.startswith(SCORING)}
    assert torch.equal(other_head.backbone.feature_proj.weight, trained.backbone.feature_proj.weight)

    other_width = build_model(build_config({**config, "embed_dim": 32, "frame_num": 2})).model
    report = load_pretrained(other_width, path)
    assert "backbone.feature_proj.weight" in report.initialised and "backbone.time_embed" in report.resized
    assert "embed_dim differs" in report.dropped["backbone.feature_proj.weight"]
    assert torch.equal(other_width.backbone.blocks[3].mlp.fc2.weight, trained.backbone.blocks[3].mlp.fc2.weight)


def test_build_model_says_whether_the_head_is_fresh(tmp_path):
    """The trainer sets a fresh head's output bias; a head loaded from the checkpoint keeps its weights."""
    config = {"spatial_size": 32, "frame_num": 4, "embed_dim": 48, "topology": [16, 8], "dropout": [0.0, 0.0]}
    scratch = build_model(build_config(config))
    assert scratch.fresh_head and scratch.load_report is None
    path = tmp_path / "best.pt"
    torch.save({"model": scratch.model.state_dict(), "epoch": 1, "config": config}, path)
    same = build_model(build_config({**config, "pretrained_model": str(path)}))
    assert not same.fresh_head and same.load_report.initialised == []
    other_head = build_model(build_config({**config, "topology": [16], "dropout": [0.0], "pretrained_model": str(path)}))
    assert other_head.fresh_head and other_head.load_report.initialised


def test_filter_fn_strips_prefixes_and_keys_like_the_model():
    source = _tiny()
    wrapped = {"state_dict": {f"module.model.{k}": v for k, v in source.state_dict().items()}}
    model = build_model(build_config({"spatial_size": 32, "frame_num": 4, "embed_dim": 192})).model
    state = checkpoint_filter_fn(wrapped, model)
    assert set(state) == {k for k in model.state_dict() if not k.startswith(SCORING)}
    assert torch.equal(state["backbone.feature_proj.weight"], source.feature_proj.weight)


def test_divided_checkpoint_into_space_only_drops_the_temporal_parts():
    report = load_pretrained(_tiny("space_only"), _tiny().state_dict())
    assert report.unexpected == [] and report.missing == []
    assert "time_embed" in report.dropped and "blocks.2.temporal_fc.weight" in report.dropped


def test_unexplained_and_missing_keys_are_errors_naming_them():
    state = _tiny().state_dict()
    state["blocks.0.attn.rel_pos_bias"] = torch.zeros(3)
    del state["blocks.1.norm2.weight"]
    with pytest.raises(CheckpointError, match=r"blocks\.0\.attn\.rel_pos_bias.*blocks\.1\.norm2\.weight"):
        load_pretrained(_tiny(), state)
    report = load_pretrained(_tiny(), state, strict=False)
    assert report.unexpected == ["blocks.0.attn.rel_pos_bias"] and report.missing == ["blocks.1.norm2.weight"]


def test_shapes_that_cannot_be_resized_are_errors(tmp_path):
    path = tmp_path / "patch8.pyth"
    _save_pyth(path, official_state(_tiny(patch=8)))
    with pytest.raises(CheckpointError, match=r"patch_embed\.proj\.weight: checkpoint \[192, 3, 8, 8\] vs model "
                                              r"\[192, 3, 16, 16\]"):
        load_pretrained(_tiny(), path)
    narrow = TimeSformer(TEST_PRESET, patch_size=16, num_frames=4, img_size=32)
    with pytest.raises(CheckpointError, match="width differs"):
        load_pretrained(_tiny(), official_state(narrow))


class _RunsCode:
    """Unpickling this runs ``touch <marker>``: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pyth"
    torch.save({"model_state": official_state(_tiny()), "cfg": _RunsCode(marker)}, path)
    with pytest.raises(CheckpointError, match="arbitrary code.*system"):
        read_checkpoint(path)
    with pytest.raises(CheckpointError, match="arbitrary code"):
        build_model(build_config({"spatial_size": 32, "frame_num": 4, "pretrained_model": str(path)}))
    assert not marker.exists()


def test_unreadable_files_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="missing.pyth.*does not exist"):
        read_checkpoint(tmp_path / "missing.pyth")
    with pytest.raises(CheckpointError, match="not a file"):
        read_checkpoint(tmp_path)
    whole = tmp_path / "whole.pt"
    torch.save({"model": _tiny().state_dict()}, whole)
    data = whole.read_bytes()
    for name, content in (("truncated.pt", data[: len(data) // 2]), ("empty.pt", b""), ("text.pt", b"not a ckpt")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=f"{name}.*truncated or corrupt"):
            read_checkpoint(tmp_path / name)
    (tmp_path / "list.pt").write_bytes(b"")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="holds a list, not a state dict"):
        load_pretrained(_tiny(), tmp_path / "list.pt")
    torch.save({"model": {"cls_token": torch.zeros(1), "note": "text"}}, tmp_path / "mixed.pt")
    with pytest.raises(CheckpointError, match="not a state dict of tensors.*note"):
        load_pretrained(_tiny(), tmp_path / "mixed.pt")
