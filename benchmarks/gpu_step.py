"""How close the GPU training step comes to the card's peak: `python benchmarks/gpu_step.py --json out.json`.

The step is `deepsports train`'s own (``build_model`` + ``GlobalBatchModel`` + ``VideoInput`` on uint8
clips + bf16 autocast + ``aqa_loss`` + the configured optimizer), of the ``base`` preset (TimeSformer-B)
at 8 x 224 unless a variant says otherwise. Each variant changes one thing that could bring the step
closer to the hardware (batch size, a fused optimizer, no host sync per step, ``torch.compile``, CUDA
graphs through compile's ``reduce-overhead``); the table gives clips/s, the achieved TFLOP/s and the
share of the card's dense bf16 peak.

FLOPs are counted, not estimated: ``torch.utils.flop_counter.FlopCounterMode`` over one eager forward +
backward of the same shapes (matmuls, convolutions and the fused SDPA kernels; the optimizer's and the
element-wise work count as zero, so the figure is the model FLOP utilisation, MFU). The peak divided
by is the vendor's dense bf16 figure for the card (H100/H200 SXM: 989.4 TFLOP/s), and, measured in the
same run, an 8192^3 bf16 matmul's rate (what the card really gives a large GEMM).

Without CUDA it says so and exits 0 (not part of `make bench`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

#: Vendor dense (no sparsity) bf16 tensor-core peaks, TFLOP/s (SXM boards).
DENSE_BF16_PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0}


@dataclass(frozen=True)
class Variant:
    name: str
    batch: int = 8
    frames: int = 8
    fused: bool = False
    sync_each_step: bool = True  # what the training loop does today (float(loss) + isfinite per step)
    compile_mode: str | None = None  # None: eager; "default", "max-autotune-no-cudagraphs", "reduce-overhead"
    amsgrad: bool = False


VARIANTS = {v.name: v for v in (
    Variant("loop_b8"),
    Variant("fused_b8", fused=True),
    Variant("fused_nosync_b8", fused=True, sync_each_step=False),
    Variant("fused_b16", batch=16, fused=True),
    Variant("fused_b32", batch=32, fused=True),
    Variant("fused_b64", batch=64, fused=True),
    Variant("compile_b8", fused=True, compile_mode="default"),
    Variant("compile_b32", batch=32, fused=True, compile_mode="default"),
    Variant("compile_nosync_b32", batch=32, fused=True, sync_each_step=False, compile_mode="default"),
    Variant("compile_b64", batch=64, fused=True, compile_mode="default"),
    Variant("compile_b8_48x224", frames=48, amsgrad=True, fused=True, compile_mode="default"),
    Variant("compile_graphs_b8", fused=True, compile_mode="reduce-overhead"),
    # Not yet measured (no GPU lent since they were added): Inductor's GEMM autotuning, and CUDA graphs, at the
    # batch that did best with the default mode.
    Variant("compile_autotune_b64", batch=64, fused=True, compile_mode="max-autotune-no-cudagraphs"),
    Variant("compile_graphs_b64", batch=64, fused=True, compile_mode="reduce-overhead"),
    Variant("best_cfg_48x224_b8", frames=48, amsgrad=True),
    Variant("best_cfg_48x224_b8_fused", frames=48, amsgrad=True, fused=True),
)}


def card_peak() -> tuple[str, float | None]:
    name = torch.cuda.get_device_name()
    for key, peak in DENSE_BF16_PEAK_TFLOPS.items():
        if key in name:
            return name, peak
    return name, None


def matmul_tflops(n: int = 8192, reps: int = 10) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


class Step:
    """One training step as ``deepsports.train.loop._train_epoch`` runs it, parts configurable."""

    def __init__(self, v: Variant, preset: str = "base", size: int = 224, device: str = "cuda"):
        from deepsports.config import build_config
        from deepsports.model import build_model
        from deepsports.train.distributed import GlobalBatchModel
        from deepsports.train.losses import aqa_loss
        from deepsports.train.video_input import VideoInput

        self.v, self.device = v, device
        self.config = build_config({"backbone": preset, "frame_num": v.frames, "spatial_size": size,
                                    "patch_size": 16, "batch_size": v.batch, "amsgrad": v.amsgrad,
                                    "loss_spcoef_weight": 0.1})
        torch.manual_seed(0)
        self.model = build_model(self.config).model.to(device).train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=self.config.weight_decay,
                                           amsgrad=v.amsgrad, fused=v.fused or None)
        self.net = GlobalBatchModel(self.model)
        if v.compile_mode:
            self.net = torch.compile(self.net, mode=None if v.compile_mode == "default" else v.compile_mode)
        self.video_input = VideoInput(True, device)
        gen = torch.Generator().manual_seed(1)
        self.video = torch.randint(0, 256, (v.batch, 3, v.frames, size, size), generator=gen,
                                   dtype=torch.uint8)
        self.target = torch.rand(v.batch, 2, generator=gen) + 0.5
        if device == "cuda":  # as the loader's batches (pin_memory on a GPU run)
            self.video, self.target = self.video.pin_memory(), self.target.pin_memory()
        self.aqa_loss, self.eager_net = aqa_loss, GlobalBatchModel(self.model)
        self.sizes = [v.batch]

    def forward_backward(self) -> torch.Tensor:
        video = self.video_input(self.video)
        target = self.target.to(self.device, non_blocking=True)
        with torch.autocast(self.device, dtype=torch.bfloat16):
            out = self.net(video, self.sizes)
        loss, _ = self.aqa_loss(out.float(), target, self.config.loss_mse_weight, self.config.loss_spcoef_weight)
        if self.v.sync_each_step and not torch.isfinite(loss):
            raise FloatingPointError("non-finite loss")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return loss

    def __call__(self) -> float | torch.Tensor:
        loss = self.forward_backward()
        self.optimizer.step()
        return float(loss.detach()) if self.v.sync_each_step else loss.detach()

    def flops(self) -> int:
        """FLOPs of one eager forward + backward at this variant's shapes (FlopCounterMode)."""
        from torch.utils.flop_counter import FlopCounterMode

        net, self.net = self.net, self.eager_net
        try:
            with FlopCounterMode(display=False) as counter:
                self.forward_backward()
            return counter.get_total_flops()
        finally:
            self.net = net
            self.optimizer.zero_grad(set_to_none=True)


