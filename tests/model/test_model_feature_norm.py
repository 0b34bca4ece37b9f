"""The feature standardisation before the MLP head, and the head's output-bias start."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deepsports.config import build_config
from deepsports.errors import ConfigError
from deepsports.model import build_model

SMALL = {"spatial_size": 32, "frame_num": 2, "embed_dim": 16, "topology": "8", "dropout": "0.0"}


def test_batchnorm_standardises_the_feature_the_head_sees():
    torch.manual_seed(0)
    model = build_model(build_config({**SMALL, "feature_norm": "batchnorm"})).model.train()
    assert isinstance(model.feature_norm, nn.BatchNorm1d)
    seen = {}
    model.head.register_forward_pre_hook(lambda _m, args: seen.setdefault("x", args[0].detach()))
    model(torch.rand(6, 3, 2, 32, 32))
    # The raw features of random clips differ by a few % of their size; the head gets unit variance.
    torch.testing.assert_close(seen["x"].mean(0), torch.zeros(16), atol=1e-5, rtol=0)
    # (BatchNorm's eps keeps the variance slightly below one when the raw spread is this small)
    torch.testing.assert_close(seen["x"].var(0, unbiased=False), torch.ones(16), atol=0.05, rtol=0)


def test_none_is_the_original_head_input():
    model = build_model(build_config({**SMALL, "feature_norm": "none"})).model
    assert isinstance(model.feature_norm, nn.Identity)
    assert not any(k.startswith("feature_norm.") for k in model.state_dict())


def test_decoder_head_reads_tokens_without_the_batchnorm():
    model = build_model(build_config({**SMALL, "use_decoder": True})).model
    assert isinstance(model.feature_norm, nn.Identity)


def test_batchnorm_refuses_batches_of_one():
    with pytest.raises(ConfigError, match="feature_norm=batchnorm needs batch_size >= 2"):
        build_config({"batch_size": 1})
    assert build_config({"batch_size": 1, "feature_norm": "none"}).batch_size == 1


@pytest.mark.parametrize("use_decoder", [False, True])
def test_output_bias_starts_at_the_mean_target(use_decoder):
    torch.manual_seed(0)
    model = build_model(build_config({**SMALL, "use_decoder": use_decoder})).model.eval()
    model.init_output_bias(torch.tensor([0.7, 2.9]))
    last = [m for m in model.head.modules() if isinstance(m, nn.Linear)][-1]
    assert last.bias.tolist() == pytest.approx([0.7, 2.9])
    with torch.no_grad():
        last.weight.zero_()
        out = model(torch.rand(3, 3, 2, 32, 32))
    torch.testing.assert_close(out, torch.tensor([[0.7, 2.9]] * 3))
