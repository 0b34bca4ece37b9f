"""Scoring heads: the original MLP layout and a decoder that keeps samples apart."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deepsports.config import ACTIVATIONS, build_config
from deepsports.errors import ConfigError
from deepsports.model import DecoderHead, MLPHead, build_model, make_activation

_EXPECTED_ACTIVATION = {"none": nn.Identity, "relu": nn.ReLU, "leakyrelu": nn.LeakyReLU, "elu": nn.ELU,
                        "gelu": nn.GELU}


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_mlp_is_dropout_linear_activation_per_layer_then_dropout_linear(activation, depth):
    topology = [64, 32, 16][:depth]
    dropout = [0.1, 0.2, 0.3][:depth]
    head = MLPHead(48, topology, dropout, activation)
    layers = list(head)
    assert len(layers) == 3 * depth + 2
    width = 48
    for (units, p), (drop, linear, act) in zip(zip(topology, dropout), (layers[i:i + 3] for i in range(0, 3 * depth, 3))):
        assert type(drop) is nn.Dropout and drop.p == p
        assert type(linear) is nn.Linear and (linear.in_features, linear.out_features) == (width, units)
        assert type(act) is _EXPECTED_ACTIVATION[activation]
        width = units
    final_drop, final = layers[-2:]
    assert type(final_drop) is nn.Dropout and final_drop.p == dropout[-1]
    assert type(final) is nn.Linear and (final.in_features, final.out_features) == (width, 2)
    assert head(torch.randn(5, 48)).shape == (5, 2)


def test_activation_names_are_case_insensitive():
    assert type(make_activation("LeakyReLU")) is nn.LeakyReLU
    assert type(make_activation("GELU")) is nn.GELU
    with pytest.raises(ConfigError, match="swish"):
        make_activation("swish")


def test_mlp_needs_one_dropout_per_layer():
    with pytest.raises(ConfigError, match="equal length"):
        MLPHead(8, [4, 4], [0.1], "relu")


def test_build_model_uses_the_config_head():
    config = build_config({"spatial_size": 32, "frame_num": 2, "embed_dim": 24, "topology": [12, 6, 3],
                           "dropout": [0.0, 0.25, 0.5], "activation": "ELU"})
    head = build_model(config).model.head
    assert [type(m) for m in head] == [nn.Dropout, nn.Linear, nn.ELU] * 3 + [nn.Dropout, nn.Linear]
    assert [m.p for m in head if isinstance(m, nn.Dropout)] == [0.0, 0.25, 0.5, 0.5]
    assert [m.out_features for m in head if isinstance(m, nn.Linear)] == [12, 6, 3, 2]


def test_decoder_keeps_samples_apart():
    torch.manual_seed(0)
    head = DecoderHead(32, dropout=0.1).eval()
    gen = torch.Generator().manual_seed(1)
    batch = torch.randn(3, 7, 32, generator=gen)
    other = batch.clone()
    other[1:] = torch.randn(2, 7, 32, generator=gen) * 5
    with torch.no_grad():
        out, out_other, alone = head(batch), head(other), head(batch[:1])
        changed = head(torch.cat([batch[:1] + 1.0, batch[1:]]))
    assert out.shape == (3, 2)
    torch.testing.assert_close(out_other[0], out[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(alone[0], out[0], rtol=0, atol=1e-6)
    assert not torch.allclose(out_other[1:], out[1:], atol=1e-3)  # the others did change
    assert not torch.allclose(changed[0], out[0], atol=1e-4)  # and sample 0 depends on its own tokens


def test_decoder_model_keeps_clips_apart():
    torch.manual_seed(0)
    config = build_config({"spatial_size": 32, "frame_num": 2, "embed_dim": 32, "use_decoder": True})
    model = build_model(config).model.eval()
    gen = torch.Generator().manual_seed(2)
    video = torch.rand(3, 3, 2, 32, 32, generator=gen)
    other = video.clone()
    other[1:] = torch.rand(2, 3, 2, 32, 32, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(model(other)[0], model(video)[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(model(video[:1])[0], model(video)[0], rtol=0, atol=1e-5)


def test_decoder_accepts_any_sequence_length():
    head = DecoderHead(16, dropout=0.0).eval()
    assert head(torch.randn(2, 3, 16)).shape == head(torch.randn(2, 50, 16)).shape == (2, 2)