def measure(v: Variant, steps: int, peak: float | None, matmul: float) -> dict:
    torch.cuda.reset_peak_memory_stats()
    step = Step(v)
    flops = step.flops()
    start = time.perf_counter()
    step()  # warm-up (compiles a compiled variant)
    warm_s = time.perf_counter() - start
    for _ in range(4):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    tflops = flops * steps / elapsed / 1e12
    row = {"variant": v.name, "batch": v.batch, "frames": v.frames, "fused_adamw": v.fused,
           "sync_each_step": v.sync_each_step, "compile": v.compile_mode or "eager", "amsgrad": v.amsgrad,
           "clips_per_s": v.batch * steps / elapsed, "step_ms": 1000 * elapsed / steps,
           "tflop_per_clip": flops / v.batch / 1e12, "tflops": tflops,
           "mfu_vs_dense_peak": tflops / peak if peak else None, "vs_matmul": tflops / matmul,
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30, "first_step_s": warm_s}
    del step
    torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {','.join(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=15, help="timed steps per variant [15]")
    parser.add_argument("--json", type=Path, help="also write the figures here (rewritten after each variant)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}; allowed: {', '.join(VARIANTS)}")
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure here (run this on a GPU machine)")
        return 0
    name, peak = card_peak()
    matmul = matmul_tflops()
    report = {"gpu": name, "torch": torch.__version__, "cuda": torch.version.cuda,
              "dense_bf16_peak_tflops": peak, "bf16_matmul_8192_tflops": matmul, "rows": []}
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}), flush=True)
    for n in names:
        try:
            row = measure(VARIANTS[n], args.steps, peak, matmul)
        except Exception as exc:  # noqa: BLE001 - one variant failing (OOM, compile) must not lose the others
            row = {"variant": n, "error": f"{type(exc).__name__}: {str(exc)[:500]}"}
            with contextlib.suppress(Exception):
                torch._dynamo.reset()
            torch.cuda.empty_cache()
        report["rows"].append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
