"""The backbone against its previous token layouts, in one run on one device (CPU or CUDA GPU).

The previous implementation is ``previous_forward`` of ``tests/model/test_model_layout.py`` (class
token split off and concatenated back in every block, einops rearranges, the patch embedding as a
strided conv, q/k/v unbound from a permuted view), run on the same module and weights. Reports:
- the gradients of the two on the same batch in fp32 (TF32 off): relative difference of all of them;
- forward + backward step time of each, interleaved in rounds (best and median, and the median of
  the per-round new/old ratios): ``tiny`` 8 x 112 fp32 on the CPU; on a GPU also ``base`` 8 x 224 in
  bf16 autocast and fp32, the GPU path that must not get worse.

Usage: ``python benchmarks/layout_ab.py [--rounds 10] [--steps 1] [--threads N]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from deepsports.model import TimeSformer, get_preset  # noqa: E402
from tests.model.test_model_layout import previous_forward  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(net, forward, video, weights, dtype) -> None:
    net.zero_grad(set_to_none=True)
    with torch.autocast(video.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        out = forward(net, video)
    (out.float() * weights).sum().backward()


def _timed(net, forward, video, weights, dtype, steps: int) -> float:
    _sync(video.device)
    start = time.perf_counter()
    for _ in range(steps):
        _step(net, forward, video, weights, dtype)
    _sync(video.device)
    return (time.perf_counter() - start) / steps


def compare(preset: str, size: int, device: torch.device, dtype, rounds: int, steps: int, batch: int = 8) -> dict:
    torch.manual_seed(0)
    net = TimeSformer(get_preset(preset), num_frames=8, img_size=size, embed_dim=768).to(device).train()
    gen = torch.Generator().manual_seed(1)
    video = torch.rand(batch, 3, 8, size, size, generator=gen).to(device)
    weights = torch.randn(batch, 768, generator=gen).to(device)
    grads = []
    for forward in (previous_forward, TimeSformer.forward):
        _step(net, forward, video, weights, None)
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    grad_diff = float((grads[1] - grads[0]).norm() / grads[0].norm())
    times: dict[str, list[float]] = {"previous": [], "new": []}
    for forward in (previous_forward, TimeSformer.forward):  # warm-up
        _timed(net, forward, video, weights, dtype, 2)
    for _ in range(rounds):
        times["previous"].append(_timed(net, previous_forward, video, weights, dtype, steps))
        times["new"].append(_timed(net, TimeSformer.forward, video, weights, dtype, steps))
    out = {"preset": preset, "size": size, "dtype": str(dtype or "fp32").replace("torch.", ""), "device": str(device),
           "fp32_grad_rel_diff": grad_diff}
    for name, samples in times.items():
        out[f"{name}_clips_per_s_best"] = batch / min(samples)
        out[f"{name}_clips_per_s_median"] = batch / statistics.median(samples)
    out["new_speed_over_previous"] = statistics.median(p / n for p, n in zip(times["previous"], times["new"]))
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=1, help="steps per timing (use ~10 on a GPU)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    runs = [("tiny", 112, None)]
    if device.type == "cuda":
        print("gpu:", torch.cuda.get_device_name(), "torch", torch.__version__)
        runs = [("base", 224, torch.bfloat16), ("base", 224, None), ("tiny", 112, torch.bfloat16)]
    results = []
    for preset, size, dtype in runs:
        results.append(compare(preset, size, device, dtype, args.rounds, args.steps))
        r = results[-1]
        print(f"{preset} 8x{size} {r['dtype']} on {device}: previous {r['previous_clips_per_s_best']:.2f} / "
              f"{r['previous_clips_per_s_median']:.2f} clips/s, new {r['new_clips_per_s_best']:.2f} / "
              f"{r['new_clips_per_s_median']:.2f} (best / median); new/previous speed {r['new_speed_over_previous']:.3f} "
              f"(median of rounds); fp32 gradients differ by {r['fp32_grad_rel_diff']:.1e} (relative norm)", flush=True)
    return results


if __name__ == "__main__":
    main()
