"""Train the built-in nuclei models from ../shared/data, score them, and install them in the package.

    python pipelines/nuclei_model.py --out nuclei-runs                 # 40x and 20x, then install
    python pipelines/nuclei_model.py --out nuclei-runs --resolutions 40x --no-install

For each resolution (40x: MoNuSeg's own 0.2527 um/px; 20x: the images brought to 0.5 um/px by
`finetune --train-mpp`), every step is a `gsd-wsi` command with the one recipe of
docs/models.md:

1. ``split_<res>``: `finetune` on pipelines/monuseg_split.json's 24 training images, 5 of them
   held out for validation (seed 0): the learning curve, the validation scores and the
   instance post-processing tuned on the validation images with XML outlines.
2. ``eval_split_<res>[_tta]``: `evaluate` of that model on the split's 6 test images, without
   and with test-time augmentation (never used to choose anything).
3. ``all_<res>``: `finetune` with the same recipe on all 30 training images (no validation
   images left, so the same number of optimiser steps is the stopping rule).
4. Install: ``gsd_wsi/zoo/nuclei-<res>/`` gets the all-image model's weights and model.json,
   with the post-processing tuned in step 1, and a ``"builtin"`` record: name, family,
   licence, the validation and own-split test scores of step 1 and 2, and this command.

Interrupted? Run the same command again: finished runs are kept and an unfinished one resumes
from its last epoch (`finetune --resume`).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from monuseg_experiment import MONUSEG_MPP, pretrain, run_gsd_wsi, tile_training_images

from gsd_wsi import __version__

log = logging.getLogger("nuclei_model")

REPO = Path(__file__).resolve().parent.parent
LICENCE = "CC BY-NC-SA 4.0"  # MoNuSeg's, which trained weights carry
TRAIN_MPP = {"40x": None, "20x": 0.5}
SPLIT_TRAIN_IMAGES, ALL_IMAGES, VAL_FRACTION = 24, 30, 0.2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="Folder for the runs, logs and evaluations.")
    p.add_argument("--data", type=Path, default=REPO.parent / "shared/data/monuseg-train", help="MoNuSeg training set.")
    p.add_argument("--split-file", type=Path, default=REPO / "pipelines/monuseg_split.json")
    p.add_argument("--resolutions", nargs="+", default=["40x", "20x"], choices=sorted(TRAIN_MPP))
    p.add_argument("--steps", type=int, nargs="+", default=[2000, 1500],
                   help="Optimiser steps per resolution, in the order of --resolutions.")
    p.add_argument("--model", default="tiny", help="U-Net size.")
    p.add_argument("--start", choices=("scratch", "pretrained"), default="scratch",
                   help="Fine-tune from scratch, or from a `gsd-wsi pretrain` run on the unlabelled pixels of each "
                        "run's own training images (the split's 24, or all 30; never a test image).")
    p.add_argument("--pretrain-steps", type=int, default=4000)
    p.add_argument("--pretrain-batch", type=int, default=8)
    p.add_argument("--pretrain-lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--patch-px", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--crops", type=int, default=8, help="Crops per image per epoch.")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="The installed models' default test-time augmentation [what scored higher on validation].")
    p.add_argument("--threads", type=int, default=None, help="Threads per gsd-wsi process.")
    p.add_argument("--install", action=argparse.BooleanOptionalAction, default=True,
                   help="Write the models into gsd_wsi/zoo/ (the package's built-in models).")
    p.add_argument("--ship", choices=("all", "split"), default="all",
                   help="Install the model trained on all 30 images (all) or the split run's own (split: "
                        "19 training images, no third run; quicker, weaker).")
    args = p.parse_args(argv)
    args.init, args.use_top_skip, args.device = "pytorch", False, "auto"  # what monuseg_experiment's pretrain reads
    if len(args.steps) != len(args.resolutions):
        p.error(f"--steps needs one value per resolution ({len(args.resolutions)})")
    return args


def recipe(args: argparse.Namespace, resolution: str) -> list[str]:
    """The finetune options both runs of a resolution share (the recipe of docs/models.md), less the start."""
    options = ["--patch-px", str(args.patch_px), "--target", "distance",
               "--class-names", "background,nucleus", "--loss", "dice+ce", "--lr", str(args.lr),
               "--lr-schedule", "cosine", "--warmup-steps", str(args.warmup_steps),
               "--crops-per-image", str(args.crops), "--batch-size", str(args.batch_size),
               "--mpp", str(MONUSEG_MPP), "--seed", str(args.seed)]
    if TRAIN_MPP[resolution] is not None:
        options += ["--train-mpp", str(TRAIN_MPP[resolution])]
    return options


def start_options(args: argparse.Namespace, resolution: str, run: str, names: list[str]) -> list[str]:
    """``--pretrained``: none, or a pretraining (at the run's resolution) on ``names``, done once per run."""
    if args.start == "scratch":
        return ["--pretrained", "none", "--model", args.model]
    out = args.out / f"pretrain_{run}_{resolution}"
    (out / "logs").mkdir(parents=True, exist_ok=True)
    if not (out / "pretrain" / "model").exists():
        tile_training_images(args, out, names, args.threads, TRAIN_MPP[resolution] or MONUSEG_MPP)
    return ["--pretrained", str(pretrain(args, out, out / "tiles", args.threads))]


def epochs_for(steps: int, images: int, args: argparse.Namespace) -> int:
    return max(1, round(steps / (images * args.crops // args.batch_size)))


def finetune(args: argparse.Namespace, run_dir: Path, options: list[str], log_name: str) -> None:
    if (run_dir / "last").exists():
        return
    resume = (run_dir / "checkpoint" / "state.pt").exists()
    run_gsd_wsi(["finetune", str(args.data), "-o", str(run_dir), "--resume" if resume else "--overwrite", *options],
                args.out / "logs" / f"{log_name}{'_resumed' if resume else ''}.log", args.threads)


def evaluate(args: argparse.Namespace, model: Path, out: Path, tta: bool) -> dict[str, Any]:
    if not (out / "metrics.json").exists():
        run_gsd_wsi(["evaluate", str(args.data), "--model", str(model), "-o", str(out), "--split-file",
                     str(args.split_file), "--subset", "test", "--tta" if tta else "--no-tta"],
                    args.out / "logs" / f"{out.name}.log", args.threads)
    summary = json.loads((out / "metrics.json").read_text())["summary"]
    return {key: round(summary[key]["mean"], 4) for key in ("dice", "aji", "pq", "hd95_um")
            if summary.get(key, {}).get("mean") is not None}


def install(args: argparse.Namespace, resolution: str, split_dir: Path, shipped_dir: Path, test: dict[str, Any],
            tta: bool) -> Path:
    """``gsd_wsi/zoo/nuclei-<res>/``: the shipped run's model with the split run's tuned post-processing."""
    split_info = json.loads((split_dir / "model" / "model.json").read_text())
    info = json.loads((shipped_dir / "model" / "model.json").read_text())
    images = json.loads((shipped_dir / "config.json").read_text())["split"]["train"]
    validation = {key: round(split_info[f"val_{key}"], 4) for key in ("dice", "aji", "pq")
                  if split_info.get(f"val_{key}") is not None}
    info |= {
        "postprocess": split_info["postprocess"], "tta": tta,
        "builtin": {
            "name": f"nuclei-{resolution}", "family": "nuclei", "licence": LICENCE,
            "description": f"H&E nuclei at {info['mpp']:g} um/px: background/nucleus with a distance-to-edge map, "
                           "split into instances by a marker-controlled watershed",
            "data": f"MoNuSeg 2018 training set, {len(images)} of its {ALL_IMAGES} images (40x, 0.2527 um/px; {LICENCE})",
            "training_images": images,
            "validation": validation, "validation_images": split_info.get("val_instance_images"),
            "own_split_test": test, "postprocess_from": "the validation images of the split run",
            "command": (f"python pipelines/nuclei_model.py --out nuclei-runs --resolutions {resolution} --steps "
                        f"{dict(zip(args.resolutions, args.steps))[resolution]} --ship {args.ship}"
                        + (f" --start {args.start}" if args.start != "scratch" else "")
                        + (f" --seed {args.seed}" if args.seed else "")),
            "gsd_wsi_version": __version__,
        },
    }
    target = REPO / "gsd_wsi" / "zoo" / f"nuclei-{resolution}"
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copy2(shipped_dir / "model" / "model.safetensors", tmp / "model.safetensors")
    (tmp / "model.json").write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    (args.out / "logs").mkdir(parents=True, exist_ok=True)
    report_path = args.out / "report.json"  # one report across invocations, one key per resolution
    report: dict[str, Any] = json.loads(report_path.read_text()) if report_path.exists() else {}
    for resolution, steps in zip(args.resolutions, args.steps):
        started = time.perf_counter()
        options = recipe(args, resolution)
        split_dir, all_dir = args.out / f"split_{resolution}", args.out / f"all_{resolution}"
        split_epochs = epochs_for(steps, round(SPLIT_TRAIN_IMAGES * (1 - VAL_FRACTION)), args)
        split_names = json.loads(args.split_file.read_text())["train"]
        finetune(args, split_dir, [*start_options(args, resolution, "split", split_names), *options,
                                   "--split-file", str(args.split_file), "--epochs", str(split_epochs),
                                   "--val-every", str(max(1, split_epochs // 7))], f"finetune_split_{resolution}")
        test = {"no_tta": evaluate(args, split_dir, args.out / f"eval_split_{resolution}", tta=False),
                "tta": evaluate(args, split_dir, args.out / f"eval_split_{resolution}_tta", tta=True)}
        tta = args.tta
        if tta is None:  # chosen on validation: the validation images scored both ways
            val = {flag: evaluate_validation(args, split_dir, flag) for flag in (False, True)}
            tta = (val[True]["aji"] + val[True]["pq"]) > (val[False]["aji"] + val[False]["pq"])
            report[f"validation_{resolution}"] = {"no_tta": val[False], "tta": val[True]}
        if args.ship == "all":
            all_names = sorted(p.stem for p in (args.data / "images").iterdir())
            finetune(args, all_dir, [*start_options(args, resolution, "all", all_names), *options,
                                     "--val-fraction", "0", "--epochs",
                                     str(epochs_for(steps, ALL_IMAGES, args))], f"finetune_all_{resolution}")
        report[resolution] = {"test": test, "tta_default": tta, "wall_s": round(time.perf_counter() - started)}
        if args.install:
            report[resolution]["installed"] = str(install(args, resolution, split_dir,
                                                          all_dir if args.ship == "all" else split_dir,
                                                          test["tta" if tta else "no_tta"], tta))
        log.info("%s: %s", resolution, json.dumps(report[resolution]))
    report_path.write_text(json.dumps(report, indent=2) + "\n")


def evaluate_validation(args: argparse.Namespace, split_dir: Path, tta: bool) -> dict[str, Any]:
    """The split run's model on its own validation images (what the TTA default is chosen on)."""
    names = json.loads((split_dir / "config.json").read_text())["split"]["val"]
    split_file = args.out / f"{split_dir.name}_val.json"
    split_file.write_text(json.dumps({"train": [], "val": [], "test": names}))
    out = args.out / f"val_{split_dir.name}{'_tta' if tta else ''}"
    if not (out / "metrics.json").exists():
        run_gsd_wsi(["evaluate", str(args.data), "--model", str(split_dir), "-o", str(out), "--split-file",
                     str(split_file), "--subset", "test", "--tta" if tta else "--no-tta"],
                    args.out / "logs" / f"{out.name}.log", args.threads)
    summary = json.loads((out / "metrics.json").read_text())["summary"]
    return {key: round(summary[key]["mean"], 4) for key in ("dice", "aji", "pq") if summary.get(key, {}).get("mean") is not None}


if __name__ == "__main__":
    main()
