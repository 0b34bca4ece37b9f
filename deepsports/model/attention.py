"""Multi-head self-attention and the switch between its two kernels.

Every attention of the backbone goes through :func:`attend`, which calls PyTorch's
``scaled_dot_product_attention`` (flash / memory-efficient kernels on GPUs, a fused kernel on
CPUs). The explicit ``softmax(QK^T / sqrt(d)) V`` path exists only so benchmarks can measure what
the fused kernel buys; select it with :func:`attention_backend`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_BACKENDS = ("sdpa", "reference")

_backend = "sdpa"


@contextlib.contextmanager
def attention_backend(name: str) -> Iterator[None]:
    """Use ``name`` ("sdpa" or "reference") for every :func:`attend` call inside the block."""
    global _backend
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {name!r} is not one of {ATTENTION_BACKENDS}")
    previous, _backend = _backend, name
    try:
        yield
    finally:
        _backend = previous


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention of ``q`` over ``k``/``v``, each ``(..., heads, L, head_dim)``; returns ``q``'s shape."""
    if _backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    weights = torch.softmax((q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1])), dim=-1)
    return weights @ v


class Attention(nn.Module):
    """Multi-head self-attention over a token sequence; parameter names follow timm/TimeSformer (qkv, proj)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, L, D) -> (N, L, D)``: every one of the N sequences attends within itself."""
        # The fused qkv output is laid out (three, heads, head_dim) along D, as in the official weights.
        # Unbinding dim 2 of that view (not dim 0 of a permuted one) lets the backward pass stack the
        # q/k/v gradients straight into the qkv layout: one copy instead of a stack plus a reshape copy.
        seqs, length = x.shape[:2]
        q, k, v = (t.transpose(1, 2) for t in self.qkv(x).view(seqs, length, 3, self.num_heads, -1).unbind(2))
        out = attend(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(seqs, length, -1))
