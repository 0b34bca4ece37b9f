"""uint8 clips from the DataLoader -> the model's float32 input, converted on the training device.

The dataset yields uint8 (B, C, T, H, W) batches (:class:`deepsports.data.ClipDataset`): collation,
pinning and the host -> device copy move a quarter of the bytes of float32, and the conversion runs
where the compute is. The arithmetic is the dataset's former one, ``float32(x) * scale + bias`` with
the float32 constants of :func:`deepsports.data.dataset.input_affine`, as two rounded operations (no
fused multiply-add), so on the CPU the result is bit for bit what the dataset used to return.
"""

from __future__ import annotations

import torch

from deepsports.data.dataset import input_affine
from deepsports.errors import DataError


class VideoInput(torch.nn.Module):
    """``forward(uint8 (B, C, T, H, W))`` -> float32 on ``device``: x / 255, then (- mean) / std with ``normalize``.

    A float tensor is taken as already converted and only moved, so callers holding float clips
    (older code, model signatures) keep working.
    """

    def __init__(self, normalize: bool, device: torch.device | str = "cpu") -> None:
        super().__init__()
        scale, bias = input_affine(normalize)
        self.normalize = normalize
        self.register_buffer("scale", torch.from_numpy(scale).view(1, 3, 1, 1, 1).to(device), persistent=False)
        self.register_buffer("bias", torch.from_numpy(bias).view(1, 3, 1, 1, 1).to(device), persistent=False)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        video = video.to(self.scale.device, non_blocking=True)
        if video.is_floating_point():
            return video
        if video.dtype != torch.uint8 or video.dim() != 5 or video.shape[1] != 3:
            raise DataError(f"expected a uint8 (B, 3, T, H, W) clip batch, got {video.dtype} {tuple(video.shape)}")
        return video.to(torch.float32).mul_(self.scale).add_(self.bias)
