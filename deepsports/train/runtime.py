"""Process-level set-up for training: logging, seeding, device and precision choice."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from deepsports.config import Config
from deepsports.train.video_input import VideoInput

log = logging.getLogger(__name__)


def _package_logger() -> logging.Logger:
    """The root of every module's logger (``deepsports``): the one this module configures."""
    return logging.getLogger(__name__.partition(".")[0])


def setup_logging(level: str) -> None:
    """Configure the ``deepsports`` logger once (the CLI and library share it)."""
    logger = _package_logger()
    logger.setLevel(level)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
    # MLflow's system-metrics monitor reports its start, stop and "no GPU" at INFO on every run.
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)


def warnings_only() -> None:
    """Raise the ``deepsports`` logger to WARNING at least (the ranks other than 0 only warn)."""
    logger = _package_logger()
    logger.setLevel(max(logging.WARNING, logger.level))


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch; optionally switch torch to deterministic algorithms."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    device_name: str
    amp_dtype: torch.dtype | None  # None = full fp32
    use_grad_scaler: bool
    normalize: bool  # config.normalize: the loader's uint8 clips are scaled (and normalised) on the device

    @functools.cached_property
    def video_input(self) -> VideoInput:
        """uint8 (B, C, T, H, W) batch -> the model's float32 input on :attr:`device`."""
        return VideoInput(self.normalize, self.device)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)


def select_runtime(config: Config, device: torch.device | None = None) -> Runtime:
    """Pick the device (``gpu: true`` uses CUDA when present) and the autocast dtype."""
    if device is None:
        if config.gpu and torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            if config.gpu:
                log.warning("gpu=true but no CUDA device is available: training on the CPU")
            device = torch.device("cpu")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu ({torch.get_num_threads()} threads)"
    precision = config.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu" and precision == "fp16":
        log.warning("precision=fp16 is not supported on the CPU: using fp32")
        precision = "fp32"
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return Runtime(device=device, device_name=name, amp_dtype=amp, use_grad_scaler=precision == "fp16",
                   normalize=config.normalize)
