"""Atomic weights-only checkpoints, the checkpoint directory manager and RNG state round trips."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from deepsports.errors import CheckpointError
from deepsports.train.checkpoints import (
    CheckpointManager,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)


def _training_objects(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.GELU(), torch.nn.Linear(5, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-5, amsgrad=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    return model, optimizer, scheduler, scaler


def _step(model, optimizer, scheduler, scaler) -> None:
    loss = model(torch.randn(4, 6)).pow(2).mean()
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    optimizer.zero_grad()


def test_full_training_state_round_trips_with_weights_only(tmp_path):
    model, optimizer, scheduler, scaler = _training_objects()
    for _ in range(3):
        _step(model, optimizer, scheduler, scaler)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "scaler": scaler.state_dict(), "rng": capture_rng_state(), "mlflow_run_id": "0123abcd",
             "config": {"topology": [512, 256], "dropout": [0.5, 0.5], "optimizer": "AdamW", "gpu": True,
                        "videos": "all", "learning_rate": 3e-4},
             "epoch": 4, "step": 0, "partial": None, "history": [{"epoch": 1, "val_spearman": 0.5}],
             "best": {"val_spearman": 0.5, "epoch": 1}}
    path = save_checkpoint(tmp_path / "ckpt.pt", state)
    loaded = load_checkpoint(path)  # torch.load(weights_only=True) inside
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temp file left behind
    assert {k: loaded[k] for k in ("config", "mlflow_run_id", "epoch", "partial", "history", "best")} == \
        {k: state[k] for k in ("config", "mlflow_run_id", "epoch", "partial", "history", "best")}

    # Resuming from the loaded state continues exactly like the original objects.
    model2, optimizer2, scheduler2, scaler2 = _training_objects(seed=1)
    model2.load_state_dict(loaded["model"])
    optimizer2.load_state_dict(loaded["optimizer"])
    scheduler2.load_state_dict(loaded["scheduler"])
    scaler2.load_state_dict(loaded["scaler"])
    restore_rng_state(loaded["rng"])
    _step(model2, optimizer2, scheduler2, scaler2)
    restore_rng_state(state["rng"])
    _step(model, optimizer, scheduler, scaler)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    assert scheduler.get_last_lr() == scheduler2.get_last_lr()
    assert scaler.get_scale() == scaler2.get_scale()


def test_rng_state_restores_torch_numpy_and_python_streams(tmp_path):
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    np.random.normal()  # leaves a cached Gaussian in numpy's legacy state
    random.gauss(0, 1)
    saved = capture_rng_state()
    expected = (torch.rand(3), np.random.rand(3), np.random.normal(), random.random(), random.gauss(0, 1))
    path = save_checkpoint(tmp_path / "rng.pt", {"rng": saved})
    torch.rand(10)
    np.random.rand(10)
    random.random()
    restore_rng_state(load_checkpoint(path)["rng"])
    again = (torch.rand(3), np.random.rand(3), np.random.normal(), random.random(), random.gauss(0, 1))
    assert torch.equal(expected[0], again[0])
    assert np.array_equal(expected[1], again[1])
    assert expected[2:] == again[2:]


def test_truncated_corrupt_and_missing_checkpoints_raise_checkpoint_error(tmp_path):
    path = save_checkpoint(tmp_path / "ok.pt", {"w": torch.arange(10_000, dtype=torch.float32)})
    data = path.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.pt").write_bytes(os.urandom(512))
    for name in ("truncated.pt", "garbage.pt", "missing.pt"):
        with pytest.raises(CheckpointError, match=name):
            load_checkpoint(tmp_path / name)
    for cut in range(0, len(data), max(1, len(data) // 25)):  # wherever the write stopped
        (tmp_path / "cut.pt").write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="truncated or corrupt"):
            load_checkpoint(tmp_path / "cut.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="expected a dict"):
        load_checkpoint(tmp_path / "list.pt")


class _Payload:
    """A pickle that runs a shell command when unpickled by a plain unpickler."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("legacy_format", [False, True])
def test_a_checkpoint_that_would_run_a_command_is_refused_unexecuted(tmp_path, legacy_format):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.ones(2)}, "extra": _Payload(marker)}, path,
               _use_new_zipfile_serialization=not legacy_format)
    with pytest.raises(CheckpointError, match="refused") as info:
        load_checkpoint(path)
    assert "system" in str(info.value)  # names the global it refused
    assert not marker.exists()
    manager_dir = tmp_path / "run"
    manager_dir.mkdir()
    os.replace(path, manager_dir / "epoch-0001.pt")
    assert CheckpointManager(manager_dir).latest_valid() is None
    assert not marker.exists()


def _state(epoch: int) -> dict:
    return {"epoch": epoch, "w": torch.full((64,), float(epoch))}


def test_manager_keeps_the_newest_and_an_independent_best(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    for epoch, is_best in ((1, True), (2, True), (3, False), (4, False)):
        manager.save(epoch, _state(epoch), is_best=is_best)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "epoch-0003.pt", "epoch-0004.pt"]
    assert manager.best()["epoch"] == 2
    assert os.stat(manager.best_path).st_ino != os.stat(tmp_path / "epoch-0004.pt").st_ino
    path, state = manager.latest_valid()
    assert path.name == "epoch-0004.pt" and state["epoch"] == 4


def test_manager_skips_a_truncated_newest_checkpoint(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    for epoch in (1, 2, 3):
        manager.save(epoch, _state(epoch))
    newest = tmp_path / "epoch-0003.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    path, state = manager.latest_valid()
    assert path.name == "epoch-0002.pt" and state["epoch"] == 2 and torch.equal(state["w"], torch.full((64,), 2.0))


def test_partial_checkpoints_order_and_cleanup(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    manager.save(1, _state(1))
    manager.save_partial(2, {**_state(2), "step": 5})
    assert manager.latest_valid()[0].name == "epoch-0002-partial.pt"
    manager.save_partial(2, {**_state(2), "step": 9})  # a second preemption in the same epoch replaces it
    assert manager.latest_valid()[1]["step"] == 9
    manager.save(2, _state(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-0001.pt", "epoch-0002.pt"]


def test_saving_an_older_epoch_drops_the_abandoned_later_ones_and_stale_temp_files(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=3)
    for epoch in (1, 2, 3):
        manager.save(epoch, _state(epoch))
    (tmp_path / "epoch-0003.pt").write_bytes(b"truncated")  # resume would fall back to epoch 2 ...
    (tmp_path / ".tmp-epoch-0003.pt.abc123").write_bytes(b"half")  # ... after a kill during a write
    assert manager.latest_valid()[1]["epoch"] == 2
    manager.save(3, _state(3))
    manager.save_partial(4, _state(4))
    manager.save(2, _state(2))  # e.g. a re-run from an older checkpoint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-0001.pt", "epoch-0002.pt"]


def test_empty_or_missing_directory_has_no_checkpoint(tmp_path):
    assert CheckpointManager(tmp_path / "nope").latest_valid() is None
    assert CheckpointManager(tmp_path).best() is None
