"""Pretraining train-step throughput (img/s) at 256 px, side by side in one run.

    python benchmarks/bench_pretrain.py [--sizes tiny small base] [--steps 4] [--out bench-out]

For each U-Net size, on random input in [-1, 1] (the data pipeline is measured apart: it
reads 650-880 patches/s per process, far above these rates):

- reference: a plain fp32 eager loop over the same network and P2 loss with Adam, one
  process with every core's threads (what the reference code does);
- gsd-wsi, 1 process: `DiffusionTrainer.train_step` (P2 loss, Adam, EMA, divergence check), all threads;
- gsd-wsi, N processes: DDP over gloo, one thread per process, the same batch per process.

On a GPU (when one is present) it adds the base model in fp32 eager against bf16 autocast
+ channels_last + torch.compile.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from gsd_wsi.nn.schedule import NoiseSchedule, ScheduleConfig
from gsd_wsi.nn.unet import UNet, unet_config
from gsd_wsi.train.pretrain_config import PretrainConfig
from gsd_wsi.train.ddp import DistContext, init_distributed, launch, teardown
from gsd_wsi.train.pretrain_loop import DiffusionTrainer, p2_loss

IMAGE_PX = 256


def reference_loop(size: str, batch: int, steps: int, warmup: int, device: torch.device) -> float:
    """The reference's training step: fp32, eager, Adam, P2-weighted eps loss; no extras."""
    torch.manual_seed(0)
    model = UNet(unet_config(size)).to(device)
    schedule = NoiseSchedule(ScheduleConfig())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    x0 = torch.rand(batch, 3, IMAGE_PX, IMAGE_PX, device=device) * 2 - 1
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            start = time.perf_counter()
        t = schedule.sample_timesteps(batch, device=device)
        eps = torch.randn_like(x0)
        loss = p2_loss(eps, model(schedule.add_noise(x0, eps, t), t), schedule.p2_weight(t).to(device), "mean")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    _sync(device)
    return batch * steps / (time.perf_counter() - start)


def gsd_loop(config: PretrainConfig, steps: int, warmup: int, ctx: DistContext) -> float:
    torch.manual_seed(0)
    loop = DiffusionTrainer(ctx, config, UNet(unet_config(config.model)), NoiseSchedule(ScheduleConfig()))
    x0 = torch.rand(config.batch_size, 3, IMAGE_PX, IMAGE_PX, device=ctx.device) * 2 - 1
    for i in range(warmup + steps):
        if i == warmup:
            _sync(ctx.device)
            start = time.perf_counter()
        loop.train_step(x0)
    _sync(ctx.device)
    return config.batch_size * ctx.world_size * steps / (time.perf_counter() - start)


def _ddp_worker(config: PretrainConfig, steps: int, warmup: int, out: Path) -> None:
    ctx = init_distributed("cpu")
    try:
        rate = gsd_loop(config, steps, warmup, ctx)
        if ctx.is_main:
            out.write_text(json.dumps({"img_per_s": rate}))
    finally:
        teardown()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small", "base"])
    parser.add_argument("--batch", type=int, default=2, help="images per process and step")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    cpu = torch.device("cpu")
    rows = []
    for size in args.sizes:
        torch.set_num_threads(cores)
        n_params = sum(p.numel() for p in UNet(unet_config(size)).parameters()) / 1e6
        ref = reference_loop(size, args.batch, args.steps, args.warmup, cpu)
        config = PretrainConfig(model=size, batch_size=args.batch, precision="fp32", channels_last=False)
        ours_1 = gsd_loop(config, args.steps, args.warmup, DistContext(0, 0, 1, cpu))
        with tempfile.TemporaryDirectory() as tmp:
            result = Path(tmp) / "ddp.json"
            launch(cores, _ddp_worker, config, args.steps, args.warmup, result)
            ours_n = json.loads(result.read_text())["img_per_s"]
        rows.append((size, n_params, ref, ours_1, ours_n))
        print(f"{size:5s} {n_params:6.2f} M  reference {ref:6.2f}  gsd-wsi 1x{cores}T {ours_1:6.2f}  "
              f"gsd-wsi {cores}x1T DDP {ours_n:6.2f} img/s", flush=True)
    lines = [
        f"Machine: {platform.machine()}, {cores} cores, torch {torch.__version__}; {IMAGE_PX} px, batch {args.batch} "
        f"per process, best effort over {args.steps} steps after {args.warmup} warm-up",
        "",
        f"| model | params (M) | reference loop, 1 process x {cores} threads | gsd-wsi, 1 process x {cores} threads "
        f"| gsd-wsi DDP, {cores} processes x 1 thread | DDP / reference |",
        "|---|---:|---:|---:|---:|---:|",
        *[f"| {s} | {p:.2f} | {r:.2f} | {o1:.2f} | {on:.2f} | {on / r:.2f} |" for s, p, r, o1, on in rows],
    ]
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_pretrain.json").write_text(json.dumps(
        {"rows": [dict(zip(("model", "params_m", "reference", "gsd_1proc", "gsd_ddp"), r)) for r in rows]}, indent=2))
    if torch.cuda.is_available():
        gpu_table(args)


def gpu_table(args: argparse.Namespace) -> None:
    """The base model on one GPU: fp32 eager against bf16 autocast + channels_last + compile."""
    ctx = DistContext(0, 0, 1, torch.device("cuda"))
    batch = 8
    cases = {
        "fp32 eager": PretrainConfig(model="base", batch_size=batch, precision="fp32", channels_last=False),
        "bf16 + channels_last": PretrainConfig(model="base", batch_size=batch, precision="bf16", channels_last=True),
        "bf16 + channels_last + compile": PretrainConfig(model="base", batch_size=batch, precision="bf16",
                                                         channels_last=True, compile=True),
    }
    print(f"\n| base on {torch.cuda.get_device_name()} (batch {batch}, 256 px) | img/s |\n|---|---:|")
    for name, config in cases.items():
        rate = gsd_loop(config, steps=max(args.steps, 20), warmup=5, ctx=ctx)
        print(f"| {name} | {rate:.1f} |", flush=True)


if __name__ == "__main__":
    main()
