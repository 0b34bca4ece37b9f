"""The backbone against a plain re-implementation of the official TimeSformer forward pass.

``reference_features`` below follows the official ``vit.py`` step by step (its ``(n t)`` token
order, its class-token handling) with explicit ``softmax(QK^T / sqrt(d)) V`` written with einsum and
no PyTorch attention, LayerNorm or GELU modules. It reads an official-layout state dict, so it also
pins the parameter names and the qkv layout. Other test files import it.
"""

from __future__ import annotations

import math

import pytest
import torch

from deepsports.config import ATTENTION_TYPES
from deepsports.model import BackbonePreset, TimeSformer, attention_backend

TEST_PRESET = BackbonePreset("test", width=24, depth=3, num_heads=3)


def _linear(x, sd, name):
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def _layer_norm(x, sd, name, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * sd[f"{name}.weight"] + sd[f"{name}.bias"]


def _gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _attention(x, sd, name, heads):
    seqs, length, dim = x.shape
    qkv = _linear(x, sd, f"{name}.qkv").reshape(seqs, length, 3, heads, dim // heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    scores = torch.einsum("slhd,smhd->shlm", q, k) / math.sqrt(dim // heads)
    weights = torch.exp(scores - scores.amax(-1, keepdim=True))
    weights = weights / weights.sum(-1, keepdim=True)
    out = torch.einsum("shlm,smhd->slhd", weights, v).reshape(seqs, length, dim)
    return _linear(out, sd, f"{name}.proj")


def _mlp(x, sd, name):
    return _linear(_gelu(_linear(x, sd, f"{name}.fc1")), sd, f"{name}.fc2")


def reference_features(sd: dict, video: torch.Tensor, *, heads: int, attention_type: str, patch: int,
                       eps: float = 1e-6) -> torch.Tensor:
    """Official TimeSformer ``forward_features`` (normed class token, (B, width)) from an official-layout state dict."""
    batch, chans, frames, height, width_px = video.shape
    dim = sd["cls_token"].shape[-1]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    gh, gw = height // patch, width_px // patch
    n = gh * gw
    flat = video.permute(0, 2, 1, 3, 4).reshape(batch * frames, chans, gh, patch, gw, patch)
    flat = flat.permute(0, 2, 4, 1, 3, 5).reshape(batch * frames, n, chans * patch * patch)
    x = flat @ sd["patch_embed.proj.weight"].reshape(dim, -1).T + sd["patch_embed.proj.bias"]
    x = torch.cat([sd["cls_token"].expand(batch * frames, 1, dim), x], 1) + sd["pos_embed"]
    if attention_type != "space_only":
        cls = x[:batch, :1]
        x = x[:, 1:].reshape(batch, frames, n, dim).permute(0, 2, 1, 3) + sd["time_embed"][:, None]
        x = torch.cat([cls, x.reshape(batch, n * frames, dim)], 1)  # official token order (n t)
    for i in range(depth):
        b = f"blocks.{i}"
        if attention_type == "divided_space_time":
            xt = x[:, 1:].reshape(batch * n, frames, dim)
            res = _attention(_layer_norm(xt, sd, f"{b}.temporal_norm1", eps), sd, f"{b}.temporal_attn", heads)
            xt = x[:, 1:] + _linear(res.reshape(batch, n * frames, dim), sd, f"{b}.temporal_fc")
            cls = x[:, :1]
            xs = xt.reshape(batch, n, frames, dim).permute(0, 2, 1, 3).reshape(batch * frames, n, dim)
            xs = torch.cat([cls.repeat_interleave(frames, 0), xs], 1)
            res = _attention(_layer_norm(xs, sd, f"{b}.norm1", eps), sd, f"{b}.attn", heads)
            cls_res = res[:, :1].reshape(batch, frames, 1, dim).mean(1)
            patch_res = res[:, 1:].reshape(batch, frames, n, dim).permute(0, 2, 1, 3).reshape(batch, n * frames, dim)
            x = torch.cat([cls, xt], 1) + torch.cat([cls_res, patch_res], 1)
        else:
            x = x + _attention(_layer_norm(x, sd, f"{b}.norm1", eps), sd, f"{b}.attn", heads)
        x = x + _mlp(_layer_norm(x, sd, f"{b}.norm2", eps), sd, f"{b}.mlp")
    if attention_type == "space_only":
        x = x.reshape(batch, frames, n + 1, dim).mean(1)
    return _layer_norm(x, sd, "norm", eps)[:, 0]


def randomise_(module: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Overwrite every parameter with noise, so zero-initialised parts (temporal_fc, time_embed) count."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
    return module


def official_state(backbone: TimeSformer) -> dict[str, torch.Tensor]:
    """The backbone's weights under the official names (no output projection)."""
    return {k: v.detach().clone() for k, v in backbone.state_dict().items() if not k.startswith("feature_proj.")}


def _small_backbone(attention_type: str, dtype: torch.dtype) -> TimeSformer:
    torch.manual_seed(0)
    net = TimeSformer(TEST_PRESET, patch_size=8, num_frames=3, img_size=32, attention_type=attention_type,
                      embed_dim=10)
    return randomise_(net).to(dtype).eval()


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_backbone_matches_reference_implementation(attention_type):
    net = _small_backbone(attention_type, torch.float64)
    video = torch.randn(2, 3, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sd = net.state_dict()
    expected = _linear(reference_features(official_state(net), video, heads=3, attention_type=attention_type,
                                          patch=8), sd, "feature_proj")
    with torch.no_grad():
        got64 = net(video)
        net32 = net.to(torch.float32)
        got32 = net32(video.float())
    assert got64.shape == (2, 10)
    torch.testing.assert_close(got64, expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(got32.double(), expected, rtol=0, atol=1e-5)
    # The two clips differ, so equal rows would mean the batch got mixed up.
    assert not torch.allclose(got64[0], got64[1])


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_reference_attention_backend_gives_the_same_outputs(attention_type):
    net = _small_backbone(attention_type, torch.float64)
    video = torch.randn(2, 3, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        fused = net(video)
        with attention_backend("reference"):
            explicit = net(video)
        again = net(video)  # the context manager restores the fused kernel
    torch.testing.assert_close(explicit, fused, rtol=0, atol=1e-10)
    assert torch.equal(again, fused)


def test_tokens_follow_the_class_token_feature():
    net = _small_backbone("divided_space_time", torch.float64)
    video = torch.randn(1, 3, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        cls, tokens = net.forward_features(video)
        plain = net(video)
    assert tokens.shape == (1, 1 + 3 * 16, 10)
    torch.testing.assert_close(cls, plain, rtol=0, atol=1e-12)
    torch.testing.assert_close(tokens[:, 0], plain, rtol=0, atol=1e-12)


def test_unknown_attention_backend_is_refused():
    with pytest.raises(ValueError, match="flash3"):
        with attention_backend("flash3"):
            pass
