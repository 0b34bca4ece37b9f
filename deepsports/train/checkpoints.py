"""Atomic, weights-only checkpoints and the RNG state that makes a resumed run repeat itself.

Every checkpoint is written with :func:`deepsports.fileio.atomic_write` (temp file in the target
directory, fsync, ``os.replace``, directory fsync): a reader (or a process resumed after SIGKILL) sees
either the previous complete file or the new complete file, never half of one. Checkpoints are read
only with :func:`deepsports.fileio.read_torch_file` (``torch.load(weights_only=True)``): a pickle that
asks for any callable (``os.system``, a class with ``__reduce__``, ...) is refused before anything runs.

The state dicts written here therefore hold only tensors and plain containers of str/int/float/
bool/None; :func:`capture_rng_state` converts numpy's and Python's RNG states to such values.

Layout of a :class:`CheckpointManager` directory (one writer per directory)::

    epoch-0007.pt          end of epoch 7 (the newest ``keep_last`` are kept)
    epoch-0008-partial.pt  mid-epoch save of epoch 8 (preemption); removed once epoch 8 completes
    best.pt                an independent copy of the best epoch's checkpoint
    run.json               MLflow run id and config, written before the first epoch
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepsports.errors import CheckpointError
from deepsports.fileio import atomic_write, read_torch_file
from deepsports.signals import signals_held

log = logging.getLogger(__name__)

_EPOCH_FILE = re.compile(r"^epoch-(\d{4,})(-partial)?\.pt$")
_TMP_PREFIX = ".tmp-"


def _atomic_write(path: Path, write) -> Path:
    # ".tmp-" temp names: _remove_stale_temp_files removes those of a writer killed mid-write.
    # Ctrl-C/SIGTERM wait until the file is complete: a KeyboardInterrupt inside torch.save tears its zip.
    with signals_held(f"the write of {path}"):
        return atomic_write(path, write, temp_prefix=f"{_TMP_PREFIX}{Path(path).name}.", temp_suffix="",
                            what=f"checkpoint {Path(path).name}")


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` (tensors and plain containers only) to ``path`` atomically."""
    return _atomic_write(Path(path), lambda handle: torch.save(state, handle))


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint onto the CPU with ``weights_only=True``.

    Raises :class:`CheckpointError` naming the file when it is missing, truncated, corrupt, not a
    dict, or holds anything but tensors and plain values (such a pickle is refused unexecuted).
    """
    state = read_torch_file(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {type(state).__name__}, expected a dict of states")
    return state


def _copy_file_atomic(source: Path, target: Path) -> Path:
    def write(handle) -> None:
        with open(source, "rb") as src:
            shutil.copyfileobj(src, handle, length=16 * 1024 * 1024)

    return _atomic_write(target, write)


class CheckpointManager:
    """End-of-epoch, mid-epoch and best checkpoints of one run in one directory (one writer at a time)."""

    def __init__(self, directory: str | os.PathLike, keep_last: int = 2):
        if keep_last < 1:
            raise ValueError(f"keep_last={keep_last} must be >= 1")
        self.directory = Path(directory)
        self.keep_last = keep_last

    @property
    def best_path(self) -> Path:
        return self.directory / "best.pt"

    def epoch_path(self, epoch: int, partial: bool = False) -> Path:
        return self.directory / f"epoch-{epoch:04d}{'-partial' if partial else ''}.pt"

    def checkpoints(self) -> list[tuple[int, bool, Path]]:
        """``(epoch, complete, path)`` of every epoch checkpoint, oldest first (a partial one sorts
        before the complete checkpoint of the same epoch)."""
        if not self.directory.is_dir():
            return []
        found = []
        for path in self.directory.iterdir():
            match = _EPOCH_FILE.match(path.name)
            if match:
                found.append((int(match.group(1)), match.group(2) is None, path))
        return sorted(found)

    def save(self, epoch: int, state: dict[str, Any], is_best: bool = False,
             written: Callable[[], None] | None = None) -> Path:
        """Write ``epoch-NNNN.pt`` (and ``best.pt`` when ``is_best``), then prune.

        Pruning keeps the newest ``keep_last`` complete checkpoints, drops partial checkpoints of
        epochs up to this one, and drops checkpoints of *later* epochs: they belong to an abandoned
        attempt (we resumed from an older one) and must not shadow this one in :meth:`latest_valid`.
        ``written`` is called between the epoch file and ``best.pt`` (tests stop a run there).
        """
        with signals_held(f"the checkpoint of epoch {epoch} in {self.directory}"):  # epoch file, best.pt, pruning
            self._remove_stale_temp_files()
            path = save_checkpoint(self.epoch_path(epoch), state)
            if written is not None:
                written()
            if is_best:
                _copy_file_atomic(path, self.best_path)
            complete = [p for e, done, p in self.checkpoints() if done and e <= epoch]
            doomed = complete[:-self.keep_last]
            doomed += [p for e, done, p in self.checkpoints() if (not done and e <= epoch) or e > epoch]
            for old in doomed:
                old.unlink(missing_ok=True)
        return path

    def restore_best(self, source: Path) -> Path:
        """Copy ``source`` (the best epoch's checkpoint) to ``best.pt`` again: a stop between an epoch file
        and its ``best.pt`` copy left the previous best there. A ``best.pt`` written after ``source`` is that
        copy already and is left alone (a resume needs no room for a second copy)."""
        source, best = Path(source), self.best_path
        with contextlib.suppress(FileNotFoundError):
            if best.stat().st_mtime_ns >= source.stat().st_mtime_ns and best.stat().st_size == source.stat().st_size:
                return best
        self._remove_stale_temp_files()
        return _copy_file_atomic(source, best)

    def save_partial(self, epoch: int, state: dict[str, Any]) -> Path:
        """Write a mid-epoch checkpoint ``epoch-NNNN-partial.pt`` (replaced by the next save of that epoch)."""
        self._remove_stale_temp_files()
        return save_checkpoint(self.epoch_path(epoch, partial=True), state)

    def latest_valid(self) -> tuple[Path, dict[str, Any]] | None:
        """``(path, state)`` of the newest checkpoint that loads, skipping truncated/corrupt ones; None if none."""
        for _epoch, _complete, path in reversed(self.checkpoints()):
            try:
                return path, load_checkpoint(path)
            except CheckpointError as exc:
                log.warning("skipping unusable checkpoint: %s", exc)
        return None

    def best(self) -> dict[str, Any] | None:
        """State of ``best.pt``, or None when no epoch has been saved as best (CheckpointError if corrupt)."""
        return load_checkpoint(self.best_path) if self.best_path.exists() else None

    @property
    def run_record_path(self) -> Path:
        return self.directory / "run.json"

    def record_run(self, run_id: str, config: dict[str, Any]) -> Path:
        """Write ``run.json`` (MLflow run id and config) atomically before the first epoch: a run killed
        before its first checkpoint is then resumed as the same MLflow run instead of left RUNNING."""
        text = json.dumps({"mlflow_run_id": run_id, "config": config}, indent=1, sort_keys=True, default=str)
        return _atomic_write(self.run_record_path, lambda handle: handle.write(text.encode()))

    def recorded_run(self) -> dict[str, Any] | None:
        """``{"mlflow_run_id", "config"}`` from :meth:`record_run`, or None when absent or unreadable."""
        try:
            record = json.loads(self.run_record_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:  # atomic writes make this a foreign or damaged file
            log.warning("ignoring unreadable run record %s: %s", self.run_record_path, exc)
            return None
        if not isinstance(record, dict) or not isinstance(record.get("mlflow_run_id"), str):
            log.warning("ignoring run record %s without an mlflow_run_id", self.run_record_path)
            return None
        return record

    def _remove_stale_temp_files(self) -> None:
        # Temp files of a writer killed mid-write; safe because a directory has one writer.
        if self.directory.is_dir():
            for path in self.directory.glob(f"{_TMP_PREFIX}*"):
                path.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# RNG state
# --------------------------------------------------------------------------------------------

def capture_rng_state() -> dict[str, Any]:
    """torch (CPU and every CUDA device), numpy-global and Python ``random`` states as weights-only-loadable values.

    ``{"torch": ByteTensor, "cuda": [ByteTensor per device], "numpy": {"kind": "MT19937", "keys": int64
    tensor (624,), "pos": int, "has_gauss": int, "cached_gaussian": float}, "python": [version, [625 ints],
    gauss_next]}`` -- numpy arrays are not weights-only-loadable, so the key array travels as a tensor.
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": [int(version), [int(v) for v in internal], gauss_next],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`. CUDA states are restored when this process sees as many devices."""
    torch.set_rng_state(state["torch"])
    cuda_states = state.get("cuda") or []
    if cuda_states:
        if torch.cuda.is_available() and torch.cuda.device_count() == len(cuda_states):
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            log.warning("checkpoint holds %d CUDA RNG state(s) but this process sees %d CUDA device(s); "
                        "CUDA random streams are not restored", len(cuda_states),
                        torch.cuda.device_count() if torch.cuda.is_available() else 0)
    np_state = state["numpy"]
    keys = np.asarray(np_state["keys"].numpy() if hasattr(np_state["keys"], "numpy") else np_state["keys"],
                      dtype=np.uint32)
    np.random.set_state((np_state["kind"], keys, np_state["pos"], np_state["has_gauss"], np_state["cached_gaussian"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
