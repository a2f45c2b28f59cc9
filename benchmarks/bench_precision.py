"""Training and inference speed on the CPU: fp32 against bf16 autocast, with and without
channels_last, per U-Net preset, in one process (the same threads, the same batches).

    python benchmarks/bench_precision.py [--models tiny small] [--patch-px 128] [--threads 2]

A training step is what `gsd-wsi finetune` does for the distance target (forward at t = 0,
dice+ce plus the distance MSE, backward, Adam step); inference is the network's forward pass on
a batch of windows, as `segment` and `evaluate` run it. Each configuration is warmed up, then
timed over ``--repeats`` steps, and the modes are interleaved so that a slow spell of the
machine hits them all. The CPU's bf16 units (AMX, AVX-512 BF16) are listed from /proc/cpuinfo:
without them bf16 is emulated and slower, which is why `gsd_wsi.nn.precision` turns it on only
where they exist.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from machine import cpu_model

from gsd_wsi.nn.losses import DistanceTargetLoss, SegmentationLoss
from gsd_wsi.nn.precision import cpu_bf16_units
from gsd_wsi.nn.unet import UNet, unet_config
from gsd_wsi.targets import DISTANCE_LEVELS

MODES = (("fp32", False, False), ("fp32 channels_last", False, True), ("bf16", True, False),
         ("bf16 channels_last", True, True))


def _step_fn(model: UNet, train: bool, bf16: bool, channels_last: bool, batch: int, patch_px: int):
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    x = torch.randn(batch, 3, patch_px, patch_px).contiguous(memory_format=memory_format)
    t = torch.zeros(batch, dtype=torch.long)
    y = torch.randint(0, 2, (batch, patch_px, patch_px)) + torch.randint(0, DISTANCE_LEVELS, (batch, patch_px, patch_px)) * 0
    loss_fn = DistanceTargetLoss(SegmentationLoss("dice+ce"), DISTANCE_LEVELS)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step() -> None:
        if train:
            model.train()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = model(x, t)
            loss = loss_fn(out.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        else:
            model.eval()
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                model(x, t)
    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["tiny", "small"])
    p.add_argument("--patch-px", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--out", type=Path, default=None, help="Write the figures as JSON here.")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    results = {"cpu": cpu_model(), "bf16_units": cpu_bf16_units(), "threads": args.threads,
               "patch_px": args.patch_px, "batch_size": args.batch_size, "torch": torch.__version__, "rows": []}
    print(f"{results['cpu']}; bf16 units: {', '.join(results['bf16_units']) or 'none'}; {args.threads} thread(s); "
          f"batch {args.batch_size} x {args.patch_px} px")
    for name in args.models:
        for train in (True, False):
            steps = {}
            for label, bf16, channels_last in MODES:
                torch.manual_seed(0)
                steps[label] = _step_fn(UNet(unet_config(name, out_channels=3)), train, bf16, channels_last,
                                        args.batch_size, args.patch_px)
                steps[label]()  # warm-up
            times: dict[str, list[float]] = {label: [] for label in steps}
            for _ in range(args.repeats):
                for label, step in steps.items():
                    started = time.perf_counter()
                    step()
                    times[label].append(time.perf_counter() - started)
            base = statistics.median(times["fp32"])
            for label, values in times.items():
                median = statistics.median(values)
                row = {"model": name, "work": "train step" if train else "inference", "mode": label,
                       "s_per_batch": round(median, 4), "img_per_s": round(args.batch_size / median, 2),
                       "speedup_vs_fp32": round(base / median, 3)}
                results["rows"].append(row)
                print(f"{name:6s} {row['work']:10s} {label:20s} {median * 1000:8.1f} ms/batch  "
                      f"{row['img_per_s']:7.2f} img/s  x{row['speedup_vs_fp32']:.2f} vs fp32")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
