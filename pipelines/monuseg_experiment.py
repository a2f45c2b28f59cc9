"""The MoNuSeg experiment: does diffusion pretraining help segmentation when labels are few?

    python pipelines/monuseg_experiment.py --out monuseg-exp

Every step is a `gsd-wsi` command, run as a user would, on the fixed split of
pipelines/monuseg_split.json (24 training images, 6 test images, by whole image):

1. `gsd-wsi tile`: the 24 training images (plain TIFFs without a resolution, so a manifest gives
   MoNuSeg's 0.2527 um/px) cut into ``--patch-px`` patches at half-patch stride, no stain
   normalisation (fine-tuning and evaluation see the images as they are). Test images are
   never tiled.
2. `gsd-wsi pretrain`: the U-Net as a denoising diffusion model on those unlabelled patches.
3. `gsd-wsi finetune`, for each target (semantic and distance by default; contour is the third),
   label fraction, seed and start (pretrained or from scratch); its instance post-processing is
   tuned on its validation images.
   Both starts use the same images for a given seed and fraction (validation split and label
   subset depend on the seed only), the same steps and the same settings. An epoch is
   ``--crops`` crops per image at 100 % labels; at fraction f each image gives ``crops / f``
   crops, so every run sees about the same number of crops and optimiser steps.
4. `gsd-wsi evaluate` on the 6 test images (standard protocol: whole images, sliding window).
5. ``OUT/results.md``, ``OUT/results.json`` and ``OUT/results.png``: Dice, AJI, PQ and HD95 as
   mean and sample standard deviation over seeds (each seed's value is its mean over the test
   images), with the pretrained-minus-scratch difference paired by seed.

Interrupted? Run the same command again: finished steps are kept (the tiler skips finished
images, pretraining resumes from its last checkpoint, finished fine-tuning runs and
evaluations are reused, an unfinished fine-tuning run resumes from its last epoch).

Ablations are the same command with other settings and another ``--out`` (``--pretrained-run``
reuses a finished pretraining), e.g. ``--starts scratch --fractions 1 --seeds 0 --model small``
for a capacity row, or ``--body-lr-scale 0.1`` for a pretrained body learning slower.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gsd_wsi import __version__
from gsd_wsi.datasets import read_split_file

log = logging.getLogger("monuseg_experiment")

REPO = Path(__file__).resolve().parent.parent
MONUSEG_MPP = 0.2527  # 40x Aperio scans, as the MoNuSeg organisers state
METRICS = (("dice", "Dice", True), ("aji", "AJI", True), ("pq", "PQ", True), ("hd95_um", "HD95 (um)", False))


@dataclass(frozen=True)
class FinetuneRun:
    target: str         # "semantic", "contour" or "distance"
    start: str          # "pretrained" or "scratch"
    fraction: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.target}_{self.start}_f{round(self.fraction * 100):03d}_s{self.seed}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="Experiment folder (everything is written here).")
    p.add_argument("--data", type=Path, default=REPO.parent / "shared/data/monuseg-train", help="MoNuSeg training set.")
    p.add_argument("--split-file", type=Path, default=REPO / "pipelines/monuseg_split.json")
    p.add_argument("--model", default="tiny", help="U-Net size: tiny, small or base.")
    p.add_argument("--patch-px", type=int, default=128)
    p.add_argument("--init", default="pytorch", help="Weight init of everything trained from scratch.")
    p.add_argument("--pretrain-steps", type=int, default=4000)
    p.add_argument("--pretrain-batch", type=int, default=8)
    p.add_argument("--pretrain-lr", type=float, default=1e-4)
    p.add_argument("--epochs", type=int, default=25, help="Fine-tuning epochs.")
    p.add_argument("--val-every", type=int, default=5, help="Fine-tuning epochs between validations.")
    p.add_argument("--crops", type=int, default=8, help="Crops per image per epoch at 100 %% labels.")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--targets", nargs="+", default=["semantic", "distance"],
                   choices=["semantic", "contour", "distance"], help="distance was ahead of contour on validation.")
    p.add_argument("--starts", nargs="+", default=["pretrained", "scratch"], choices=["pretrained", "scratch"])
    p.add_argument("--loss", default="dice+ce", help="Fine-tuning loss: dice+ce or ss+focal (the method's).")
    p.add_argument("--lr", type=float, default=1e-3, help="Fine-tuning learning rate (of the head, with --body-lr-scale).")
    p.add_argument("--boundary-um", type=float, default=2.0, help="The contour target's boundary band.")
    p.add_argument("--use-top-skip", action="store_true", help="U-Net with the first level's skip (pretrain and scratch).")
    p.add_argument("--body-lr-scale", type=float, default=1.0, help="The pretrained body's learning rate, x --lr.")
    p.add_argument("--freeze-body-epochs", type=int, default=0, help="Epochs training the new head alone first.")
    p.add_argument("--pretrained-run", type=Path, help="A finished `gsd-wsi pretrain` run to use instead of OUT/pretrain.")
    p.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.1])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=2, help="Fine-tuning runs at once; the cores are shared among them.")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda.")
    return p.parse_args(argv)


def run_gsd_wsi(args: list[str], log_path: Path, threads: int | None = None) -> float:
    """Run one `gsd-wsi` command with its output in ``log_path``; returns its wall time in seconds."""
    env = dict(os.environ)
    if threads is not None:
        env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    command = [sys.executable, "-m", "gsd_wsi", *args]
    log.info("$ gsd-wsi %s", " ".join(args))
    started = time.perf_counter()
    with log_path.open("w") as fh:
        fh.write("$ gsd-wsi " + " ".join(args) + "\n")
        fh.flush()
        code = subprocess.call(command, stdout=fh, stderr=subprocess.STDOUT, env=env)
    if code != 0:
        raise SystemExit(f"`gsd-wsi {args[0]}` failed (exit {code}); its output is in {log_path}")
    return time.perf_counter() - started


def tile_training_images(args: argparse.Namespace, out: Path, names: list[str] | None = None,
                         threads: int | None = None, tile_mpp: float = MONUSEG_MPP) -> Path:
    """``out/tiles``: the unlabelled patches that pretraining learns from (the split's training images by default)."""
    names = names if names is not None else json.loads(args.split_file.read_text())["train"]
    images = {p.stem: p for p in (args.data / "images").iterdir()}
    missing = [name for name in names if name not in images]
    if missing:
        raise SystemExit(f"{args.data / 'images'} lacks {len(missing)} training image(s) of the split, e.g. {missing[0]}")
    manifest = out / "train_images.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "slide_id", "mpp"])
        for name in names:
            writer.writerow([images[name].resolve(), name, MONUSEG_MPP])
    tiles = out / "tiles"
    run_gsd_wsi(["tile", str(manifest), "-o", str(tiles), "--mpp", str(tile_mpp), "--tile-px", str(args.patch_px),
             "--stride-px", str(args.patch_px // 2), "--stain", "none"], out / "logs" / "tile.log", threads)
    return tiles


def pretrain(args: argparse.Namespace, out: Path, tiles: Path, threads: int | None = None) -> Path:
    run = out / "pretrain"
    if (run / "model").exists():
        log.info("pretraining already finished: %s", run)
        return run
    command = ["pretrain", str(tiles), "-o", str(run), "--model", args.model, "--image-size", str(args.patch_px),
               *(["--use-top-skip"] if args.use_top_skip else []),
               "--batch-size", str(args.pretrain_batch), "--steps", str(args.pretrain_steps),
               "--lr", str(args.pretrain_lr), "--init", args.init, "--checkpoint-every", "250",
               "--sample-every", str(args.pretrain_steps), "--val-every", "250", "--device", args.device]
    if (run / "config.json").exists():
        command.append("--resume")
    run_gsd_wsi(command, out / "logs" / "pretrain.log", threads)
    return run


def finetune_and_evaluate(args: argparse.Namespace, out: Path, pretrained: Path, run: FinetuneRun,
                          threads: int) -> Path:
    run_dir, eval_dir = out / "finetune" / run.name, out / "eval" / run.name
    if not (run_dir / "last").exists():
        pretrained_args = ["--pretrained", str(pretrained), "--body-lr-scale", str(args.body_lr_scale),
                           "--freeze-body-epochs", str(args.freeze_body_epochs)]
        scratch_args = ["--pretrained", "none", "--model", args.model,
                        "--use-top-skip" if args.use_top_skip else "--no-top-skip"]
        resume = (run_dir / "checkpoint" / "state.pt").exists()
        log_name = f"finetune_{run.name}{'_resumed' if resume else ''}.log"
        run_gsd_wsi(["finetune", str(args.data), "-o", str(run_dir), "--resume" if resume else "--overwrite",
                 *(pretrained_args if run.start == "pretrained" else scratch_args),
                 "--init", args.init, "--patch-px", str(args.patch_px), "--target", run.target,
                 "--class-names", "background,nucleus",
                 "--boundary-um", str(args.boundary_um), "--loss", args.loss, "--lr", str(args.lr),
                 "--label-fraction", str(run.fraction), "--crops-per-image", str(round(args.crops / run.fraction)),
                 "--epochs", str(args.epochs), "--val-every", str(args.val_every), "--batch-size", str(args.batch_size),
                 "--split-file", str(args.split_file), "--mpp", str(MONUSEG_MPP), "--seed", str(run.seed),
                 "--device", args.device], out / "logs" / log_name, threads)
    if not (eval_dir / "metrics.json").exists():
        run_gsd_wsi(["evaluate", str(args.data), "--model", str(run_dir), "-o", str(eval_dir),
                 "--split-file", str(args.split_file), "--subset", "test"], out / "logs" / f"evaluate_{run.name}.log",
                threads)
    return eval_dir


def _mean_std(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    mean = sum(finite) / len(finite)
    # One value has no sample spread: NaN, which the table prints as the mean alone (not "± 0.000").
    std = math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1)) if len(finite) > 1 else math.nan
    return mean, std


def _validation(run_dir: Path) -> dict[str, float | None]:
    """The kept model's validation scores (what settings are chosen on, never the test images)."""
    info = json.loads((run_dir / "model" / "model.json").read_text())
    return {"val_dice": info.get("val_dice"), "val_aji": info.get("val_aji"), "val_pq": info.get("val_pq")}


def summarise(args: argparse.Namespace, out: Path, runs: list[FinetuneRun], timings: dict[str, float]) -> dict[str, Any]:
    """Per (target, fraction, start): each metric's mean and sample std over seeds, and the paired difference."""
    per_run: dict[str, dict[str, float | None]] = {}
    for run in runs:
        summary = json.loads((out / "eval" / run.name / "metrics.json").read_text())["summary"]
        per_run[run.name] = ({key: (summary.get(key) or {}).get("mean") for key, _, _ in METRICS}
                             | _validation(out / "finetune" / run.name))
    table: dict[str, Any] = {}
    for target in args.targets:
        for fraction in args.fractions:
            for start in args.starts:
                values = {key: [per_run[FinetuneRun(target, start, fraction, s).name][key] for s in args.seeds]
                          for key, _, _ in METRICS}
                table[f"{target}/{start}@{fraction:g}"] = {key: dict(zip(("mean", "std"), _mean_std(v)))
                                                           | {"per_seed": v} for key, v in values.items()}
            if set(args.starts) != {"pretrained", "scratch"}:
                continue
            diffs = {}
            for key, _, _ in METRICS:
                pre = table[f"{target}/pretrained@{fraction:g}"][key]["per_seed"]
                scr = table[f"{target}/scratch@{fraction:g}"][key]["per_seed"]
                d = [a - b for a, b in zip(pre, scr) if a is not None and b is not None]
                diffs[key] = dict(zip(("mean", "std"), _mean_std(d))) | {"per_seed": d}
            table[f"{target}/difference@{fraction:g}"] = diffs
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    split = {k: v for k, v in read_split_file(args.split_file).items() if v}
    return {"settings": settings, "gsd_wsi_version": __version__, "split": split, "table": table,
            "per_run": per_run, "wall_s": timings}


def _images(n: int, kind: str) -> str:
    return f"{n} {kind} image{'' if n == 1 else 's'}"


def describe_split(split: dict[str, list[str]]) -> str:
    """What the split file held, test images named: "6 test images (TCGA-..., ...), 24 training images"."""
    test, train, val = split.get("test", []), split.get("train", []), split.get("val", [])
    parts = [f"{_images(len(test), 'test')} ({', '.join(test)})" if test else _images(0, "test"),
             _images(len(train), "training")]
    if val:
        parts.append(_images(len(val), "validation"))
    return ", ".join(parts)


def _row_starts(settings: dict[str, Any]) -> list[str]:
    starts = list(settings["starts"])
    return starts + (["difference"] if set(starts) == {"pretrained", "scratch"} else [])


def _cell(mean: float, std: float, signed: bool) -> str:
    text = f"{mean:+.3f}" if signed else f"{mean:.3f}"
    return text if math.isnan(std) else f"{text} ± {std:.3f}"


def write_markdown(result: dict[str, Any], path: Path) -> None:
    s = result["settings"]
    spread = "mean ± sample std over seeds" if len(s["seeds"]) > 1 else "one seed,"
    title = (f"MoNuSeg, {describe_split(result['split'])}; {s['model']} U-Net, {s['patch_px']}-px patches, "
             f"{s['loss']} lr {s['lr']:g}{', top skip' if s['use_top_skip'] else ''}; {spread} "
             f"{', '.join(map(str, s['seeds']))} (gsd-wsi {result['gsd_wsi_version']}).")
    lines = [title, "",
             "| target | labels | start | " + " | ".join(label for _, label, _ in METRICS) + " |",
             "|---|---|---|" + "---:|" * len(METRICS)]
    for target in s["targets"]:
        for fraction in s["fractions"]:
            for start in _row_starts(s):
                row = result["table"][f"{target}/{start}@{fraction:g}"]
                name = "pretrained − scratch (paired)" if start == "difference" else start
                cells = [_cell(row[k]["mean"], row[k]["std"], signed=start == "difference") for k, _, _ in METRICS]
                lines.append(f"| {target} | {fraction:.0%} | {name} | " + " | ".join(cells) + " |")
    lines += ["", "Higher is better for Dice, AJI and PQ; lower for HD95.", ""]
    path.write_text("\n".join(lines))


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["settings"]
    groups = [(t, f) for t in s["targets"] for f in s["fractions"]]
    starts = [(st, c) for st, c in (("pretrained", "tab:blue"), ("scratch", "tab:grey")) if st in s["starts"]]
    width = 0.7 / len(starts)
    fig, axes = plt.subplots(1, len(METRICS), figsize=(3.4 * len(METRICS), 3.4))
    for ax, (key, label, higher) in zip(axes, METRICS):
        for i, (start, colour) in enumerate(starts):
            xs = [j + (i - (len(starts) - 1) / 2) * width for j in range(len(groups))]
            rows = [result["table"][f"{t}/{start}@{f:g}"][key] for t, f in groups]
            spreads = [0.0 if math.isnan(r["std"]) else r["std"] for r in rows]  # one seed: no error bar
            ax.bar(xs, [r["mean"] for r in rows], width, yerr=spreads, color=colour, capsize=3, label=start)
            for x, r in zip(xs, rows):
                ax.scatter([x] * len(r["per_seed"]), r["per_seed"], s=8, color="black", zorder=3)
        ax.set_xticks(range(len(groups)), [f"{t}\n{f:.0%} labels" for t, f in groups], fontsize=7)
        ax.set_title(f"{label} ({'higher' if higher else 'lower'} is better)", fontsize=9)
    axes[0].legend(fontsize=8)
    seeds = f"{len(s['seeds'])} seed{'s' if len(s['seeds']) > 1 else ''}"
    fig.suptitle(f"MoNuSeg test images ({s['model']} U-Net, {seeds}, gsd-wsi {result['gsd_wsi_version']}); "
                 "dots are single seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    if not args.data.is_dir():
        raise SystemExit(f"{args.data} not found; give the MoNuSeg training set with --data")
    out = args.out
    (out / "logs").mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    pretrained = args.pretrained_run
    if "pretrained" in args.starts and pretrained is None:
        tiles = tile_training_images(args, out)
        timings["tile"] = time.perf_counter() - started
        started = time.perf_counter()
        pretrained = pretrain(args, out, tiles)
        timings["pretrain"] = time.perf_counter() - started
    # Seed-major, so that an experiment cut short still has whole seeds of every row.
    runs = [FinetuneRun(target, start, fraction, seed) for seed in args.seeds for target in args.targets
            for fraction in args.fractions for start in args.starts]
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    started = time.perf_counter()
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda r: finetune_and_evaluate(args, out, pretrained, r, threads), runs))
    timings["finetune_and_evaluate"] = time.perf_counter() - started
    result = summarise(args, out, runs, timings)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result, out / "results.md")
    plot(result, out / "results.png")
    log.info("results: %s, %s, %s", out / "results.md", out / "results.json", out / "results.png")
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
