"""Model throughput on this machine.

Reports, in one run:
- forward+backward clips/s of the ``tiny`` preset (8 frames x 112 x 112, batch 8, divided attention)
  with PyTorch's fused ``scaled_dot_product_attention`` and with the explicit softmax(QK^T)V path;
- the FLOP/s that training step achieves (FLOPs counted by ``torch.utils.flop_counter``) next to a
  plain fp32 matmul's on the same machine;
- the top operators of one profiled step;
- on a CUDA GPU, the ``base`` preset (TimeSformer-B, 8 x 224) in fp32 and in bf16/fp16 autocast.

Usage: ``python benchmarks/bench_model.py [--rounds 10] [--json out.json]``

The CPU figures of a shared machine are noisy: each round runs both attention paths and a matmul
back to back, and the best round (least disturbed) is reported next to the median.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from deepsports.config import build_config
from deepsports.model import attention_backend, build_model


def machine() -> dict[str, str | int]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, str | int] = {"nproc": os.cpu_count() or 0, "torch_threads": torch.get_num_threads(),
                                  "cpu": cpu, "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _train_step(model: torch.nn.Module, video: torch.Tensor, target: torch.Tensor, dtype: torch.dtype | None) -> None:
    model.zero_grad(set_to_none=True)
    with torch.autocast(video.device.type, dtype=dtype, enabled=dtype is not None):
        loss = torch.nn.functional.mse_loss(model(video).float(), target)
    loss.backward()


def _timed_step(model, video, target, dtype=None) -> float:
    start = time.perf_counter()
    _train_step(model, video, target, dtype)
    _sync(video.device)
    return time.perf_counter() - start


def _timed_matmul(a: torch.Tensor, b: torch.Tensor, repeats: int = 3) -> float:
    """FLOP/s of ``repeats`` products ``a @ b`` (square fp32)."""
    _sync(a.device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(a.device)
    return 2 * a.shape[0] ** 3 * repeats / (time.perf_counter() - start)


def count_step_flops(model, video, target) -> int:
    """FLOPs of one forward+backward step. Counted with the explicit attention: the flop counter has no
    formula for the CPU flash-attention kernel, and both paths do the same arithmetic."""
    with attention_backend("reference"), FlopCounterMode(display=False) as counter:
        _train_step(model, video, target, None)
    return counter.get_total_flops()


def _model(device: torch.device, **overrides):
    torch.manual_seed(0)
    config = build_config({"dropout": [0.0, 0.0], **overrides})
    return build_model(config).model.to(device).train()


def _cpu_steal_ticks() -> int | None:
    try:
        return int(Path("/proc/stat").read_text().split()[8])  # "cpu user nice system idle iowait irq softirq steal"
    except (OSError, IndexError, ValueError):
        return None


def bench_tiny(device: torch.device, rounds: int, batch: int) -> dict[str, float]:
    """Rounds of (SDPA step, explicit step, matmul) interleaved, so a noisy neighbour slows all three alike."""
    model = _model(device, backbone="tiny", frame_num=8, spatial_size=112)
    video = torch.rand(batch, 3, 8, 112, 112, device=device)
    target = torch.rand(batch, 2, device=device)
    a, b = torch.randn(2048, 2048, device=device), torch.randn(2048, 2048, device=device)
    times: dict[str, list[float]] = {"sdpa": [], "reference": []}
    matmul: list[float] = []
    for backend in times:  # warm-up: one-off kernel selection and allocations
        with attention_backend(backend):
            _timed_step(model, video, target)
    _timed_matmul(a, b, 1)
    steal, wall, cpu = _cpu_steal_ticks(), time.perf_counter(), time.process_time()
    for _ in range(rounds):
        for backend, samples in times.items():
            with attention_backend(backend):
                samples.append(_timed_step(model, video, target))
        matmul.append(_timed_matmul(a, b))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    steal_after = _cpu_steal_ticks()
    flops = count_step_flops(model, video, target)
    out: dict[str, float] = {"step_gflop": flops / 1e9}
    for backend, samples in times.items():
        out[f"{backend}_clips_per_s_best"] = batch / min(samples)
        out[f"{backend}_clips_per_s_median"] = batch / statistics.median(samples)
    out["achieved_gflop_per_s_best"] = flops / min(times["sdpa"]) / 1e9
    out["achieved_gflop_per_s_median"] = flops / statistics.median(times["sdpa"]) / 1e9
    out["matmul_gflop_per_s_best"] = max(matmul) / 1e9
    out["matmul_gflop_per_s_median"] = statistics.median(matmul) / 1e9
    out["ratio_to_matmul_best"] = out["achieved_gflop_per_s_best"] / out["matmul_gflop_per_s_best"]
    out["ratio_to_matmul_median"] = out["achieved_gflop_per_s_median"] / out["matmul_gflop_per_s_median"]
    out["spread_sdpa_max_over_min"] = max(times["sdpa"]) / min(times["sdpa"])
    out["cpu_seconds_per_wall_second"] = cpu / wall
    if steal is not None and steal_after is not None:
        out["steal_fraction"] = (steal_after - steal) / 100 / wall / (os.cpu_count() or 1)  # USER_HZ = 100
    return out


def profile_tiny(device: torch.device, batch: int, rows: int = 12) -> str:
    model = _model(device, backbone="tiny", frame_num=8, spatial_size=112)
    video = torch.rand(batch, 3, 8, 112, 112, device=device)
    target = torch.rand(batch, 2, device=device)
    _train_step(model, video, target, None)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        _train_step(model, video, target, None)
        _sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def bench_base_gpu(device: torch.device, steps: int, batch: int) -> dict[str, float]:
    model = _model(device, backbone="base", frame_num=8, spatial_size=224)
    video = torch.rand(batch, 3, 8, 224, 224, device=device)
    target = torch.rand(batch, 2, device=device)
    out = {}
    for name, dtype in (("fp32", None), ("bf16_autocast", torch.bfloat16), ("fp16_autocast", torch.float16)):
        _timed_step(model, video, target, dtype)
        samples = [_timed_step(model, video, target, dtype) for _ in range(steps)]
        out[f"{name}_clips_per_s"] = batch / statistics.median(samples)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds of the tiny preset")
    parser.add_argument("--batch", type=int, default=8, help="clips per step of the tiny preset")
    parser.add_argument("--base-steps", type=int, default=10, help="timed steps per precision of base (GPU only)")
    parser.add_argument("--base-batch", type=int, default=8, help="clips per step of the base preset (GPU only)")
    parser.add_argument("--no-profile", action="store_true", help="skip the profiler table")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results: dict = {"machine": machine(), "device": str(device)}
    print("machine:", ", ".join(f"{k}={v}" for k, v in results["machine"].items()))

    tiny = bench_tiny(device, args.rounds, args.batch)
    results[f"tiny_8x112_batch{args.batch}"] = tiny
    print(f"tiny 8x112x112, batch {args.batch}, forward+backward on {device}, {args.rounds} interleaved rounds "
          "(best / median):")
    print(f"  SDPA attention        {tiny['sdpa_clips_per_s_best']:8.2f} / {tiny['sdpa_clips_per_s_median']:8.2f} clips/s")
    print(f"  explicit softmax      {tiny['reference_clips_per_s_best']:8.2f} / "
          f"{tiny['reference_clips_per_s_median']:8.2f} clips/s")
    print(f"  FLOPs per step        {tiny['step_gflop']:8.1f} GFLOP")
    print(f"  achieved (SDPA)       {tiny['achieved_gflop_per_s_best']:8.1f} / "
          f"{tiny['achieved_gflop_per_s_median']:8.1f} GFLOP/s")
    print(f"  fp32 2048^2 matmul    {tiny['matmul_gflop_per_s_best']:8.1f} / {tiny['matmul_gflop_per_s_median']:8.1f} GFLOP/s")
    print(f"  ratio to matmul       {tiny['ratio_to_matmul_best']:8.2f} / {tiny['ratio_to_matmul_median']:8.2f}")
    print(f"  noise: slowest/fastest SDPA step x{tiny['spread_sdpa_max_over_min']:.1f}, "
          f"CPU s per wall s {tiny['cpu_seconds_per_wall_second']:.2f}, steal {tiny.get('steal_fraction', float('nan')):.1%}")

    if device.type == "cuda":
        base = bench_base_gpu(device, args.base_steps, args.base_batch)
        results[f"base_8x224_batch{args.base_batch}"] = base
        print(f"base 8x224x224, batch {args.base_batch}, forward+backward (median):")
        for name, value in base.items():
            print(f"  {name:28s} {value:8.2f}")
    else:
        print("base 8x224 in fp32 vs bf16/fp16 autocast: skipped (no CUDA GPU)")

    if not args.no_profile:
        print("top operators of one tiny training step:")
        print(profile_tiny(device, args.batch))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
