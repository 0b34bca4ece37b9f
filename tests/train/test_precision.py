"""``precision`` on the CPU: what ``auto``, ``bf16`` and ``fp16`` pick, and a bf16 run that really computes in bf16.

``precision: bf16`` is the CPU's speed option on processors with bf16 kernels (AVX-512 BF16 / AMX: the tiny
step 1.3x faster, benchmarks/README.md "Model"); ``auto`` stays fp32 on the CPU so results do not depend on
which CPU a test or a run lands on.
"""

from __future__ import annotations

import logging
import math

import torch
from mlflow.tracking import MlflowClient

from deepsports.config import build_config
from deepsports.train.checkpoints import load_checkpoint
from deepsports.train.loop import train
from deepsports.train.runtime import select_runtime
from tests.e2e_helpers import TINY

CPU = torch.device("cpu")


def test_auto_is_fp32_on_the_cpu_bf16_is_autocast_and_fp16_falls_back_with_a_warning(caplog):
    assert select_runtime(build_config({"precision": "auto"}), CPU).amp_dtype is None
    assert select_runtime(build_config({"precision": "fp32"}), CPU).amp_dtype is None
    bf16 = select_runtime(build_config({"precision": "bf16"}), CPU)
    assert bf16.amp_dtype is torch.bfloat16 and not bf16.use_grad_scaler
    with bf16.autocast():
        assert (torch.ones(4, 4) @ torch.ones(4, 4)).dtype is torch.bfloat16
    with caplog.at_level(logging.WARNING):
        fp16 = select_runtime(build_config({"precision": "fp16"}), CPU)
    assert fp16.amp_dtype is None and not fp16.use_grad_scaler
    assert "precision=fp16 is not supported on the CPU" in caplog.text


def test_a_bf16_cpu_run_computes_its_layers_in_bf16_and_keeps_fp32_weights(tmp_path, tracking_uri, tiny_cache_dir):
    ckpt = tmp_path / "ckpt"
    linear_outputs: set[torch.dtype] = set()

    def record(module, _inputs, output):
        if isinstance(module, torch.nn.Linear) and module.training:
            linear_outputs.add(output.dtype)

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        result = train(build_config({**TINY, "cache_dir": str(tiny_cache_dir), "checkpoint_dir": str(ckpt),
                                     "epochs": 1, "evaluate": False, "log_model": False, "num_workers": 0,
                                     "precision": "bf16"}))
    finally:
        handle.remove()
    assert linear_outputs == {torch.bfloat16}  # every training-mode Linear ran under bf16 autocast

    state = load_checkpoint(ckpt / "epoch-0001.pt")["model"]
    floats = {k: v.dtype for k, v in state.items() if v.is_floating_point()}
    assert floats and set(floats.values()) == {torch.float32}  # master weights stay fp32

    run = MlflowClient(tracking_uri).get_run(result.run_id)
    assert run.data.params["precision"] == "bf16"
    assert math.isfinite(run.data.metrics["train_loss"])
