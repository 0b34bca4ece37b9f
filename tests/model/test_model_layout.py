"""The backbone's token layouts (class token kept apart, patch embedding as a GEMM on the CPU) against
the previous implementation's math, outputs and every parameter gradient.

``previous_encode`` below is the backbone as it was before the layout work (class token split off and
concatenated back in every block, einops rearranges between the temporal and spatial layouts, the
patch embedding as a strided conv, q/k/v unbound from a permuted view), written with the model's own
modules. Both run on the same weights; float64 gives the exact reference. The float32 tolerance is
derived from the previous implementation's own float32 error against that reference: the new
layouts change only the order of float32 sums, so their error must be of the same size.
"""

from __future__ import annotations

import pytest
import torch
from einops import rearrange, reduce, repeat
from torch.utils.flop_counter import FlopCounterMode

from deepsports.model import TimeSformer, attention_backend
from deepsports.model.attention import attend
from deepsports.model.blocks import DividedSpaceTimeBlock
from tests.model.test_model_reference import TEST_PRESET, randomise_

FRAMES, SIZE, PATCH = 3, 32, 8


def _previous_attention(attn, x):
    q, k, v = rearrange(attn.qkv(x), "n l (three h d) -> three n h l d", three=3, h=attn.num_heads)
    return attn.proj(rearrange(attend(q, k, v), "n h l d -> n l (h d)"))


def _previous_block(block: DividedSpaceTimeBlock, x: torch.Tensor, t: int) -> torch.Tensor:
    cls, patches = x.split([1, x.shape[1] - 1], dim=1)
    by_patch = rearrange(patches, "b (t n) d -> (b n) t d", t=t)
    temporal = _previous_attention(block.temporal_attn, block.temporal_norm1(by_patch))
    temporal = rearrange(temporal, "(b n) t d -> b (t n) d", b=x.shape[0])
    patches = patches + block.drop_path(block.temporal_fc(temporal))
    by_frame = torch.cat([repeat(cls, "b 1 d -> (b t) 1 d", t=t), rearrange(patches, "b (t n) d -> (b t) n d", t=t)],
                         dim=1)
    cls_spatial, patch_spatial = _previous_attention(block.attn, block.norm1(by_frame)).split([1, by_frame.shape[1] - 1],
                                                                                             dim=1)
    update = torch.cat([reduce(cls_spatial, "(b t) 1 d -> b 1 d", "mean", t=t),
                        rearrange(patch_spatial, "(b t) n d -> b (t n) d", t=t)], dim=1)
    x = torch.cat([cls, patches], dim=1) + block.drop_path(update)
    return x + block.drop_path(block.mlp(block.norm2(x)))


def previous_forward(net: TimeSformer, video: torch.Tensor) -> torch.Tensor:
    """The previous ``TimeSformer.forward`` (divided attention, model-sized input)."""
    batch, t = video.shape[0], video.shape[2]
    patches = net.patch_embed.proj(rearrange(video, "b c t h w -> (b t) c h w"))
    patches = rearrange(patches, "(b t) d gh gw -> b t (gh gw) d", b=batch)
    patches = patches + net.pos_embed[:, None, 1:] + rearrange(net.time_embed, "1 t d -> 1 t 1 d")
    cls = net.cls_token + net.pos_embed[:, :1]
    x = torch.cat([cls.expand(batch, -1, -1), rearrange(patches, "b t n d -> b (t n) d")], dim=1)
    for block in net.blocks:
        x = _previous_block(block, x, t)
    return net.feature_proj(net.norm(x[:, 0]))


def _net(drop_path_rate: float) -> TimeSformer:
    torch.manual_seed(0)
    net = TimeSformer(TEST_PRESET, patch_size=PATCH, num_frames=FRAMES, img_size=SIZE, embed_dim=10,
                      drop_path_rate=drop_path_rate)
    return randomise_(net).train()


