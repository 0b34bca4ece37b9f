"""Model throughput on this machine.

Reports, in one run:
- forward+backward clips/s of the ``tiny`` preset (8 frames x 112 x 112, batch 8, divided attention)
  with PyTorch's fused ``scaled_dot_product_attention`` and with the explicit softmax(QK^T)V path;
- the FLOP/s that training step achieves (FLOPs counted by ``torch.utils.flop_counter``) next to a
  plain fp32 matmul's on the same machine;
- the same step in bf16 autocast (``precision: bf16``) where the device has bf16 kernels (a CPU with
  AVX-512 BF16 / AMX, or a GPU), next to a bf16 matmul;
- each GEMM of the step on its own (forward, input gradient, weight gradient) at the step's shapes, warm
  and with its operands evicted from L2, as a fraction of the square matmul's FLOP/s (``--gemm-shapes``);
- ``torch.compile`` (Inductor) of the same step (``--compile [max-autotune]``: ~30 s of compiling on 2 CPU cores);
- the top operators of one profiled step;
- on a CUDA GPU, the ``base`` preset (TimeSformer-B, 8 x 224) in fp32 and in bf16/fp16 autocast.

Usage: ``python benchmarks/bench_model.py [--rounds 10] [--gemm-shapes] [--compile [max-autotune]] [--json out.json]``

The CPU figures of a shared machine are noisy: each round runs both attention paths and a matmul
back to back, and the best round (least disturbed) is reported next to the median.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
from _common import finish, machine, print_machine  # noqa: E402 - also puts the repo on sys.path
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from deepsports.config import build_config
from deepsports.model import attention_backend, build_model
from deepsports.model.presets import get_preset


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
    """FLOP/s of ``repeats`` products ``a @ b`` (square)."""
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


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 autocast runs on bf16 kernels here (not an emulation slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def bench_tiny(device: torch.device, rounds: int, batch: int, compile_mode: str | None = None) -> dict[str, float]:
    """Rounds of (SDPA step, explicit step, [bf16 step], [compiled step], matmuls) interleaved, so a noisy
    neighbour slows them all alike."""
    model = _model(device, backbone="tiny", frame_num=8, spatial_size=112)
    video = torch.rand(batch, 3, 8, 112, 112, device=device)
    target = torch.rand(batch, 2, device=device)
    a, b = torch.randn(2048, 2048, device=device), torch.randn(2048, 2048, device=device)
    bf16 = bf16_supported(device)
    a16, b16 = (a.bfloat16(), b.bfloat16()) if bf16 else (a, b)  # the bf16 matmul runs only when bf16 does
    # (name, attention backend, autocast dtype, module)
    variants = [("sdpa", "sdpa", None, model), ("reference", "reference", None, model)]
    if bf16:
        variants.append(("bf16", "sdpa", torch.bfloat16, model))
    if compile_mode is not None:
        variants.append(("compiled", "sdpa", None, torch.compile(model, mode=compile_mode)))
    times: dict[str, list[float]] = {name: [] for name, *_ in variants}
    matmul: list[float] = []
    matmul16: list[float] = []
    first: dict[str, float] = {}
    for name, backend, dtype, module in variants:  # warm-up: kernel selection, allocations, compiling
        with attention_backend(backend):
            first[name] = _timed_step(module, video, target, dtype)
            _timed_step(module, video, target, dtype)
    _timed_matmul(a, b, 1)
    if bf16:
        _timed_matmul(a16, b16, 1)
    steal, wall, cpu = _cpu_steal_ticks(), time.perf_counter(), time.process_time()
    for _ in range(rounds):
        for name, backend, dtype, module in variants:
            with attention_backend(backend):
                times[name].append(_timed_step(module, video, target, dtype))
        matmul.append(_timed_matmul(a, b))
        if bf16:
            matmul16.append(_timed_matmul(a16, b16))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    steal_after = _cpu_steal_ticks()
    flops = count_step_flops(model, video, target)
    out: dict[str, float] = {"step_gflop": flops / 1e9}
    for name, samples in times.items():
        out[f"{name}_clips_per_s_best"] = batch / min(samples)
        out[f"{name}_clips_per_s_median"] = batch / statistics.median(samples)
    out["achieved_gflop_per_s_best"] = flops / min(times["sdpa"]) / 1e9
    out["achieved_gflop_per_s_median"] = flops / statistics.median(times["sdpa"]) / 1e9
    out["matmul_gflop_per_s_best"] = max(matmul) / 1e9
    out["matmul_gflop_per_s_median"] = statistics.median(matmul) / 1e9
    out["ratio_to_matmul_best"] = out["achieved_gflop_per_s_best"] / out["matmul_gflop_per_s_best"]
    out["ratio_to_matmul_median"] = out["achieved_gflop_per_s_median"] / out["matmul_gflop_per_s_median"]
    for name in ("bf16", "compiled"):
        if name not in times:
            continue
        out[f"{name}_first_step_s"] = first[name]  # includes compiling (less when Inductor's cache has it)
        # Against the fp32 matmul (the target's yardstick) and, for bf16, against a bf16 matmul.
        out[f"{name}_ratio_to_fp32_matmul_best"] = flops / min(times[name]) / max(matmul)
        out[f"{name}_ratio_to_fp32_matmul_median"] = flops / statistics.median(times[name]) / statistics.median(matmul)
        out[f"{name}_speedup_over_fp32_median"] = statistics.median(times["sdpa"]) / statistics.median(times[name])
    if matmul16:
        out["bf16_matmul_gflop_per_s_best"] = max(matmul16) / 1e9
        out["bf16_ratio_to_bf16_matmul_best"] = flops / min(times["bf16"]) / max(matmul16)
    out["spread_sdpa_max_over_min"] = max(times["sdpa"]) / min(times["sdpa"])
    out["cpu_seconds_per_wall_second"] = cpu / wall
    if steal is not None and steal_after is not None:
        out["steal_fraction"] = (steal_after - steal) / 100 / wall / (os.cpu_count() or 1)  # USER_HZ = 100
    return out


def gemm_shapes(device: torch.device, batch: int, repeats: int = 15) -> list[dict[str, float | str]]:
    """Each linear layer of the tiny step on its own, at the step's shapes (rows = the patch tokens of
    ``batch`` clips of 8 x 112 x 112): forward ``X W^T + b``, input gradient ``dY W`` and weight gradient
    ``dY^T X``, warm (same operands again) and cold (a buffer larger than the L2 cache streamed before
    each product), each as a fraction of the square fp32 matmul timed in the same call."""
    config = build_config({"backbone": "tiny"})
    preset = get_preset("tiny")
    width, hidden = preset.width, int(preset.width * preset.mlp_ratio)
    rows = batch * 8 * (112 // config.patch_size) ** 2
    shapes = {"qkv": (width, 3 * width), "attention proj": (width, width), "mlp fc1": (width, hidden),
              "mlp fc2": (hidden, width)}
    evict = torch.empty(64 * 2**20 // 4, device=device)  # 64 MB: 16x this machine's L2 per core

    def rate(fn, flop: int, cold: bool) -> float:
        samples = []
        for _ in range(repeats):
            if cold:
                evict.add_(1.0)
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            samples.append(time.perf_counter() - start)
        return flop / statistics.median(samples)

    a, b = torch.randn(2048, 2048, device=device), torch.randn(2048, 2048, device=device)
    rate(lambda: a @ b, 1, False)
    square = rate(lambda: a @ b, 2 * 2048**3, False)
    table = []
    for name, (k, n) in shapes.items():
        x, w, bias = torch.randn(rows, k, device=device), torch.randn(n, k, device=device), torch.randn(n, device=device)
        dy = torch.randn(rows, n, device=device)
        flop = 2 * rows * k * n
        products = {"forward": lambda x=x, w=w, bias=bias: torch.nn.functional.linear(x, w, bias),
                    "input grad": lambda dy=dy, w=w: dy @ w, "weight grad": lambda dy=dy, x=x: dy.t() @ x}
        for cold in (False, True):
            row: dict[str, float | str] = {"layer": name, "shape": f"{rows}x{k} @ {k}x{n}",
                                           "operands": "evicted from L2" if cold else "warm"}
            for product, fn in products.items():
                row[product] = rate(fn, flop, cold) / square
            table.append(row)
    table.append({"layer": "square matmul", "shape": "2048x2048 @ 2048x2048", "operands": "warm",
                  "gflop_per_s": square / 1e9})
    for cold in (False, True):  # all linear products of the step, FLOP-weighted: time = sum(flop / rate)
        rows_ = [r for r in table[:-1] if (r["operands"] != "warm") == cold]
        weights = [2 * rows * shapes[str(r["layer"])][0] * shapes[str(r["layer"])][1] for r in rows_]
        time_units = sum(w / float(r[product]) for w, r in zip(weights, rows_)
                         for product in ("forward", "input grad", "weight grad"))
        table[-1]["all_linear_" + ("evicted" if cold else "warm")] = 3 * sum(weights) / time_units
    return table


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
    parser.add_argument("--gemm-shapes", action="store_true",
                        help="also time each GEMM of the step on its own against the square matmul")
    parser.add_argument("--compile", nargs="?", const="default", choices=("default", "max-autotune"), default=None,
                        help="also time the step compiled with torch.compile (Inductor) in this mode "
                             "(~30 s to compile on 2 cores)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results: dict = {"machine": machine(), "device": str(device)}
    print_machine(results["machine"])

    tiny = bench_tiny(device, args.rounds, args.batch, compile_mode=args.compile)
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
    for name, label in (("bf16", "bf16 autocast"), ("compiled", f"torch.compile {args.compile}")):
        if f"{name}_clips_per_s_best" in tiny:
            print(f"  {label:21s} {tiny[f'{name}_clips_per_s_best']:8.2f} / {tiny[f'{name}_clips_per_s_median']:8.2f} clips/s, "
                  f"{tiny[f'{name}_speedup_over_fp32_median']:.2f}x fp32 (median); FLOP/s vs fp32 matmul "
                  f"{tiny[f'{name}_ratio_to_fp32_matmul_best']:.2f} / {tiny[f'{name}_ratio_to_fp32_matmul_median']:.2f}; "
                  f"first step {tiny[f'{name}_first_step_s']:.1f} s")
    if "bf16_matmul_gflop_per_s_best" in tiny:
        print(f"  bf16 2048^2 matmul    {tiny['bf16_matmul_gflop_per_s_best']:8.1f} GFLOP/s best; bf16 step vs it "
              f"{tiny['bf16_ratio_to_bf16_matmul_best']:.2f}")
    elif device.type == "cpu":
        print("  bf16 autocast: skipped (this CPU has no bf16 kernels: AVX-512 BF16 / AMX)")
    print(f"  noise: slowest/fastest SDPA step x{tiny['spread_sdpa_max_over_min']:.1f}, "
          f"CPU s per wall s {tiny['cpu_seconds_per_wall_second']:.2f}, steal {tiny.get('steal_fraction', float('nan')):.1%}")

    if args.gemm_shapes:
        table = gemm_shapes(device, args.batch)
        results["gemm_shapes"] = table
        print(f"each GEMM of the tiny step alone, fraction of the square fp32 matmul "
              f"({table[-1]['gflop_per_s']:.1f} GFLOP/s), median of 15:")
        for row in table[:-1]:
            print(f"  {row['layer']:15s} {row['shape']:20s} {row['operands']:16s} forward {row['forward']:.2f}  "
                  f"input grad {row['input grad']:.2f}  weight grad {row['weight grad']:.2f}")
        print(f"  all linear products, FLOP-weighted: {table[-1]['all_linear_warm']:.2f} warm, "
              f"{table[-1]['all_linear_evicted']:.2f} evicted: the step's ceiling vs the matmul if nothing else took time")

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
    finish(results, args.json)
    return results


if __name__ == "__main__":
    main()
