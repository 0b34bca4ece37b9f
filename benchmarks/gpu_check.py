"""GPU checks and figures: run on a CUDA machine (`python benchmarks/gpu_check.py --json gpu.json`).

In one run, on one GPU:
1. torchsort's CUDA kernels: soft ranks and our AQA loss (MSE + soft Spearman) forward and backward on
   the GPU equal the CPU ones (fp32);
2. the real training step (``GlobalBatchModel`` + AQA loss + AdamW, what ``deepsports train`` runs) of
   ``base`` (TimeSformer-B, 8 x 224, batch 8) and ``tiny`` (8 x 112) in fp32 and in bf16 autocast:
   clips/s, the bf16/fp32 ratio and peak memory; bf16's loss next to fp32's on the same batch;
3. SDPA vs the explicit softmax(QK^T)V attention in the bf16 base step.

Without CUDA it says so and exits 0 (it is not part of `make bench`, which runs on the CPU).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def _sync() -> None:
    torch.cuda.synchronize()


def check_torchsort() -> dict:
    import torchsort

    from deepsports.train.losses import aqa_loss

    gen = torch.Generator().manual_seed(0)
    values = torch.randn(4, 64, generator=gen)
    cpu_rank = torchsort.soft_rank(values, regularization_strength=0.1)
    gpu_rank = torchsort.soft_rank(values.cuda(), regularization_strength=0.1).cpu()
    out = {"soft_rank_max_abs_diff": float((cpu_rank - gpu_rank).abs().max())}
    pred, target = torch.rand(16, 2, generator=gen) + 0.5, torch.rand(16, 2, generator=gen) + 0.5
    results = []
    for device in ("cpu", "cuda"):
        p = pred.detach().clone().to(device).requires_grad_()
        loss, _ = aqa_loss(p, target.to(device), 1.0, 1.0)
        loss.backward()
        results.append((float(loss.detach()), p.grad.cpu()))
    out["aqa_loss_cpu"], out["aqa_loss_cuda"] = results[0][0], results[1][0]
    out["aqa_loss_grad_max_abs_diff"] = float((results[0][1] - results[1][1]).abs().max())
    out["ok"] = out["soft_rank_max_abs_diff"] < 1e-4 and abs(results[0][0] - results[1][0]) < 1e-4 \
        and out["aqa_loss_grad_max_abs_diff"] < 1e-4
    return out


def train_step_figures(preset: str, size: int, batch: int, steps: int, dtype: torch.dtype | None,
                       attention: str = "sdpa") -> dict:
    from deepsports.config import build_config
    from deepsports.model import attention_backend, build_model
    from deepsports.train.distributed import GlobalBatchModel
    from deepsports.train.losses import aqa_loss

    config = build_config({"backbone": preset, "frame_num": 8, "spatial_size": size, "patch_size": 16,
                           "batch_size": batch})
    torch.manual_seed(0)
    model = GlobalBatchModel(build_model(config).model).cuda().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    gen = torch.Generator().manual_seed(1)
    video = torch.randn(batch, 3, 8, size, size, generator=gen).cuda()
    target = (torch.rand(batch, 2, generator=gen) + 0.5).cuda()
    torch.cuda.reset_peak_memory_stats()
    first_loss = None

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model(video, [batch])
        loss, _ = aqa_loss(out.float(), target, config.loss_mse_weight, config.loss_spcoef_weight)
        loss.backward()
        optimizer.step()
        return loss

    with attention_backend(attention):
        # The loss on the untouched weights without dropout (whose masks differ between precisions).
        with torch.no_grad(), torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            model.eval()
            out = model(video, [batch])
            model.train()
        first_loss = float(aqa_loss(out.float(), target, config.loss_mse_weight, config.loss_spcoef_weight)[0])
        step()  # warm-up
        for _ in range(2):
            step()
        _sync()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        _sync()
        elapsed = time.perf_counter() - start
    return {"preset": preset, "size": size, "batch": batch, "dtype": str(dtype or "fp32").replace("torch.", ""),
            "attention": attention, "clips_per_s": batch * steps / elapsed, "step_ms": 1000 * elapsed / steps,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30, "first_loss": first_loss}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check here (run this on a GPU machine)")
        return 0
    report: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                    "cuda": torch.version.cuda}
    print(json.dumps(report))
    try:
        report["torchsort"] = check_torchsort()
    except Exception as exc:  # noqa: BLE001 - report and go on with the model figures
        report["torchsort"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    print("torchsort:", json.dumps(report["torchsort"]), flush=True)
    rows = []
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (TF32 would be a third precision)
    torch.backends.cudnn.allow_tf32 = False
    for preset, size in (("base", 224), ("tiny", 112)):
        for dtype in (None, torch.bfloat16):
            try:
                rows.append(train_step_figures(preset, size, 8, args.steps, dtype))
            except Exception as exc:  # noqa: BLE001
                rows.append({"preset": preset, "dtype": str(dtype), "error": f"{type(exc).__name__}: {exc}"})
            print(json.dumps(rows[-1]), flush=True)
            torch.cuda.empty_cache()
    torch.backends.cuda.matmul.allow_tf32 = True
    rows.append(train_step_figures("base", 224, 8, args.steps, None))
    rows[-1]["dtype"] = "fp32+tf32"
    print(json.dumps(rows[-1]), flush=True)
    rows.append(train_step_figures("base", 224, 8, args.steps, torch.bfloat16, attention="reference"))
    print(json.dumps(rows[-1]), flush=True)
    report["train_step"] = rows
    by = {(r["preset"], r["dtype"], r.get("attention")): r for r in rows if "clips_per_s" in r}
    ratios = {}
    for preset in ("base", "tiny"):
        fp32, bf16 = by.get((preset, "fp32", "sdpa")), by.get((preset, "bfloat16", "sdpa"))
        if fp32 and bf16:
            ratios[f"{preset}_bf16_over_fp32"] = bf16["clips_per_s"] / fp32["clips_per_s"]
            ratios[f"{preset}_bf16_vs_fp32_first_loss_rel_diff"] = abs(bf16["first_loss"] - fp32["first_loss"]) / \
                abs(fp32["first_loss"])
    sdpa, ref = by.get(("base", "bfloat16", "sdpa")), by.get(("base", "bfloat16", "reference"))
    if sdpa and ref:
        ratios["base_bf16_sdpa_over_explicit"] = sdpa["clips_per_s"] / ref["clips_per_s"]
    report["ratios"] = ratios
    print("ratios:", json.dumps(ratios, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0 if report["torchsort"].get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
