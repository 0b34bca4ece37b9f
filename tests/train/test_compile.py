"""``compile=true`` trains through ``torch.compile`` and changes nothing else a run leaves behind.

On the CPU compiling gains nothing (benchmarks/README.md); this checks the path a GPU user takes: the
step runs compiled graphs, checkpoints hold the plain module's keys (so ``evaluate``, pretrained loading
and an uncompiled resume read them), and a run resumes with the setting switched off.
"""

from __future__ import annotations

import torch
from mlflow.tracking import MlflowClient

from deepsports.config import build_config
from deepsports.model import build_model
from deepsports.train.checkpoints import load_checkpoint
from deepsports.train.loop import train
from tests.e2e_helpers import TINY


def test_a_compiled_run_checkpoints_plain_weights_and_resumes_uncompiled(tmp_path, tracking_uri, tiny_cache_dir,
                                                                          monkeypatch):
    # Dynamo captures the real step and AOTAutograd builds its backward; only Inductor's code generation
    # (minutes of C++ builds on 2 cores) is left out here: it ran on a GPU (benchmarks/gpu_step.py).
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: real_compile(model, **kwargs, backend="aot_eager"))
    ckpt = tmp_path / "ckpt"
    values = {**TINY, "cache_dir": str(tiny_cache_dir), "checkpoint_dir": str(ckpt), "evaluate": False,
              "log_model": False, "num_workers": 0}
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    first = train(build_config({**values, "epochs": 1, "compile": True}))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the step ran compiled graphs

    state = load_checkpoint(ckpt / "epoch-0001.pt")["model"]
    plain = build_model(build_config({**values, "compile": False})).model.state_dict()
    assert set(state) == set(plain) and all(state[k].shape == plain[k].shape for k in plain)

    second = train(build_config({**values, "epochs": 2, "compile": False}))  # a speed setting: resume may change it
    assert second.run_id == first.run_id and second.resumed_from_epoch == 1
    history = MlflowClient(tracking_uri).get_metric_history(first.run_id, "train_loss")
    assert sorted(m.step for m in history) == [1, 2]