def _output_and_grads(net: TimeSformer, forward, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    """The output and every parameter gradient of ``(forward(net, video) * weights).sum()``."""
    net = net.to(dtype)
    gen = torch.Generator().manual_seed(1)
    video = torch.randn(2, 3, FRAMES, SIZE, SIZE, generator=gen).to(dtype)
    weights = torch.randn(2, 10, generator=gen).to(dtype)
    net.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the drop-path masks
    out = forward(net, video)
    (out * weights).sum().backward()
    # Copies: converting the module later to another dtype swaps the data of the gradients in place.
    result = {"output": out.detach().to(torch.float64, copy=True)}
    result.update({name: p.grad.to(torch.float64, copy=True) for name, p in net.named_parameters() if p.grad is not None})
    return result


@pytest.mark.parametrize("drop_path_rate", [0.0, 0.5])
def test_layouts_give_the_previous_outputs_and_gradients(drop_path_rate):
    net = _net(drop_path_rate)
    exact = _output_and_grads(net, previous_forward, torch.float64, seed=3)
    new64 = _output_and_grads(net, TimeSformer.forward, torch.float64, seed=3)
    prev32 = _output_and_grads(net, previous_forward, torch.float32, seed=3)
    new32 = _output_and_grads(net, TimeSformer.forward, torch.float32, seed=3)
    # Every parameter takes part (temporal_fc and the patch embedding included), in both versions.
    assert set(exact) == set(new64) == {"output"} | {name for name, _ in net.named_parameters()}
    ratio64 = torch.finfo(torch.float64).eps / torch.finfo(torch.float32).eps
    for name, ref in exact.items():
        scale = ref.abs().max().item()
        assert scale > 0, name
        prev_error = (prev32[name] - ref).abs().max().item()
        # Another summation order: the same size of error, within a factor 4, plus a few ulps of the scale.
        tol32 = 4 * prev_error + 8 * torch.finfo(torch.float32).eps * scale
        assert (new32[name] - ref).abs().max().item() <= tol32, name
        torch.testing.assert_close(new64[name], ref, rtol=0, atol=tol32 * ratio64, msg=name)


def test_drop_path_drops_class_token_and_patches_of_a_sample_together():
    """With the class token kept apart, one mask per branch still covers a sample's whole sequence."""
    net = _net(0.0)
    block = net.blocks[1]
    block.drop_path.rate = 0.5
    cls, frames = torch.randn(64, 1, 24), torch.randn(64, FRAMES, 16, 24)
    torch.manual_seed(0)
    cls_out, frames_out = block.drop_path.drop(cls, frames)
    cls_kept = (cls_out != 0).flatten(1).all(1)
    frames_kept = (frames_out != 0).flatten(1).all(1)
    assert torch.equal(cls_kept, frames_kept)
    assert torch.equal((cls_out == 0).flatten(1).all(1), ~cls_kept)
    assert 0 < int(cls_kept.sum()) < 64
    torch.testing.assert_close(cls_out[cls_kept], cls[cls_kept] * 2)


def test_block_tensor_api_matches_the_split_one():
    net = _net(0.0).double().eval()
    block = net.blocks[0]
    cls, frames = torch.randn(2, 1, 24, dtype=torch.float64), torch.randn(2, FRAMES, 16, 24, dtype=torch.float64)
    with torch.no_grad():
        joined = block(torch.cat([cls, frames.flatten(1, 2)], dim=1), FRAMES)
        split_cls, split_frames = block.forward_split(cls, frames)
        previous = _previous_block(block, torch.cat([cls, frames.flatten(1, 2)], dim=1), FRAMES)
    torch.testing.assert_close(joined, torch.cat([split_cls, split_frames.flatten(1, 2)], dim=1), rtol=0, atol=0)
    torch.testing.assert_close(joined, previous, rtol=0, atol=1e-12)


def test_layouts_do_the_previous_arithmetic():
    """The same FLOPs as before, forward and backward: the layouts move data, they add or drop no work
    (so the benchmark's FLOP/s figure stays comparable)."""
    net = _net(0.0)
    video = torch.randn(2, 3, FRAMES, SIZE, SIZE)
    counts = []
    for forward in (previous_forward, TimeSformer.forward):
        with attention_backend("reference"), FlopCounterMode(display=False) as counter:
            forward(net, video).sum().backward()
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] > 0
